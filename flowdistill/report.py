"""The pipeline's report: `report.md` with PNGs next to it, and a self-contained `report.html`.

Every number comes from the evaluate stage's JSON (`evaluation-<key>.json`) and the stage timings
(`timings.json`); nothing is typed in. The HTML embeds its images as data URIs and loads nothing.
"""
from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any, Iterable

from flowdistill.findings import findings, warnings_of
from flowdistill.pipeline_files import read_stage_json
from flowdistill.report_doc import CSS, Doc
from flowdistill.stage import Log, PipelineView, Stage
from flowdistill.verdict import ALPHA
from shared.checkpoint import atomic_write_text


def build(result: dict[str, Any], timings: dict[str, float], figures: Path, command: str,
          stages: Iterable["Stage"] = ()) -> Doc:
    """Lay out the report from the evaluation JSON: the Findings, then each stage's section in table order, the
    samples, the stage timings and the run folders."""
    doc = Doc(figures)
    metric = result["teacher"]["metric"]
    doc.heading(f"flowdistill report: {result['pipeline']}", 1)
    doc.heading("Findings")
    doc.text(f"Each claim compares A with B on this run. Verdict: HOLDS when A is better by the project's rule "
             f"(a one-sided Welch t-test over seeds at {ALPHA:g}; one-sample against a single teacher), FAILS when B "
             f"is better by the same rule, TIE otherwise; F2D2 holds when within its tolerance. Quality is "
             f"{metric.upper()} against the test split (lower is better); values are mean ± std over seeds (n).")
    doc.findings(findings(result), warnings_of(result))
    doc.text(f"Command: {command}. Hardware: {result['hardware']['cpu']}, {result['hardware']['cores']} cores, "
             f"{result['hardware'].get('threads', '?')} threads, device {result['hardware']['device']}, "
             f"torch {result['hardware']['torch']}.")
    for stage in stages:
        if stage.section is not None:
            stage.section(doc, result)
    doc.heading("Samples")
    doc.images(result["sample_figures"])
    doc.heading("Stage timings")
    doc.table([{"stage": k, "seconds": v} for k, v in timings.items()], ["stage", "seconds"])
    doc.heading("Runs")
    doc.table([{"run": k, "directory": v} for k, v in result["runs"].items()], ["run", "directory"])
    return doc


def findings_markdown(result: dict[str, Any]) -> str:
    """The Findings table and its warnings as Markdown, exactly as the report shows them (the README quotes it)."""
    doc = Doc(Path("."))
    doc.findings(findings(result), warnings_of(result))
    return "\n".join(doc.md).strip() + "\n"


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 2400, browser: str = "chromium") -> Path:
    """Render an HTML file to a PNG with headless Chromium (offline; raises if the browser is missing or fails)."""
    import subprocess
    import tempfile

    exe = shutil.which(browser)
    if exe is None:
        raise FileNotFoundError(f"{browser} not found: install it (Debian: apt-get install chromium) to render reports")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png.resolve()}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return png


def write_report(pipeline: PipelineView, command: str = "") -> Path:
    """Write `<pipeline>/report/report.md`, its figures and `report.html`; returns the HTML path."""
    rerun = f"rerun `{command or 'flowdistill run'}` with its evaluate stage to recompute it"
    result = read_stage_json(pipeline.evaluation_path(), rerun)
    timings_path = pipeline.root / "timings.json"
    timings = read_stage_json(timings_path, "delete it to record the stage times afresh") if timings_path.is_file() else {}
    source = pipeline.root / result["figures"]
    out = pipeline.root / "report"
    figures = out / "figures"
    if figures.exists():
        shutil.rmtree(figures)
    shutil.copytree(source, figures)
    doc = build(result, timings, figures, command or f"flowdistill run (pipeline {result['pipeline']})",
                pipeline.stages.values())
    atomic_write_text(out / "report.md", "\n".join(doc.md) + "\n")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(result['pipeline'])}</title>"
            f"<style>{CSS}</style></head><body>{''.join(doc.html)}</body></html>\n")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def status(pipeline: PipelineView) -> str:
    """`done` when the report of the current evaluation exists; it waits for the evaluation."""
    if pipeline.stage_status("evaluate") != "done":
        return "to run (after evaluate)"
    return "done" if (pipeline.root / "report" / "report.html").is_file() else "to run"


def run(pipeline: PipelineView, log: Log) -> None:
    """Write the report and say where."""
    log(f"wrote {write_report(pipeline, pipeline.command)}")


REPORT = Stage("report", run=run, status=status, main_only=True, timed=False)
