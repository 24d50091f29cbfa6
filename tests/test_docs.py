"""The documentation site builds with MkDocs in strict mode: a broken link, a missing page or any warning fails."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def nav_pages(nav: list) -> list[str]:
    """Every Markdown file named in an MkDocs `nav:` (nested sections flattened)."""
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        elif isinstance(value, str) and value.endswith(".md"):
            pages.append(value)
    return pages


def test_nav_names_existing_pages_and_the_guides():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["strict"] is True and config["docs_dir"] == "docs"
    pages = nav_pages(config["nav"])
    assert pages and all((ROOT / "docs" / p).is_file() for p in pages), pages
    for page in ("index.md", "getting_started.md", "pipeline.md", "couplings.md", "f2d2.md", "nf_distillation.md",
                 "own_models.md", "scale.md", "reliability.md", "cli.md", "nfm_comparison.md", "benchmarks.md"):
        assert page in pages, page


def test_site_builds_in_strict_mode_without_warnings(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[test]')")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "WARNING" not in output, output[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "cli" / "index.html").is_file()
