"""Sample-quality metrics: exact 2-Wasserstein for vector data, Fréchet distance on features for images.

An FD is only comparable with another FD computed by the same feature network, so every result
names its extractor: `classifier-<data set>` (a small CNN trained once per data fingerprint and
cached as safetensors) or `inception-clean-fid` (clean-fid's Inception-v3, from local weights only).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import warnings
import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from shared.checkpoint import atomic_write_via
from shared.hashing import parts_key

CACHE_ENV = "FLOWDISTILL_CACHE"  # root of the on-disk cache (classifier weights)
INCEPTION_ENV = "FLOWDISTILL_INCEPTION"  # clean-fid's Inception torchscript file (or its folder)
INCEPTION_FILE = "inception-2015-12-05.pt"  # the file name clean-fid loads
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
EXTRACTORS = ("auto", "classifier", "inception")
THREADED_BLAS_FROM_DIM = 512  # statistics of fewer dimensions run on one BLAS thread (see `statistics_blas`)
_REFERENCE_FEATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # extractor -> {(fingerprint, split): features}


def statistics_blas(dim: int) -> contextlib.AbstractContextManager:
    """BLAS threads for the NumPy/SciPy statistics of `dim`-dimensional points: one below
    `THREADED_BLAS_FROM_DIM`, the library's own setting above (Inception's 2048-dimensional sqrtm gains from threads).

    Small matrices gain nothing from threads, and idle OpenBLAS workers busy-wait after each call, taking the
    cores from the torch work that follows: on 2 cores a 500-sample sampling pass timed right after a 64-dimensional
    FD took 0.12 s instead of 0.015 s, so every sampling time measured after a score was inflated."""
    return threadpool_limits(1, user_api="blas") if dim < THREADED_BLAS_FROM_DIM else contextlib.nullcontext()


def _points(x: Tensor, max_points: int, generator: torch.Generator | None) -> np.ndarray:
    """Flatten a cloud to (N, D) float64, keeping a random subset of at most `max_points` rows."""
    x = torch.as_tensor(x).detach().cpu().reshape(len(x), -1)
    if len(x) > max_points:
        x = x[torch.randperm(len(x), generator=generator)[:max_points]]
    return x.double().numpy()


def wasserstein2(a: Tensor, b: Tensor, max_points: int = 2000, generator: torch.Generator | None = None) -> float:
    """Exact W2 between uniform empirical measures on a (N,D) and b (M,D); big clouds are subsampled (cubic solver)."""
    xa, xb = _points(a, max_points, generator), _points(b, max_points, generator)
    import ot

    with statistics_blas(xa.shape[1]):
        cost = ot.dist(xa, xb)  # squared Euclidean
        w2_sq = ot.emd2(ot.unif(len(xa)), ot.unif(len(xb)), cost, numItermax=10_000_000)
    return math.sqrt(max(float(w2_sq), 0.0))


def _numpy_features(x: np.ndarray | Tensor) -> np.ndarray:
    """Features as a float64 (N, F) array."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(len(x), -1)


def frechet_distance(feat_a: np.ndarray | Tensor, feat_b: np.ndarray | Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two (N,F) feature sets, with clean-fid's own formula."""
    a, b = _numpy_features(feat_a), _numpy_features(feat_b)
    from cleanfid import fid as cleanfid_fid

    with statistics_blas(a.shape[1]):
        stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        return float(cleanfid_fid.frechet_distance(*stats))


class FeatureExtractor(Protocol):
    """Maps images (N,C,H,W) in [-1, 1] to features (N, F); `name` is reported next to every FD."""

    name: str

    def __call__(self, images: Tensor) -> Tensor: ...


class ClassifierFeatures(nn.Module):
    """Small CNN classifier for small grey images; its 128-d penultimate activations are the FD features.

    The last maps are average-pooled to a 2x2 grid rather than globally: on MNIST a global pool
    kept the net at ~88% test accuracy (receptive field too small), the 2x2 grid reaches ~96%.
    """

    def __init__(self, in_channels: int, n_classes: int, name: str = "classifier"):
        super().__init__()
        self.name = name
        self.test_accuracy = float("nan")  # set after training or when loaded from the cache
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(256, 128), nn.GELU(),
        )
        self.head = nn.Linear(128, n_classes)

    def forward(self, images: Tensor) -> Tensor:
        """Images (N,C,H,W) in [-1, 1] -> penultimate features (N, 128) on the model's device."""
        return self.body(images.to(self.head.weight.device, torch.float32))

    def logits(self, images: Tensor) -> Tensor:
        """Class logits (N, n_classes), used for training and accuracy."""
        return self.head(self(images))


def _labels(dataset: Any) -> tuple[Tensor, Tensor]:
    """Train and test labels as int64 tensors; the classifier extractor cannot exist without them."""
    if dataset.train_labels is None or dataset.test_labels is None:
        raise ValueError(f"data set {dataset.name!r} has no labels: the classifier feature extractor needs "
                         f"labels (for unlabelled RGB images set {INCEPTION_ENV} to use Inception features)")
    return (torch.as_tensor(dataset.fit_split()[1], dtype=torch.int64),
            torch.as_tensor(dataset.test_labels, dtype=torch.int64))


@torch.no_grad()
def _accuracy(model: ClassifierFeatures, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Fraction of correctly classified images."""
    correct = sum((model.logits(images[i:i + batch_size]).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
                  for i in range(0, len(images), batch_size))
    return correct / len(images)


def train_classifier(dataset: Any, steps: int = 600, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     device: torch.device | str = "cpu") -> tuple[ClassifierFeatures, float]:
    """Train the feature classifier on all non-test data (AdamW, cosine LR); returns it (eval mode) and test accuracy."""
    train_y, test_y = _labels(dataset)
    train_x = torch.as_tensor(dataset.fit_split()[0], dtype=torch.float32)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClassifierFeatures(train_x.shape[1], n_classes, name=f"classifier-{dataset.name}").to(device)
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train_x), (batch_size,), generator=generator)
        loss = F.cross_entropy(model.logits(train_x[idx]), train_y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.test_accuracy = _accuracy(model, torch.as_tensor(dataset.test, dtype=torch.float32), test_y)
    return model, model.test_accuracy


def cache_dir() -> Path:
    """Root of flowdistill's on-disk cache: $FLOWDISTILL_CACHE if set, else ~/.cache/flowdistill."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "flowdistill"


def _load_classifier(weights: Path, meta_path: Path, dataset: Any, device: torch.device | str) -> ClassifierFeatures:
    """Rebuild a cached classifier from its JSON metadata and safetensors weights."""
    meta = json.loads(meta_path.read_text())
    if meta["fingerprint"] != dataset.base_fingerprint:
        raise ValueError(f"fingerprint {meta['fingerprint']!r} does not match the data ({dataset.base_fingerprint!r})")
    model = ClassifierFeatures(meta["in_channels"], meta["n_classes"], name=f"classifier-{dataset.name}")
    model.load_state_dict(load_file(weights))
    model.test_accuracy = float(meta["test_accuracy"])
    return model.to(device).eval()


def classifier_features(dataset: Any, device: torch.device | str = "cpu") -> ClassifierFeatures:
    """The data set's feature classifier, trained once per data fingerprint and cached, so all its FDs share one net."""
    _labels(dataset)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset.name}-{dataset.base_fingerprint}")
    weights = cache_dir() / "classifiers" / f"{stem}.safetensors"
    meta_path = weights.with_suffix(".json")
    if weights.exists() or meta_path.exists():
        try:
            return _load_classifier(weights, meta_path, dataset, device)
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
            warnings.warn(f"unreadable classifier cache {weights} ({type(err).__name__}: {err}); retraining",
                          stacklevel=2)
    model, accuracy = train_classifier(dataset, device=device)
    meta = {"dataset": dataset.name, "fingerprint": dataset.base_fingerprint, "test_accuracy": accuracy,
            "n_classes": model.head.out_features, "in_channels": model.body[0].in_channels}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_via(weights, lambda tmp: save_file(state, tmp))
    atomic_write_via(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return model


def _inception_weights() -> Path | None:
    """The local Inception file named by $FLOWDISTILL_INCEPTION (a file or the folder holding it), if it exists."""
    value = os.environ.get(INCEPTION_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    path = path / INCEPTION_FILE if path.is_dir() else path
    return path if path.is_file() and path.name == INCEPTION_FILE else None


class InceptionFeatures:
    """Clean-fid's Inception-v3 pool features (2048-d), clean-mode resize, loaded only from local weights."""

    name = "inception-clean-fid"

    def __init__(self, device: torch.device | str = "cpu"):
        path = _inception_weights()
        if path is None:
            raise FileNotFoundError(
                f"Inception weights not found: set {INCEPTION_ENV} to a local copy of clean-fid's {INCEPTION_FILE} "
                f"(or the folder holding it); flowdistill never downloads. Fetch it once where there is network, "
                f"from {INCEPTION_URL}")
        self.device = torch.device(device)
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        self.model = InceptionV3W(str(path.parent), download=False).to(self.device).eval()
        self.resize = build_resizer("clean")  # PIL bicubic to 299x299 on float [0, 255] pixels, no quantisation

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """Images (N,C,H,W) in [-1, 1], C in {1, 3} -> features (N, 2048) on the CPU."""
        pixels = ((images.detach().float().cpu() + 1) * 127.5).clamp(0, 255)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        if pixels.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {pixels.shape[1]}")
        resized = np.stack([self.resize(img) for img in pixels.permute(0, 2, 3, 1).numpy()])
        batch = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
        return self.model(batch).float().cpu()


def feature_extractor(dataset: Any, kind: str = "auto", device: torch.device | str = "cpu") -> FeatureExtractor:
    """Pick the FD feature network: "auto" uses Inception for RGB data when local weights exist, else the classifier."""
    if dataset.kind != "image":
        raise ValueError(f"data set {dataset.name!r} holds vectors: FD features are for images "
                         "(sample_quality scores vectors with wasserstein2)")
    if kind == "auto":
        kind = "inception" if _inception_weights() is not None and dataset.shape[0] == 3 else "classifier"
    if kind == "inception":
        return InceptionFeatures(device)
    if kind == "classifier":
        return classifier_features(dataset, device)
    raise ValueError(f"unknown feature extractor {kind!r}; choices: {', '.join(EXTRACTORS)}")


def feature_identity(extractor: FeatureExtractor | None) -> str:
    """What a stored score was measured with, for deciding whether it can be reused: `wasserstein2` for vectors
    (no extractor), the name of Inception's fixed published weights, or a classifier's name with a digest of its
    weights. A classifier retrained for the same data set (another machine, another version of the code) is another
    feature space, and FDs measured in two of them are not comparable."""
    if extractor is None:
        return "wasserstein2"
    if not isinstance(extractor, nn.Module):
        return extractor.name
    parts = (part for key, tensor in sorted(extractor.state_dict().items())
             for part in (key.encode(), tensor.detach().cpu().contiguous().numpy().tobytes()))
    return f"{extractor.name}-{parts_key(parts, 12)}"


@torch.no_grad()
def image_features(extractor: FeatureExtractor, images: Tensor, batch_size: int = 256) -> Tensor:
    """Extractor features (N, F) of images (N, C, H, W) in [-1, 1], computed in batches and gathered on the CPU."""
    images = torch.as_tensor(images, dtype=torch.float32)
    return torch.cat([extractor(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])


def reference_split(dataset: Any, split: str) -> Tensor:
    """The split samples are scored against: `test` (reporting), `val` (model selection) or `train` (how close
    the samples come to the images the model was trained on)."""
    data = {"test": dataset.test, "val": dataset.val, "train": dataset.train}.get(split)
    if data is None:
        raise ValueError(f"cannot score against split {split!r} of data set {dataset.name!r}; choices: test, val, "
                         "train (val needs data.val_fraction > 0 in the run's recipe)")
    return data


def _reference_features(extractor: FeatureExtractor, dataset: Any, split: str = "test") -> Tensor:
    """Features of a split, computed once per extractor object, data fingerprint and split."""
    per_data = _REFERENCE_FEATURES.setdefault(extractor, {})
    key = (dataset.fingerprint, split)
    if key not in per_data:
        per_data[key] = image_features(extractor, reference_split(dataset, split))
    return per_data[key]


def sample_quality(samples: Tensor, dataset: Any, extractor: FeatureExtractor | None = None,
                   max_points: int = 2000, split: str = "test") -> dict[str, Any]:
    """Score samples against a split (test by default; val for selection): W2 for vectors, FD on extractor
    features for images clamped to [-1, 1]. Samples are in model units; tabular data is scored in the
    units of the user's file (both clouds mapped by x = mean + std * z)."""
    if tuple(samples.shape[1:]) != tuple(dataset.shape):
        raise ValueError(f"samples have shape {tuple(samples.shape[1:])}, "
                         f"data set {dataset.name!r} has {tuple(dataset.shape)}")
    if dataset.kind == "vector":
        if extractor is not None:
            raise ValueError("vector data is scored with wasserstein2; a feature extractor does not apply")
        reference = reference_split(dataset, split)
        if len(reference) == 0:
            raise ValueError(f"the {split} split is empty: {dataset.meta.get('missing', 'no reference points')}")
        if getattr(dataset, "standardization", None) is not None:
            samples, reference = dataset.to_user(samples), dataset.to_user(reference)
        value = wasserstein2(samples, reference, max_points, torch.Generator().manual_seed(0))
        return {"metric": "w2", "value": value, "extractor": None}
    extractor = extractor if extractor is not None else feature_extractor(dataset)
    value = frechet_distance(image_features(extractor, samples.clamp(-1, 1)),
                             _reference_features(extractor, dataset, split))
    return {"metric": "fd", "value": value, "extractor": extractor.name}
