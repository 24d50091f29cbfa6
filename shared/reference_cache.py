"""A run's cache of reference likelihoods: an expensive per-point log p computed once and read back.

An ODE likelihood of a few thousand points takes minutes, and `nll`, `f2d2-eval` and the pipeline's
evaluation score the same points with the same model. Each result is stored in the folder of the run
whose model was integrated,

    <run>/cache/reference-<key>.safetensors     logp (N,) float64 in model units, nfe (N,) int64 per point,
                                                refinement (N,) float64 when the convergence check ran,
                                                and the key parts and wall seconds as metadata,

written atomically (`shared.checkpoint.atomic_write_via`). The key is the sha256 of

- `weights`: sha256 of the model's tensors (names, dtypes, shapes and bytes), so new weights recompute;
- `points`: sha256 of the points scored (N, *shape) as float32 bytes, which fixes the split or file, the
  point count and order, and any dequantization noise (the split or file's name is stored for people);
- `estimate`: what is integrated (the run's likelihood, or a flow map's tangent) and the solver settings
  (method, rtol, atol, probe), and the divergence (exact, hutchinson, or a flow's one pass);
- `randomness`: for estimates that draw (Hutchinson probes) the generator's state and the batch size the
  probes are drawn per, else empty: an exact divergence does not depend on the seed or the batching.

A file whose key differs is never read (the file name is the key's digest, and the stored key parts are
compared); a damaged or mismatched file is recomputed with a warning. A folder that cannot be written (a
read-only packed run) gives a warning and the computed result.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from shared.checkpoint import atomic_write_via
from shared.hashing import content_key, parts_key

CACHE = "cache"


def cache_dir(run_dir: str | Path) -> Path:
    """Where a run's cached reference likelihoods live."""
    return Path(run_dir) / CACHE


def tensor_digest(tensors: dict[str, Tensor]) -> str:
    """Hex sha256 over named tensors: each name, dtype, shape and contiguous CPU bytes, names in sorted order."""
    def parts(name: str) -> tuple[bytes, bytes]:
        t = tensors[name].detach().to("cpu").contiguous()
        return (f"{name}|{t.dtype}|{tuple(t.shape)}|".encode(),
                t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")

    return parts_key((part for name in sorted(tensors) for part in parts(name)), 64)


def weights_digest(model: nn.Module) -> str:
    """sha256 of a model's state dict (parameters and buffers)."""
    return tensor_digest(dict(model.state_dict()))


def points_digest(x: Tensor) -> str:
    """sha256 of points (N, *shape) as float32 (the precision models score them in)."""
    return tensor_digest({"x": x.float()})


def generator_digest(generator: torch.Generator | None) -> str:
    """sha256 of a generator's state ('' for none): identical states draw identical probes."""
    if generator is None:
        return ""
    return content_key(generator.get_state().numpy().tobytes(), 64)


@dataclass(frozen=True)
class ReferenceKey:
    """Everything a cached reference depends on (see the module docstring)."""

    weights: str
    points: str
    n: int
    estimate: str
    divergence: str
    randomness: str = ""

    def digest(self) -> str:
        """First 16 hex characters of the sha256 of the key parts; the cache file's name."""
        return content_key(asdict(self), 16)


@dataclass
class ReferenceScores:
    """Per-point reference log p (N,) float64 in model units, NFE (N,) int64, the seconds the computation took
    (when it ran, not when it was read back), whether it came from the cache, and the refinement change
    |log p_refined - log p| (N,) when the convergence check ran."""

    logp: Tensor
    nfe: Tensor
    seconds: float
    cached: bool = False
    refinement: Tensor | None = None


def cache_file(folder: str | Path, key: ReferenceKey) -> Path:
    """`<folder>/cache/reference-<digest>.safetensors`."""
    return cache_dir(folder) / f"reference-{key.digest()}.safetensors"


def load_reference(path: Path, key: ReferenceKey) -> ReferenceScores | None:
    """The scores stored at `path` for `key`; None when there is no file, and None with a warning when the file
    is damaged or holds another key."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        stored = json.loads(meta.get("key", "null"))
        seconds = float(meta["seconds"])
        logp, nfe = tensors["logp"], tensors["nfe"]
    except Exception as err:  # a torn, truncated or foreign file: anything safetensors or json raises
        warnings.warn(f"cached reference {path} is damaged ({type(err).__name__}: {err}); recomputing it",
                      stacklevel=3)
        return None
    refinement = tensors.get("refinement")
    shapes_ok = logp.shape == (key.n,) and nfe.shape == (key.n,) and (refinement is None or
                                                                      refinement.shape == (key.n,))
    if stored != asdict(key) or not shapes_ok or not bool(torch.isfinite(logp).all()):
        warnings.warn(f"cached reference {path} does not hold the scores it is named for; recomputing it",
                      stacklevel=3)
        return None
    return ReferenceScores(logp.double(), nfe.long(), seconds, True, None if refinement is None else refinement.double())


def save_reference(path: Path, key: ReferenceKey, scores: ReferenceScores, label: str = "") -> bool:
    """Write `scores` for `key` atomically; a folder that cannot be written gives a warning and False."""
    from safetensors.torch import save_file

    tensors = {"logp": scores.logp.detach().double().cpu().contiguous(),
               "nfe": scores.nfe.detach().long().cpu().contiguous()}
    if scores.refinement is not None:
        tensors["refinement"] = scores.refinement.detach().double().cpu().contiguous()
    meta = {"key": json.dumps(asdict(key), sort_keys=True), "seconds": repr(float(scores.seconds)),
            "points": label, "format": "flowdistill reference likelihood"}
    try:
        atomic_write_via(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as err:
        warnings.warn(f"could not cache the reference in {path.parent} ({err}); it is recomputed next time",
                      stacklevel=3)
        return False
    return True


def cached_reference(folder: str | Path | None, key: ReferenceKey, compute: Callable[[], ReferenceScores],
                     label: str = "") -> ReferenceScores:
    """The scores for `key` from `<folder>/cache/`, else `compute()` (timed) and stored there; `label` names
    the points (split or file) in the file's metadata.

    `folder` None disables the cache (always computes, writes nothing).
    """
    path = None if folder is None else cache_file(folder, key)
    if path is not None:
        found = load_reference(path, key)
        if found is not None:
            return found
    t0 = time.perf_counter()
    scores = compute()
    scores.seconds = scores.seconds or time.perf_counter() - t0
    if path is not None:
        save_reference(path, key, scores, label)
    return scores
