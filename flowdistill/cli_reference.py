"""The CLI reference page (`docs/cli.md`), written from the parsers of `flowdistill.cli.build_parser()`.

    python -m flowdistill.cli_reference --write docs/cli.md   # regenerate the committed page
    python -m flowdistill.cli_reference                       # print it

Every subcommand (and the formats of `import`) gets its usage line, its description and a table of its
arguments with their defaults and help. The usage lines are built here rather than by argparse's help
formatter, whose line breaks depend on the terminal width and on the Python version; so the page is the
same on every machine, and `tests/test_cli_reference.py` can fail when the committed page is out of date.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterator, Sequence

REGENERATE = "python -m flowdistill.cli_reference --write docs/cli.md"
_SPECIAL = re.compile(r"([\\*_<>|\[\]])")  # Markdown that help text must not trigger outside code spans


def escape(text: str) -> str:
    """Help text as Markdown: special characters escaped outside `code spans`, newlines folded."""
    text = " ".join(text.split())
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: escape everything
        return _SPECIAL.sub(r"\\\1", text)
    return "`".join(part if i % 2 else _SPECIAL.sub(r"\\\1", part) for i, part in enumerate(parts))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name, in the order they were added (empty when it has none)."""
    for action in parser._actions:  # argparse keeps subparsers in a private action; stable since Python 3.2
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's own arguments: no help flag, no subcommand action."""
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def metavar(action: argparse.Action) -> str:
    """The placeholder of an argument's value: its metavar, its choices, or its name."""
    if action.metavar is not None:
        return str(action.metavar)
    if action.option_strings:
        return action.dest.upper()
    return action.dest


def usage_part(action: argparse.Action) -> str:
    """One argument as it appears in a usage line (`[--n N]`, `overrides [overrides ...]`, ...)."""
    if action.option_strings:
        flag = max(action.option_strings, key=len)
        text = flag if action.nargs == 0 else f"{flag} {metavar(action)}"
        return text if action.required else f"[{text}]"
    name = metavar(action)
    if action.nargs == "*":
        return f"[{name} ...]"
    if action.nargs == "+":
        return f"{name} [{name} ...]"
    if action.nargs == "?":
        return f"[{name}]"
    return name


def usage(prog: str, parser: argparse.ArgumentParser) -> str:
    """The usage line of a parser: options first, then positionals, then its subcommand if it has any."""
    actions = arguments(parser)
    parts = [usage_part(a) for a in actions if a.option_strings]
    parts += [usage_part(a) for a in actions if not a.option_strings]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parts.append(f"{action.metavar or action.dest.upper()} ...")
    return " ".join([prog, *parts])


def default_text(action: argparse.Action) -> str:
    """The default worth showing: none for flags, suppressed values, empty strings and None."""
    value = action.default
    if action.nargs == 0 or value in (None, "", argparse.SUPPRESS) or value == []:
        return ""
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"`{value}`"


def help_text(action: argparse.Action) -> str:
    """An argument's help, with its choices appended when the help does not list them."""
    text = escape(action.help or "")
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text = f"{text} (one of: {', '.join(f'`{c}`' for c in action.choices)})".strip()
    return text


def argument_table(parser: argparse.ArgumentParser) -> list[str]:
    """The Markdown table of a parser's arguments (empty when it has none)."""
    actions = arguments(parser)
    if not actions:
        return []
    lines = ["| argument | default | help |", "|---|---|---|"]
    for action in actions:
        name = ", ".join(action.option_strings) if action.option_strings else metavar(action)
        if action.option_strings and action.nargs != 0:
            name = f"{name} {metavar(action)}"
        required = " (required)" if action.option_strings and action.required else ""
        lines.append(f"| `{name}`{required} | {default_text(action)} | {help_text(action)} |")
    return lines


def sections(prog: str, parser: argparse.ArgumentParser, level: int) -> Iterator[list[str]]:
    """One Markdown section per subcommand of `parser`, nested subcommands one heading level deeper."""
    for name, sub in subcommands(parser).items():
        full = f"{prog} {name}"
        lines = [f"{'#' * level} `{full}`", "", "```", usage(full, sub), "```", ""]
        if sub.description:
            lines += [escape(sub.description), ""]
        table = argument_table(sub)
        if table:
            lines += [*table, ""]
        yield lines
        yield from sections(full, sub, level + 1)


def reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole page for `parser` (default: `flowdistill.cli.build_parser()`)."""
    if parser is None:
        from flowdistill.cli import build_parser

        parser = build_parser()
    prog = parser.prog
    lines = [
        "# Command-line reference",
        "",
        f"Generated from the parsers of `flowdistill.cli` by `{REGENERATE}`; do not edit by hand",
        "(a test fails when this page and the parsers differ). `python -m flowdistill` is the same CLI without",
        "the console script, and every command also prints its own `--help`.",
        "",
        "```",
        usage(prog, parser),
        "```",
        "",
        "```text",
        *(parser.description or "").strip("\n").splitlines(),
        "```",
        "",
        *argument_table(parser),
        "",
    ]
    for section in sections(prog, parser, 2):
        lines += section
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, or write it to `--write PATH`."""
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--write", default="", help="file to write (default: print to stdout)")
    opts = args.parse_args(argv)
    text = reference()
    if opts.write:
        Path(opts.write).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
