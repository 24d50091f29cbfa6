"""The generated CLI reference (`docs/cli.md`) is the parsers' and covers every subcommand."""
from __future__ import annotations

import argparse
from pathlib import Path

from flowdistill.cli import build_parser
from flowdistill.cli_reference import REGENERATE, escape, reference, subcommands, usage

PAGE = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def test_committed_cli_reference_is_up_to_date():
    assert PAGE.read_text(encoding="utf-8") == reference(), f"docs/cli.md is out of date: run `{REGENERATE}`"


def test_reference_names_every_subcommand_and_argument():
    parser = build_parser()
    page = reference(parser)
    names = list(subcommands(parser))
    assert {"run", "train", "sample", "nll", "eval", "compare", "prepare-data", "import", "export"} <= set(names)
    for name in names:
        assert f"## `flowdistill {name}`" in page
        for action in subcommands(parser)[name]._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in page, (name, flag)
    for fmt in subcommands(subcommands(parser)["import"]):
        assert f"### `flowdistill import {fmt}`" in page


def test_usage_line_marks_optional_repeated_and_required_arguments():
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("spec")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--size", required=True)
    parser.add_argument("--plan", action="store_true")
    assert usage("tool", parser) == "tool [--n N] --size SIZE [--plan] spec [overrides ...]"


def test_escape_keeps_code_spans_and_escapes_markdown_outside_them():
    assert escape("writes <run>/nll_*.csv, see `a_b*`") == r"writes \<run\>/nll\_\*.csv, see `a_b*`"
    assert escape("a | b") == r"a \| b"
