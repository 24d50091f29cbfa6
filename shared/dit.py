"""A DiT/SiT-style image transformer backbone: diffusers' `DiTTransformer2DModel` taking t (and s) in [0, 1].

Same interface as the other backbones (`shared.backbones`): `forward(x, t, s=None, return_features=False)`
with x (B, C, H, H), t and s (B,); it returns a tensor shaped like x, or `(out, features)` with the
tokens' mean (B, width) before the output layer, which F2D2's divergence head reads.

diffusers gives every block its own timestep-and-class embedder (`norm1.emb`). Here one embedding
c = MLP_t(emb(1000 t)) [+ MLP_s(emb(1000 s))] is computed per call and every block reads it through a
parameterless stand-in, as in the DiT paper (one conditioning vector, a separate adaLN-Zero projection
per block). Initialisation follows DiT: the adaLN modulations and the output projection start at
zero, so each block starts as the identity and the model as the zero field; the s embedding's last
layer starts at zero too, so a second time changes nothing until trained.

Attention runs through `F.scaled_dot_product_attention` (fused kernels on GPU); forward-mode AD
(`torch.func.jvp`, MeanFlow-style losses) needs the math backend and float32, which the F2D2 losses
select around their jvp (`f2d2.losses`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from shared.backbones import _check_second_time


@dataclass
class DiTConfig:
    """Architecture of the image transformer (a diffusers DiTTransformer2DModel with adaLN-Zero blocks)."""

    name: str = "dit"
    patch: int = 2  # patch side in pixels; the image side must be a multiple of it (tokens: (H / patch)^2)
    depth: int = 6  # transformer blocks
    heads: int = 4  # attention heads
    head_dim: int = 32  # channels per head; the width is heads * head_dim (a multiple of 4)
    dropout: float = 0.0  # dropout inside the blocks
    second_time: bool = False  # second time input s, embedded like t and added to its embedding


def _check_dit(cfg: DiTConfig, data_shape: tuple[int, ...]) -> None:
    """Raise ValueError when the data shape or the config does not fit the transformer."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"the dit model takes square images of shape (C, H, H), got data shape {tuple(data_shape)}")
    for key in ("patch", "depth", "heads", "head_dim"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"model.{key}={getattr(cfg, key)} is out of range: expected an integer >= 1")
    if data_shape[1] % cfg.patch:
        raise ValueError(f"model.patch={cfg.patch} must divide the image side {data_shape[1]}")
    if (cfg.heads * cfg.head_dim) % 4:
        raise ValueError(f"the dit width heads * head_dim = {cfg.heads * cfg.head_dim} must be a multiple of 4 "
                         "(2D sin-cos position embedding)")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"model.dropout={cfg.dropout} is out of range: expected a number in [0, 1)")


class _Conditioning:
    """The conditioning vector of the current forward call, shared by every block (not a module: no weights)."""

    value: Tensor | None = None


class _ReadConditioning(nn.Module):
    """Stands in for a block's timestep-and-class embedder: returns the conditioning its model computed."""

    def __init__(self, holder: _Conditioning):
        super().__init__()
        self.holder = holder

    def forward(self, timestep: Any = None, class_labels: Any = None, hidden_dtype: Any = None) -> Tensor:
        if self.holder.value is None:
            raise RuntimeError("a DiT block ran outside TimeDiT.forward (no conditioning was set)")
        return self.holder.value


class TimeDiT(nn.Module):
    """diffusers DiTTransformer2DModel on (B, C, H, H) taking t (and s) in [0, 1]; features: mean token (B, width)."""

    def __init__(self, cfg: DiTConfig, data_shape: tuple[int, ...]):
        super().__init__()
        from diffusers import DiTTransformer2DModel
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        _check_dit(cfg, data_shape)
        self.cfg = cfg
        width = cfg.heads * cfg.head_dim
        self.feature_dim = width
        channels, side = int(data_shape[0]), int(data_shape[1])
        self.dit = DiTTransformer2DModel(
            num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim, in_channels=channels,
            out_channels=channels, num_layers=cfg.depth, dropout=cfg.dropout, sample_size=side,
            patch_size=cfg.patch, num_embeds_ada_norm=1)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)  # DiT's frequencies
        self.t_embed = TimestepEmbedding(256, width)
        self.s_embed = TimestepEmbedding(256, width) if cfg.second_time else None
        self._conditioning = _Conditioning()
        for block in self.dit.transformer_blocks:
            block.norm1.emb = _ReadConditioning(self._conditioning)  # drops diffusers' per-block embedders
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.dit.proj_out_1, self.dit.proj_out_2) + ((self.s_embed.linear_2,) if self.s_embed is not None else ()):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._capture = False
        self._tokens: Tensor | None = None
        self.dit.norm_out.register_forward_hook(self._store_tokens)

    def _store_tokens(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        """Forward hook: keep the last block's tokens (B, N, width) while a caller asks for features."""
        if self._capture:
            self._tokens = inputs[0]

    def embed_times(self, t: Tensor, s: Tensor | None, dtype: torch.dtype) -> Tensor:
        """The conditioning c (B, width) of times t (and s) in [0, 1]."""
        c = self.t_embed(self.time_proj(t * 1000.0).to(dtype))
        if s is not None:
            c = c + self.s_embed(self.time_proj(s * 1000.0).to(dtype))
        return c

    def forward(
        self, x: Tensor, t: Tensor, s: Tensor | None = None, return_features: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, C, H, H), t (B,), s (B,) or None -> (B, C, H, H), plus features (B, width) if asked."""
        _check_second_time(self.cfg.second_time, s)
        self._conditioning.value = self.embed_times(t, s, x.dtype)
        self._capture = return_features
        try:
            out = self.dit(x, timestep=t, return_dict=False)[0]
            tokens = self._tokens
        finally:
            self._conditioning.value, self._capture, self._tokens = None, False, None
        if not return_features:
            return out
        return out, tokens.mean(dim=1)


def build_dit(cfg: DiTConfig, data_shape: tuple[int, ...]) -> TimeDiT:
    """DiT for square images of shape (C, H, H)."""
    return TimeDiT(cfg, data_shape)
