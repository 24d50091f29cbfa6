"""A report written once as Markdown and once as self-contained HTML from the same calls: headings, text,
tables (numbers formatted readably, JSON keys given readable headers), the Findings table, images."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from flowdistill.verdict import Finding

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;width:340px}figcaption{font-size:12px}
.warning{background:#fff4e5;border-left:4px solid #e8a33d;padding:4px 8px}
table.findings td{text-align:left}td.holds{background:#e3f4e1;font-weight:bold}td.tie{background:#f1f1f1}
td.fails{background:#fbe3e1;font-weight:bold}
code{background:#f5f5f5;padding:1px 4px}"""


COLUMN_NAMES = {  # report headers for the evaluation JSON's keys
    "name": "run", "params": "parameters", "eta": "noise level eta", "nfe": "NFE", "metric": "metric",
    "value": "quality", "ms_per_sample": "ms per sample", "curvature": "curvature", "curvature_std": "curvature std",
    "final_loss": "final loss", "train_seconds": "training seconds", "student": "coupling",
    "setting": "solver / grid", "quality": "quality", "speedup_vs_teacher": "speed-up vs teacher",
    "K": "jumps K", "nll": "NLL (nats)", "ref_nll": "ODE reference NLL (nats)", "nf_nll": "teacher exact NLL (nats)",
    "mae": "mean abs. error (nats)", "mae_bpd": "mean abs. error (bits/dim)", "bpd": "bits/dim",
    "ref_bpd": "ODE reference bits/dim", "naive_nll": "NLL without D (nats)", "seconds": "seconds",
    "ref_seconds": "ODE reference seconds", "ref_nfe": "ODE reference NFE", "speedup": "speed-up vs ODE",
    "quality_t1": "quality at T = 1", "quality_t07": "quality at T = 0.7", "sample_per_s": "samples per s",
    "encode_per_s": "encodes per s", "depth": "flow layers",
}


def fmt(value: Any) -> str:
    """Numbers readably (4 significant digits, thousands separated, no exponents above 1,000), else text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int) or (abs(value) >= 1000 and float(value).is_integer()):
        return f"{int(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


class Doc:
    """A report written once as Markdown and once as HTML from the same calls."""

    def __init__(self, figures: Path):
        self.md: list[str] = []
        self.html: list[str] = []
        self.figures = figures

    def heading(self, text: str, level: int = 2) -> None:
        self.md += ["#" * level + " " + text, ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def text(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, rows: list[dict[str, Any]], columns: list[str]) -> None:
        if not rows:
            return
        names = [COLUMN_NAMES.get(c, c) for c in columns]
        self.md += ["| " + " | ".join(names) + " |", "|" + "---|" * len(columns)]
        self.md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows] + [""]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in names)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                       for r in rows)
        self.html.append(f"<table><tr>{head}</tr>{body}</table>")

    def findings(self, items: list[Finding], warnings: list[str]) -> None:
        """The Findings table (claim, the two sides with their spread, verdict, how it was decided) and warnings."""
        rows = [{"claim": f.claim, "A": f"{f.a_label}: {f.a.text() if f.a else ''}",
                 "B": f"{f.b_label}: {f.b.text() if f.b else ''}", "unit": f.unit, "verdict": f.verdict.upper(),
                 "how": f.note} for f in items]
        self.table(rows, ["claim", "A", "B", "unit", "verdict", "how"])
        if rows:  # left-aligned text, verdicts coloured
            table = self.html[-1].replace("<table>", "<table class='findings'>", 1)
            for word in ("HOLDS", "TIE", "FAILS"):
                table = table.replace(f"<td>{word}</td>", f"<td class='{word.lower()}'>{word}</td>")
            self.html[-1] = table
        for line in warnings:
            self.md += [f"**Warning:** {line}", ""]
            self.html.append(f"<p class='warning'><b>Warning:</b> {html.escape(line)}</p>")

    def images(self, named: dict[str, str]) -> None:
        self.md += [f"![{title}](figures/{name})" for title, name in named.items()] + [""]
        cells = "".join(f"<figure><img alt='{html.escape(t)}' src='{self._data_uri(n)}'><figcaption>{html.escape(t)}"
                        f"</figcaption></figure>" for t, n in named.items())
        self.html.append(f"<div class='grid'>{cells}</div>")

    def image(self, title: str, name: str) -> None:
        self.md += [f"![{title}](figures/{name})", ""]
        self.html.append(f"<img alt='{html.escape(title)}' src='{self._data_uri(name)}'>")

    def _data_uri(self, name: str) -> str:
        return "data:image/png;base64," + base64.b64encode((self.figures / name).read_bytes()).decode()
