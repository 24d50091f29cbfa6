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


def architecture_sections() -> tuple[str, str]:
    """docs/architecture.md's module map and its "What adding X touches" table."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    module_map = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    adding = text.split("## What adding X touches", 1)[1].split("\n## ", 1)[0]
    return module_map, adding


def test_the_module_map_names_every_module():
    """Every module of the four packages has a row (a row may name several files of one folder)."""
    import re

    module_map, _ = architecture_sections()
    named: set[str] = set()
    for row in module_map.splitlines():
        cells = row.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        folder = ""
        for path in re.findall(r"`([\w/]+\.py)`", cells[1]):
            folder = str(Path(path).parent) if "/" in path else folder
            named.add(f"{folder}/{Path(path).name}")
    modules = {str(p.relative_to(ROOT)) for pkg in ("flowdistill", "nfm", "f2d2", "shared")
               for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - named) == []
    assert sorted(named - modules) == []


def test_what_adding_x_touches_names_tests_that_exist():
    """The counts of docs/architecture.md are backed by tests: each one it names exists."""
    import re

    _, adding = architecture_sections()
    rows = [r for r in adding.splitlines() if r.startswith("| a ")]
    assert [r.split("|")[1].strip() for r in rows] == ["a coupling", "a backbone", "a flow family", "a pipeline stage"]
    for row in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", row)
        assert cited, row
        for path, test in cited:
            assert (ROOT / path).is_file(), path
            assert not test or f"def {test}(" in (ROOT / path).read_text(), f"{path}::{test}"


RESULTS_PAGES = ["nfm_comparison.md", "benchmarks.md", "likelihood.md", "nfkd/README.md", "nfm/teachers/README.md",
                 "nf_distillation.md"]
RESULTS_GLOBS = ["nfkd/*_*.md", "nfkd/sweep/*.md", "nfm/*/comparison.md", "nfm/*/teacher_curve.md",
                 "nfm/digits/teacher_curve_runs/comparison.md", "nfm/teachers/digits_*.md"]


def results_pages() -> list[Path]:
    docs = ROOT / "docs"
    pages = {docs / p for p in RESULTS_PAGES} | {p for g in RESULTS_GLOBS for p in docs.glob(g)}
    return sorted(pages)


def test_every_results_table_names_its_source_and_commit():
    """Each Markdown table of a results page has a `Source:` line with `commit <hash>` within 2 lines; the hashes exist."""
    import re

    hashes: set[str] = set()
    for page in results_pages():
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if not (line.startswith("|") and i + 1 < len(lines) and re.match(r"\|\s*:?-", lines[i + 1])
                    and (i == 0 or not lines[i - 1].startswith("|"))):
                continue
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            near = lines[max(0, i - 2):i] + lines[end:end + 2]
            found = [m.group(1) for s in near if s.startswith("Source:")
                     for m in [re.search(r"commit ([0-9a-f]{7,40})\b", s)] if m]
            assert found, f"{page.relative_to(ROOT)}:{i + 1}: table without a `Source: ... commit <hash>` line"
            hashes.update(found)
    assert hashes
    if not (ROOT / ".git").exists():
        return  # an installed copy: no history to check the hashes against
    for h in sorted(hashes):
        done = subprocess.run(["git", "cat-file", "-e", f"{h}^{{commit}}"], cwd=ROOT, capture_output=True)
        assert done.returncode == 0, f"commit {h} named in a Source line is not in the repository"
