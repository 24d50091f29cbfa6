"""The compact stage: a compact flow distilled from the teacher (method `nf_kd`), its undistilled twin, the
control started from the teacher's blocks when `compact_init` is set, and with `compact_nfm` the student trained
on NFM pairs from the distilled flow; scored on exact NLL, sample quality at two temperatures and speed."""
from __future__ import annotations

from typing import Any

from flowdistill.api import resolve_config
from flowdistill.flow_scores import LIKELIHOOD_ONLY, UNDISTILLED
from flowdistill.recipes import resolve_recipe
from flowdistill.report_doc import Doc
from flowdistill.runs import PlannedRun, parse_entry
from flowdistill.stage import PipelineView, ScoreContext, Stage
from nfm.flow_interface import is_flow_config
from shared.config import ConfigError


COMPACT_NFM = "nf_teacher_compact"  # the student label of NFM pairs from the distilled compact flow


def plan_seed(pipeline: PipelineView, seed: int) -> list[PlannedRun]:
    """The distilled compact flow of one seed, its undistilled twin (same recipe, NLL weight 1), the control and
    the NFM student paired by the distilled flow when the spec asks for them."""
    spec = pipeline.spec
    teacher = {"method.teacher": pipeline.teacher}
    start = {"train.init_from": pipeline.teacher} if spec.compact_init else {}
    seeded = [f"seed={seed}"]
    distilled = pipeline.plan_run("compact", f"compact_distilled-s{seed}", spec.compact, seeded, {**teacher, **start},
                                  {"variant": "distilled", "seed": str(seed)})
    undistilled = pipeline.plan_run("compact", f"compact_undistilled-s{seed}", spec.compact, [*seeded, *UNDISTILLED],
                                    teacher, {"variant": "undistilled", "seed": str(seed)})
    runs = [distilled, undistilled]
    if spec.compact_init:
        runs.append(pipeline.plan_run("compact", f"compact_init_only-s{seed}", spec.compact,
                                      [*seeded, *LIKELIHOOD_ONLY], {**teacher, **start},
                                      {"variant": "init_only", "seed": str(seed)}))
    if spec.compact_nfm:
        pairs = ["method.coupling.name=nf_teacher", "method.coupling.mode=online",
                 *pipeline.extra_overrides("nf_teacher"), *seeded]
        runs.append(pipeline.plan_run("compact", f"{COMPACT_NFM}-s{seed}", spec.student, pairs,
                                      {"method.coupling.teacher": distilled},
                                      {"coupling": COMPACT_NFM, "seed": str(seed)}))
    return runs


def plan(pipeline: PipelineView) -> list[PlannedRun]:
    """Every seed's compact runs; none when the spec names no compact recipe."""
    spec = pipeline.spec
    if not spec.compact:
        return []
    recipe, overrides = parse_entry(spec.compact, "compact entry")
    method = resolve_config(resolve_recipe(recipe, spec.spec_dir or None), overrides).method.name
    if method != "nf_kd":
        raise ConfigError(f"pipeline compact: {recipe!r} has method {method!r}; the compact stage needs "
                          "method nf_kd (e.g. recipes/digits/tarflow_student_kd.yaml)")
    return [run for seed in spec.seeds for run in plan_seed(pipeline, seed)]


def depth(run: Any) -> int | None:
    """Flow layers of a normalizing flow, as its config declares them (`FlowConfig.flow_layers`); None when the
    family cannot tell."""
    model = run.config.model
    return model.flow_layers() if is_flow_config(model) else None


def score(pipeline: PipelineView, ctx: ScoreContext) -> dict[str, Any]:
    """Teacher vs distilled vs undistilled (vs control) compact flows: per-run rows and per-variant means."""
    from flowdistill.flow_scores import add_speedups, score_flow, summarize

    flows = [r for r in pipeline.compact if "variant" in r.role]
    if not flows:
        return {"compact": None}
    n = pipeline.spec.n_samples
    rows = [{"role": "teacher", "seed": None, "depth": depth(ctx.teacher), **score_flow(ctx.teacher, n, ctx.extractor)}]
    for planned in flows:
        run = ctx.load(planned)
        rows.append({"role": planned.role["variant"], "seed": int(planned.role["seed"]), "depth": depth(run),
                     **score_flow(run, n, ctx.extractor)})
    summary = summarize(rows)
    add_speedups(summary)
    for entry in summary:
        entry["depth"] = next(r["depth"] for r in rows if r["role"] == entry["role"])
    return {"compact": {"rows": rows, "summary": summary}}


def mean_std(entry: dict[str, Any], column: str) -> str:
    """`mean ± std` of a summary column (the mean alone for one run)."""
    if entry.get(column) is None:
        return ""
    return f"{entry[column]:.4g}" + (f" ± {entry[column + '_std']:.2g}" if entry["n"] > 1 else "")


def table(summary: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The distillation table: one row per variant (teacher, distilled, undistilled), means ± std over seeds."""
    measured = ["nll", "bpd", "quality_t1", "quality_t07", "sample_per_s", "encode_per_s"]
    present = [c for c in measured if any(e.get(c) is not None for e in summary)]
    rows = [{"flow": e["role"], "runs": e["n"], "params": e["params"], "depth": e["depth"],
             **{c: mean_std(e, c) for c in present}, "sample speed-up": e["sample_speedup"],
             "encode speed-up": e["encode_speedup"]} for e in summary]
    return rows, ["flow", "runs", "params", "depth", *present, "sample speed-up", "encode speed-up"]


def section(doc: Doc, result: dict[str, Any]) -> None:
    """The distillation table, when the pipeline trained compact flows."""
    if not result.get("compact"):
        return
    metric = result["teacher"]["metric"]
    doc.heading("Compact flow by NF distillation")
    doc.text(f"The teacher, a compact student distilled from it (method nf_kd) and the same student trained "
             f"by maximum likelihood alone from a fresh start (undistilled) and, where the compact flow starts "
             f"from the teacher's blocks, that start trained by maximum likelihood alone (init_only, the "
             f"control), scored on the test split: exact NLL (nats per sample; "
             f"bits/dim for images), {metric} of samples at prior temperature 1.0 and 0.7, samples and "
             f"encodes per second; depth counts flow layers, speed-ups are against the teacher.")
    doc.table(*table(result["compact"]["summary"]))
    if any(r["student"] == COMPACT_NFM for r in result["students"]):
        doc.text(f"{COMPACT_NFM} (in the student tables above) is the same student trained on NFM pairs that "
                 "the distilled flow encodes online; the encode speed-up is its coupling's cost ratio per "
                 "training step against pairs from the teacher.")


COMPACT = Stage("compact", plan=plan, score=score, section=section)
