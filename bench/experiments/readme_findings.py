"""Fill the Findings blocks the docs quote from the committed pipeline evaluations: the README's from the digits
run (`docs/pipeline_digits/evaluation.json`), docs/pipeline.md's from the MNIST-5k run
(`docs/pipeline_mnist/evaluation.json`).

    python -m bench.experiments.readme_findings --write   # after copying a new pipeline run into docs/pipeline_*/

`tests/test_readme.py` regenerates the blocks and fails when a page quotes other figures.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowdistill.report import findings_markdown

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EVALUATION = ROOT / "docs" / "pipeline_digits" / "evaluation.json"
MNIST_PAGE = ROOT / "docs" / "pipeline.md"
MNIST_EVALUATION = ROOT / "docs" / "pipeline_mnist" / "evaluation.json"
QUOTES = ((README, EVALUATION, "findings"), (MNIST_PAGE, MNIST_EVALUATION, "findings:mnist"))  # page, source, tag


def findings_block(evaluation: Path = EVALUATION, tag: str = "findings") -> str:
    """A page's block between the markers `<!-- <tag>:begin -->` and `<!-- <tag>:end -->`, markers included."""
    return f"<!-- {tag}:begin -->\n{findings_markdown(json.loads(evaluation.read_text()))}<!-- {tag}:end -->"


def readme_with_findings(text: str, evaluation: Path = EVALUATION, tag: str = "findings") -> str:
    """A page's text with its Findings block replaced by the one computed from `evaluation`."""
    end = f"<!-- {tag}:end -->"
    start, stop = text.index(f"<!-- {tag}:begin -->"), text.index(end) + len(end)
    return text[:start] + findings_block(evaluation, tag) + text[stop:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite README.md (default: print the block)")
    args = parser.parse_args()
    for page, evaluation, tag in QUOTES:
        if args.write:
            page.write_text(readme_with_findings(page.read_text(), evaluation, tag))
            print(f"wrote {page}")
        else:
            print(findings_block(evaluation, tag))


if __name__ == "__main__":
    main()
