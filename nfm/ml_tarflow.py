"""apple/ml-tarflow checkpoints as this project's TarFlow: shape check, key map and config.

ml-tarflow's `transformer_flow.Model(in_channels, img_size, patch_size, channels, num_blocks,
layers_per_block, nvp=True, num_classes)` is our `TarFlow` with `final_norm: false` (no LayerNorm
before `proj_out`) and `prior_var: true` (its `var` buffer), exactly:

- tokens are `F.unfold` patches, channel-major within a patch: our `(c p q)` token layout;
- block t flips the token order when t is odd, and flips its positional embedding with the tokens, so
  our per-position embedding of a flipped block is `pos_embed.flip(0)`;
- token 0 gets (alpha, mu) = 0 (the zero row its outputs are shifted by): our `first` parameters at zero;
- `proj_out` gives (alpha, mu) as the two halves of its output, our (P=2, d) layout;
- `class_embed[y]` (K, 1, W) with y = None meaning `class_embed.mean(0)`: our label table of K + 1 rows
  whose last row (the null class) is that mean; guidance (1 + w) a_cond - w a_uncond on both alpha and
  mu is ours (`guide_what='ab'`);
- attention heads of 64 channels (ml-tarflow's fixed `head_dim`), MLP expansion 4, pre-LN layers.

ml-tarflow's `logdets` are means over the T tokens and D values of a token; ours are sums in nats
(log|det| = logdets * T * D). Its loss `0.5 mean(z^2) - mean(logdets)` is -log p(x) / (T D) - 0.5 log 2pi.
Only `nvp=True` checkpoints (affine blocks) are read; a volume-preserving one is refused by the shape check.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from pickle import UnpicklingError

import torch
from torch import Tensor

from nfm.tarflow import TarFlowConfig

HEAD_DIM = 64  # ml-tarflow's Attention is always built with 64 channels per head
EXPANSION = 4  # ml-tarflow's MLP hidden width as a multiple of the model width
LAYER_KEYS = {  # ml-tarflow name inside `attn_blocks.<k>.` -> ours inside `layers.<k>.`
    "attention.norm": "norm1", "attention.qkv": "attn.qkv", "attention.proj": "attn.proj",
    "mlp.norm": "norm2", "mlp.main.0": "mlp.0", "mlp.main.2": "mlp.2",
}
SHOWN = 8  # differing keys named in an error before the rest are counted


@dataclass(frozen=True)
class MLTarFlowShape:
    """The constructor arguments of ml-tarflow's `transformer_flow.Model` (the numbers in its file names)."""

    in_channels: int
    img_size: int
    patch_size: int
    channels: int
    num_blocks: int
    layers_per_block: int
    num_classes: int = 0

    @property
    def tokens(self) -> int:
        """T = (img_size / patch_size)^2 patches."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        """D = in_channels * patch_size^2 values per patch."""
        return self.in_channels * self.patch_size ** 2

    def check(self) -> None:
        """Raise ValueError for numbers no ml-tarflow model has."""
        if min(self.in_channels, self.img_size, self.patch_size, self.channels, self.num_blocks,
               self.layers_per_block) < 1 or self.num_classes < 0:
            raise ValueError(f"ml-tarflow sizes must be positive (num_classes >= 0), got {self}")
        if self.img_size % self.patch_size:
            raise ValueError(f"--patch-size {self.patch_size} must divide --img-size {self.img_size}")
        if self.channels % HEAD_DIM:
            raise ValueError(f"--channels {self.channels} must be a multiple of ml-tarflow's head size {HEAD_DIM}")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the model's state_dict and its shape."""
        w, t, d = self.channels, self.tokens, self.token_dim
        shapes: dict[str, tuple[int, ...]] = {"var": (t, d)}
        for b in range(self.num_blocks):
            p = f"blocks.{b}."
            shapes.update({p + "pos_embed": (t, w), p + "attn_mask": (t, t), p + "proj_in.weight": (w, d),
                           p + "proj_in.bias": (w,), p + "proj_out.weight": (2 * d, w), p + "proj_out.bias": (2 * d,)})
            if self.num_classes:
                shapes[p + "class_embed"] = (self.num_classes, 1, w)
            layer = {"attention.norm.weight": (w,), "attention.norm.bias": (w,), "attention.qkv.weight": (3 * w, w),
                     "attention.qkv.bias": (3 * w,), "attention.proj.weight": (w, w), "attention.proj.bias": (w,),
                     "mlp.norm.weight": (w,), "mlp.norm.bias": (w,), "mlp.main.0.weight": (EXPANSION * w, w),
                     "mlp.main.0.bias": (EXPANSION * w,), "mlp.main.2.weight": (w, EXPANSION * w),
                     "mlp.main.2.bias": (w,)}
            for k in range(self.layers_per_block):
                shapes.update({f"{p}attn_blocks.{k}.{name}": size for name, size in layer.items()})
        return shapes


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state_dict in an ml-tarflow `.pth` file, read with `torch.load(weights_only=True)`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ml-tarflow checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{str(path)!r} is not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors), "
                         f"got a {type(state).__name__}")
    return state


def check_state_dict(state: dict[str, Tensor], shape: MLTarFlowShape, source: str = "checkpoint") -> None:
    """Raise ValueError naming the keys that are missing, unexpected, or of another shape than `shape` gives."""
    shape.check()
    expected = shape.expected_shapes()
    if not set(state) & set(expected):
        keys = ", ".join(sorted(state)[:4]) + (", ..." if len(state) > 4 else "")
        raise ValueError(f"{source} is not an ml-tarflow TarFlow checkpoint: none of its {len(state)} keys ({keys}) "
                         "is one of transformer_flow.Model's (var, blocks.<i>.proj_in.weight, ...)")
    problems = [f"{k}: checkpoint {tuple(state[k].shape)}, expected {expected[k]}"
                for k in sorted(expected) if k in state and tuple(state[k].shape) != expected[k]]
    problems += [f"{k}: missing (expected {expected[k]})" for k in sorted(set(expected) - set(state))]
    problems += [f"{k}: unexpected {tuple(state[k].shape)}" for k in sorted(set(state) - set(expected))]
    if problems:
        more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise ValueError(f"{source} does not fit the ml-tarflow model {describe(shape)}: "
                         + "; ".join(problems[:SHOWN]) + more)


def describe(shape: MLTarFlowShape) -> str:
    """The shape as ml-tarflow's command-line flags."""
    return (f"--img-size {shape.img_size} --patch-size {shape.patch_size} --channels {shape.channels} "
            f"--blocks {shape.num_blocks} --layers-per-block {shape.layers_per_block} "
            f"--num-classes {shape.num_classes} with {shape.in_channels} image channel(s)")


def tarflow_config(shape: MLTarFlowShape, noise_std: float) -> TarFlowConfig:
    """Our TarFlow config that reproduces `shape` (trained on x + noise_std * eps, as ml-tarflow's runs are)."""
    return TarFlowConfig(patch=shape.patch_size, width=shape.channels, blocks=shape.num_blocks,
                         layers=shape.layers_per_block, head_dim=HEAD_DIM, mlp_ratio=EXPANSION,
                         num_classes=shape.num_classes, eta=noise_std, final_norm=False, prior_var=True)


def convert_state_dict(state: dict[str, Tensor], shape: MLTarFlowShape, source: str = "checkpoint"
                       ) -> dict[str, Tensor]:
    """ml-tarflow's state_dict (checked against `shape`) -> the state_dict of `TarFlow(tarflow_config(shape))`."""
    check_state_dict(state, shape, source)
    out = {"prior_var": state["var"].float()}
    for b in range(shape.num_blocks):
        p = f"blocks.{b}."
        pos = state[p + "pos_embed"]
        out[p + "pos"] = pos.flip(0) if b % 2 == 1 else pos  # ml-tarflow permutes the embedding with the tokens
        out[p + "inp.weight"], out[p + "inp.bias"] = state[p + "proj_in.weight"], state[p + "proj_in.bias"]
        out[p + "out.weight"], out[p + "out.bias"] = state[p + "proj_out.weight"], state[p + "proj_out.bias"]
        out[p + "first"] = torch.zeros_like(state[p + "proj_out.bias"])  # token 0: alpha = mu = 0
        if shape.num_classes:
            table = state[p + "class_embed"][:, 0]
            out[p + "label.weight"] = torch.cat([table, table.mean(0, keepdim=True)])  # last row: y = None
        for k in range(shape.layers_per_block):
            for theirs, ours in LAYER_KEYS.items():
                for kind in ("weight", "bias"):
                    out[f"{p}layers.{k}.{ours}.{kind}"] = state[f"{p}attn_blocks.{k}.{theirs}.{kind}"]
    return {k: v.float().contiguous() for k, v in out.items()}
