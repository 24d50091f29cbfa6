"""The couplings stage: the teacher's NFM pairs, extracted once into the cache every NFM student reads."""
from __future__ import annotations


from flowdistill.runs import PlannedRun
from flowdistill.stage import Log, PipelineView, Stage


def readers(pipeline: PipelineView) -> list[PlannedRun]:
    """The students whose pairs come from a teacher (their `run_dependencies()`) through the precomputed cache."""
    return [r for r in pipeline.students
            if "teacher" in r.dependencies() and r.config.method.coupling.mode == "precomputed"]


def status(pipeline: PipelineView) -> str:
    """`done` when the cache is complete, `to run (<cache>)` otherwise, or `nothing to precompute`."""
    from nfm.coupling_cache import MANIFEST, cache_dir_of

    students = readers(pipeline)
    if not students:
        return "nothing to precompute"
    root = cache_dir_of(students[0].config.method.coupling)
    return "done" if (root / MANIFEST).is_file() else f"to run ({root})"


def run(pipeline: PipelineView, log: Log) -> None:
    """Extract the cache (every process takes part; a complete cache is reused)."""
    from flowdistill.api import load_run
    from nfm.coupling_cache import extract

    students = readers(pipeline)
    if students:
        extract(students[0].config, load_run)


COUPLINGS = Stage("couplings", run=run, status=status)
