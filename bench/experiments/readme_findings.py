"""Fill the README's Findings block from the committed pipeline evaluation (`docs/pipeline_digits/evaluation.json`).

    python -m bench.experiments.readme_findings --write   # after copying a new pipeline run into docs/pipeline_digits/

`tests/test_readme.py` regenerates the block and fails when the README quotes other figures.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from flowdistill.report import findings_markdown

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EVALUATION = ROOT / "docs" / "pipeline_digits" / "evaluation.json"
BEGIN, END = "<!-- findings:begin -->", "<!-- findings:end -->"


def findings_block(evaluation: Path = EVALUATION) -> str:
    """The README's block between the markers, markers included."""
    return f"{BEGIN}\n{findings_markdown(json.loads(evaluation.read_text()))}{END}"


def readme_with_findings(text: str, evaluation: Path = EVALUATION) -> str:
    """The README text with its Findings block replaced by the one computed from `evaluation`."""
    start, stop = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + findings_block(evaluation) + text[stop:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite README.md (default: print the block)")
    args = parser.parse_args()
    if args.write:
        README.write_text(readme_with_findings(README.read_text()))
        print(f"wrote {README}")
    else:
        print(findings_block())


if __name__ == "__main__":
    main()
