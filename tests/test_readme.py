"""The README quotes the main job's Findings exactly as the committed evaluation computes them, and stays short."""
from __future__ import annotations

import json

from bench.experiments.readme_findings import EVALUATION, MNIST_EVALUATION, MNIST_PAGE, README, readme_with_findings


def test_readme_findings_are_those_of_the_committed_evaluation():
    text = README.read_text()
    assert text == readme_with_findings(text), "run `python -m bench.experiments.readme_findings --write`"
    hardware = json.loads(EVALUATION.read_text())["hardware"]
    machine = f"{hardware['cpu'].split()[0]} {hardware['cpu'].split()[1]}, {hardware['cores']} cores"
    assert machine in text and f"{hardware['threads']} thread" in text


def test_the_mnist_findings_quoted_in_the_pipeline_guide_are_those_of_its_committed_evaluation():
    text = MNIST_PAGE.read_text()
    assert text == readme_with_findings(text, MNIST_EVALUATION, "findings:mnist"), \
        "run `python -m bench.experiments.readme_findings --write`"
    hardware = json.loads(MNIST_EVALUATION.read_text())["hardware"]
    assert f"{hardware['cores']} cores" in text and f"{hardware['threads']} thread" in text


def test_readme_opens_with_the_two_commands_and_fits_a_short_read():
    lines = README.read_text().splitlines()
    assert len(lines) <= 120
    commands = [ln for ln in lines[:20] if ln.startswith("pip install")]
    assert commands[0].endswith("flowdistill run recipes/digits/pipeline.yaml")
    assert commands[1].endswith("python -m pytest -q")
