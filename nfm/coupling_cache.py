"""The precomputed NFM coupling cache: teacher outputs for every (image, draw), sharded, atomic, resumable.

    <cache>/spec.json                  what is being extracted (written first; a different spec is refused)
    <cache>/shard_00000.safetensors    f_teacher(x_i + eta eps'(i, d)) for images [start, stop), all draws (fp32)
    <cache>/manifest.json              spec, sigma_f and the sha256 of every shard (written last: complete)

`flowdistill couplings RECIPE` fills it (`extract`); shards are split round-robin over Accelerate processes and each
is written under a temporary name and renamed, so an interrupted extraction resumes from the shards on
disk. Training in precomputed mode loads the cache only when the manifest's spec equals the recipe's
(teacher weights hash and step, eta, data fingerprint, draws, seed, dtype, shard size).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from nfm.teacher_pairs import TeacherHandle, estimate_sigma, load_teacher, perturbed, sigma_points, teacher_encode
from shared.catalog import NAMED_RUN_PREFIX
from shared.checkpoint import (CheckpointError, atomic_write_bytes, atomic_write_text, contained_file,
                               explain_disk_full, sha256_file)
from shared.config import ConfigError, RunConfig
from shared.device import cpu_only
from shared.hashing import content_key
from shared.metrics import cache_dir
from shared.run_build import require_same_data
from shared.rundir import couplings_dir, folder_lock, lock_path

SPEC = "spec.json"
MANIFEST = "manifest.json"
REEXTRACT = "re-extract with `flowdistill couplings <recipe> --overwrite`"
INFO_KEYS = ("teacher_run",)  # recorded but not required to match (a teacher folder may move)


def cache_dir_of(cfg: Any) -> Path:
    """Where a coupling section's teacher cache lives: `cache`, else inside the teacher run (a shipped
    teacher, `pretrained:<name>`, is read-only: its caches live under the user cache, `$FLOWDISTILL_CACHE`)."""
    if cfg.cache:
        return Path(cfg.cache)
    weights = "" if cfg.weights == "auto" else f"-{cfg.weights}"
    teacher = str(cfg.teacher)
    if teacher.startswith(NAMED_RUN_PREFIX):
        folder = cache_dir() / "couplings" / teacher[len(NAMED_RUN_PREFIX):]
    else:
        folder = couplings_dir(teacher)
    return folder / f"nf_teacher-d{cfg.draws}-s{cfg.seed}{weights}"


def cache_spec(teacher: TeacherHandle, dataset: Any, cfg: Any) -> dict[str, Any]:
    """Everything the cached pairs depend on (`cfg`: the coupling section)."""
    dequantized = {} if teacher.dequantize_levels is None else {"dequantize_levels": teacher.dequantize_levels}
    return {**dequantized, "teacher_run": str(teacher.run_dir), "teacher_step": teacher.step, "teacher_sha256": teacher.weights_sha256,
            "eta": teacher.eta, "data": dataset.name, "data_fingerprint": dataset.fingerprint,
            "n_images": len(dataset.train), "shape": list(dataset.shape), "draws": cfg.draws,
            "seed": cfg.seed, "teacher_dtype": cfg.dtype, "shard_size": cfg.shard}


def spec_differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Human-readable `key: cache has A, recipe needs B` for every checked key that differs."""
    keys = sorted((set(saved) | set(wanted)) - set(INFO_KEYS))
    return [f"{k}: cache has {saved.get(k)!r}, recipe needs {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]


def spec_id(spec: dict[str, Any]) -> str:
    """Short hash of the checked part of a spec, stamped into every shard."""
    checked = {k: v for k, v in spec.items() if k not in INFO_KEYS}
    return content_key(checked, 16)


def shard_path(root: Path, shard: int) -> Path:
    """File of shard number `shard`."""
    return root / f"shard_{shard:05d}.safetensors"


def _shard_ok(path: Path, sid: str, rows: int, draws: int) -> bool:
    """Whether a shard on disk is complete and intact: its sha256 matches the sidecar written after it,
    and its header names this spec and the expected size (anything else is recomputed)."""
    sidecar = path.with_suffix(".sha256")
    if not path.is_file() or not sidecar.is_file() or sidecar.read_text().strip() != sha256_file(path):
        return False
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            shape = fh.get_slice("z").get_shape()
    except Exception:  # unreadable leftovers are recomputed
        return False
    return meta.get("spec_id") == sid and list(shape[:2]) == [rows, draws]


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON file of the cache, with an error that names the file when it is torn or not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{what} {path} is unreadable ({err}); re-extract with `flowdistill couplings "
                              f"<recipe> --overwrite`") from None


def load_cache(root: str | Path | None, spec: dict[str, Any]) -> tuple[Tensor, float]:
    """The cached teacher outputs (N, draws, *shape) and sigma_f, after checking spec and shard hashes."""
    root = Path(root) if root else Path(".")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        if (root / SPEC).is_file():
            raise CheckpointError(f"coupling cache {root} is incomplete (extraction interrupted?): run "
                                  f"`flowdistill couplings <recipe>` again to finish it")
        raise CheckpointError(f"no coupling cache at {root}: run `flowdistill couplings <recipe>` first, "
                              f"or set method.coupling.mode=online")
    manifest = read_json(manifest_path, "coupling cache manifest")
    diff = spec_differences(manifest["spec"], spec)
    if diff:
        raise CheckpointError(f"coupling cache {root} is stale or belongs to another setup ({'; '.join(diff)}); "
                              f"re-extract with `flowdistill couplings <recipe> --overwrite`")
    parts = []
    for entry in manifest["shards"]:
        path = contained_file(root, entry["file"], f"coupling cache manifest {manifest_path}", REEXTRACT)
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise CheckpointError(f"coupling cache shard {path} is missing or corrupt (sha256 mismatch); "
                                  f"re-extract with `flowdistill couplings <recipe> --overwrite`")
        parts.append(load_file(str(path))["z"])
    return torch.cat(parts), float(manifest["sigma_f"])


def damaged_shards(root: Path) -> list[str]:
    """Names of the shards of a sealed cache that are missing or whose sha256 differs from the manifest."""
    manifest = read_json(root / MANIFEST, "coupling cache manifest")
    paths = {e["file"]: contained_file(root, e["file"], f"coupling cache manifest {root / MANIFEST}", REEXTRACT)
             for e in manifest["shards"]}
    return [e["file"] for e in manifest["shards"]
            if not paths[e["file"]].is_file() or sha256_file(paths[e["file"]]) != e["sha256"]]


def _prepare_root(root: Path, spec: dict[str, Any], overwrite: bool) -> None:
    """Main process: refuse a cache of another spec; start a new one by writing spec.json."""
    if overwrite and root.exists():
        shutil.rmtree(root)
    for name in (MANIFEST, SPEC):
        path = root / name
        if path.is_file():
            saved = read_json(path, "coupling cache file")
            diff = spec_differences(saved.get("spec", saved), spec)
            if diff:
                raise CheckpointError(f"{root} already holds a coupling cache for another setup ({'; '.join(diff)}); "
                                      f"pass --overwrite to replace it or set method.coupling.cache=<new folder>")
            if name == MANIFEST:
                return
    atomic_write_text(root / SPEC, json.dumps(spec, indent=1) + "\n")


def extract(cfg: RunConfig, load_run: Callable[..., Any], overwrite: bool = False) -> Path:
    """Fill the teacher-pair cache of a student recipe (all processes take part); returns the cache folder.

    `load_run(run_dir, device=...)` loads the teacher run named by the recipe's coupling section.
    """
    from accelerate import Accelerator

    from shared.data_sources import load_dataset

    coupling = getattr(cfg.method, "coupling", None)
    if coupling is None or "teacher" not in coupling.run_dependencies():
        raise ConfigError(f"`flowdistill couplings` extracts teacher pairs: the recipe's method.coupling is "
                          f"{getattr(coupling, 'name', coupling)!r}, expected nf_teacher or nf_teacher_ot")
    if coupling.draws < 1 or coupling.shard < 1:
        raise ConfigError(f"method.coupling.draws ({coupling.draws}) and method.coupling.shard "
                          f"({coupling.shard}) must be >= 1 for a precomputed cache")
    acc = Accelerator(cpu=cpu_only())
    dataset = load_dataset(cfg.data)
    teacher = load_teacher(coupling.teacher, load_run, acc.device, coupling.weights)
    require_same_data(coupling.teacher, teacher.data_fingerprint, dataset, "method.coupling.teacher")
    spec, root = cache_spec(teacher, dataset, coupling), cache_dir_of(coupling)
    busy = (f"coupling cache {root} is being extracted by another process (it holds {lock_path(root)}); wait for "
            "it to finish or stop it, then run `flowdistill couplings <recipe>` again")
    new = overwrite or not root.exists()
    with folder_lock(root, busy, acc.is_main_process):
        try:
            with explain_disk_full(f"coupling cache {root}", "run `flowdistill couplings <recipe>` again (finished "
                                                            "shards are kept)"):
                return _fill_cache(acc, root, spec, teacher, dataset, coupling, overwrite)
        except BaseException:
            if acc.is_main_process and new:
                _discard_if_unfinished(root)
            raise


def _discard_if_unfinished(root: Path) -> None:
    """Remove a cache folder that a failed first extraction left without one finished shard."""
    if root.is_dir() and not any(root.glob("shard_*.sha256")):
        shutil.rmtree(root, ignore_errors=True)


def _fill_cache(acc: Any, root: Path, spec: dict[str, Any], teacher: TeacherHandle, dataset: Any, method: Any,
                overwrite: bool) -> Path:
    """Main part of `extract`, with the cache's lock held: compute the missing or damaged shards, then seal."""
    if acc.is_main_process:
        _prepare_root(root, spec, overwrite)
    acc.wait_for_everyone()
    if (root / MANIFEST).is_file():  # left in place by _prepare_root only when complete and matching
        damaged = damaged_shards(root)
        acc.wait_for_everyone()
        if not damaged:
            acc.print(f"coupling cache {root} is already complete")
            return root
        acc.print(f"coupling cache {root}: {', '.join(damaged)} missing or corrupt (sha256 differs from the "
                  "manifest); recomputing them")
        if acc.is_main_process:
            (root / MANIFEST).unlink()
        acc.wait_for_everyone()
    sid, n, size, draws = spec_id(spec), len(dataset.train), method.shard, method.draws
    n_shards = math.ceil(n / size)
    mine = range(acc.process_index, n_shards, acc.num_processes)
    data = dataset.train.to(acc.device)
    computed, t0 = 0, time.perf_counter()
    for s in tqdm(mine, desc=f"teacher pairs ({acc.num_processes} proc)", disable=not acc.is_main_process or None):
        start, stop = s * size, min(n, (s + 1) * size)
        path = shard_path(root, s)
        if _shard_ok(path, sid, stop - start, draws):
            continue
        index = torch.arange(start, stop)
        z = torch.stack([teacher_encode(teacher.flow, perturbed(data, index, torch.full_like(index, d), teacher, method.seed),
                                         method.dtype, method.batch).cpu()
                         for d in range(draws)], dim=1)
        atomic_write_bytes(path, save({"z": z.contiguous(), "index": index}, metadata={"spec_id": sid}))
        atomic_write_text(path.with_suffix(".sha256"), sha256_file(path) + "\n")
        computed += (stop - start) * draws
    seconds = time.perf_counter() - t0
    acc.wait_for_everyone()
    if acc.is_main_process:
        shards = [{"file": shard_path(root, s).name, "sha256": sha256_file(shard_path(root, s)),
                   "start": s * size, "stop": min(n, (s + 1) * size)} for s in range(n_shards)]
        m = sigma_points(n)
        z0 = torch.cat([load_file(str(shard_path(root, s)))["z"][:, 0] for s in range(math.ceil(m / size))])[:m]
        sigma = estimate_sigma(z0)
        rate = computed / seconds if computed else 0.0
        manifest = {"spec": spec, "sigma_f": sigma, "shards": shards, "pairs": n * draws,
                    "extract_seconds": seconds, "pairs_per_s_main_process": rate}
        atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        acc.print(f"wrote coupling cache {root}: {n} images x {draws} draws, sigma_f={sigma:.4f}; "
                  f"{computed} pairs computed here in {seconds:.1f} s ({rate:.0f} pairs/s on the main process)")
    acc.wait_for_everyone()
    return root
