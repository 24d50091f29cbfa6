"""Time-conditioned backbones shared by every method: an MLP (any shape, flattened) and a UNet for images.

Every model follows one interface: `forward(x, t, s=None, return_features=False)` with x of shape
(B, *data_shape), t of shape (B,) in [0, 1] (t=0 data, t=1 noise) and an optional second time s
(B,) for flow maps. It returns a tensor shaped like x, or `(out, features)` with pooled features
(B, feature_dim) that a scalar head (F2D2's divergence head) can read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn



def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t * scale, (B,) -> (B, dim): angles t * scale * max_period^(-i / half), i < half, so
    times in [0, 1] span many frequencies, the fastest `scale` radians per unit of t."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * scale)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _check_second_time(second_time: bool, s: Tensor | None) -> None:
    """Reject a second time s on a one-time model and a missing s on a two-time model."""
    if s is not None and not second_time:
        raise ValueError("this model takes no second time s; build it with second_time=True for flow maps")
    if s is None and second_time:
        raise ValueError("this model was built with second_time=True and needs a second time s of shape (B,)")


@dataclass
class MLPConfig:
    """Width, depth and time inputs of the vector MLP."""

    name: str = "mlp"
    hidden: int = 256  # width of hidden layers
    depth: int = 4  # number of hidden layers
    time_dim: int = 64  # sinusoidal time-embedding size
    time_embed_scale: float = 1000.0  # times are embedded as t * time_embed_scale (fastest angle, radians per unit t)
    layer_norm: bool = False  # LayerNorm before each hidden activation
    dropout: float = 0.0  # dropout after each hidden activation (training only)
    second_time: bool = False  # take a second time input s (flow maps)


class TimeMLP(nn.Module):
    """SiLU MLP on [flat x, emb(t), emb(s)]: (B, *shape) -> (B, *shape); features are the last hidden layer.

    Images are flattened to vectors, which makes a cheap CPU backbone for small images (8x8 digits).
    """

    def __init__(self, cfg: MLPConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.feature_dim = cfg.hidden
        width = dim + cfg.time_dim * (2 if cfg.second_time else 1)
        layers: list[nn.Module] = []
        for _ in range(cfg.depth):
            layers.append(nn.Linear(width, cfg.hidden))
            if cfg.layer_norm:
                layers.append(nn.LayerNorm(cfg.hidden))
            layers.append(nn.SiLU())
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = cfg.hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)

    def forward(
        self, x: Tensor, t: Tensor, s: Tensor | None = None, return_features: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, *shape), t (B,), s (B,) or None -> (B, *shape), plus features (B, hidden) if asked."""
        _check_second_time(self.cfg.second_time, s)
        parts = [x.flatten(1), timestep_embedding(t, self.cfg.time_dim, scale=self.cfg.time_embed_scale).to(x.dtype)]
        if s is not None:
            parts.append(timestep_embedding(s, self.cfg.time_dim, scale=self.cfg.time_embed_scale).to(x.dtype))
        h = self.body(torch.cat(parts, dim=-1))
        out = self.out(h).view(x.shape)
        return (out, h) if return_features else out


def build_mlp(cfg: MLPConfig, data_shape: tuple[int, ...]) -> TimeMLP:
    """MLP for data of any shape, flattened to prod(shape) inputs."""
    if not data_shape or min(data_shape) < 1:
        raise ValueError(f"the mlp model needs a non-empty data shape with positive sizes, got {tuple(data_shape)}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"model.dropout={cfg.dropout!r} is out of range: expected a number in [0, 1)")
    return TimeMLP(cfg, math.prod(data_shape))


@dataclass
class UNetConfig:
    """Architecture of the image UNet (a diffusers UNet2DModel)."""

    name: str = "unet"
    channels: tuple[int, ...] = (64, 128, 128)  # output channels per resolution level
    layers_per_block: int = 1  # resnet layers per down block (up blocks get one more)
    attention: tuple[bool, ...] = (False, False, True)  # which resolution levels use self-attention
    attention_head_dim: int = 32  # channels per attention head (few large heads)
    norm_groups: int = 16  # GroupNorm groups; must divide every entry of `channels`
    dropout: float = 0.0  # dropout inside resnet blocks
    second_time: bool = False  # second time input s, embedded like t and added to its embedding
    time_reversed: bool = False  # the network's own time has noise at 0 (torchcfm): v(x, t) = -net(x, 1 - t)
    timestep_scale: float = 1000.0  # the network sees timestep = timestep_scale * t (1: t itself)


def _check_unet(cfg: UNetConfig, data_shape: tuple[int, ...]) -> None:
    """Raise ValueError when the data shape or the config does not fit the UNet."""
    if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
        raise ValueError(f"the unet model takes square images of shape (C, H, H), got data shape {tuple(data_shape)}")
    if len(cfg.attention) != len(cfg.channels):
        raise ValueError(f"unet attention {cfg.attention} needs one entry per level of channels {cfg.channels}")
    factor = 2 ** (len(cfg.channels) - 1)
    if data_shape[1] % factor:
        raise ValueError(
            f"image side {data_shape[1]} must be divisible by 2**(len(channels)-1) = {factor} "
            f"for a unet with {len(cfg.channels)} levels; use fewer levels"
        )
    for c in cfg.channels:
        if c % cfg.norm_groups:
            raise ValueError(f"unet norm_groups {cfg.norm_groups} must divide every entry of channels {cfg.channels}")
    attended = [c for c, a in zip(cfg.channels, cfg.attention) if a] + [cfg.channels[-1]]
    if any(c % cfg.attention_head_dim for c in attended):
        raise ValueError(
            f"unet attention_head_dim {cfg.attention_head_dim} must divide the channels of every attention "
            f"level and of the mid block (last entry of {cfg.channels})"
        )


class TimeUNet(nn.Module):
    """diffusers UNet2DModel on (B, C, H, H) taking t (and s) in [0, 1]; features pool the mid block.

    Attention uses diffusers' plain bmm/softmax processor: fused attention kernels lack the
    forward-mode derivative that `torch.func.jvp` (flow-map losses) needs.
    """

    def __init__(self, cfg: UNetConfig, data_shape: tuple[int, ...]):
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import Attention, AttnProcessor

        _check_unet(cfg, data_shape)
        self.cfg = cfg
        self.feature_dim = cfg.channels[-1]
        channels, side = int(data_shape[0]), int(data_shape[1])
        self.unet = UNet2DModel(
            sample_size=side,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=tuple(cfg.channels),
            layers_per_block=cfg.layers_per_block,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention)),
            attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_groups,
            dropout=cfg.dropout,
            class_embed_type="timestep" if cfg.second_time else None,
        )
        for module in self.unet.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor())
        self._capture = False
        self._mid: Tensor | None = None
        self.unet.mid_block.register_forward_hook(self._store_mid)

    def _store_mid(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        """Forward hook: keep the mid-block output (B, channels[-1], h, h) while a caller asks for it."""
        if self._capture:
            self._mid = output

    def forward(
        self, x: Tensor, t: Tensor, s: Tensor | None = None, return_features: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, C, H, H), t (B,), s (B,) or None -> (B, C, H, H), plus features (B, channels[-1]) if asked."""
        _check_second_time(self.cfg.second_time, s)
        labels = None if s is None else s * 1000.0
        self._capture = return_features
        try:
            if self.cfg.time_reversed:  # a field written with t = 0 noise: ours is -net(x, 1 - t)
                out = -self.unet(x, (1 - t) * self.cfg.timestep_scale, class_labels=labels, return_dict=False)[0]
            else:
                out = self.unet(x, t * self.cfg.timestep_scale, class_labels=labels, return_dict=False)[0]
            mid = self._mid
        finally:
            self._capture, self._mid = False, None
        if not return_features:
            return out
        return out, mid.mean(dim=(2, 3))


def build_unet(cfg: UNetConfig, data_shape: tuple[int, ...]) -> TimeUNet:
    """UNet for square images of shape (C, H, H)."""
    return TimeUNet(cfg, data_shape)
