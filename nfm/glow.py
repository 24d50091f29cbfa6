"""Glow: a multi-scale normalizing flow (Kingma & Dhariwal, 2018) with exact log-likelihood both ways.

Data x (B, C, H, W) goes through L levels. Level l squeezes 2x2 pixels into channels (C, H, W) ->
(4C, H/2, W/2), applies K steps of
    ActNorm:      y = (x + b) * exp(s)                      log|det| = HW * sum(s)
    1x1 conv:     y = W x,  W = P L (U + diag(sign * exp(log|s|)))   log|det| = HW * sum(log|s|)
    coupling:     (x_a, x_b) -> (x_a, (x_b + t(x_a)) * sigmoid(r(x_a) + 2))   log|det| = sum log sigmoid
and, except after the last level, splits off half of the channels with a learned conditional prior:
z_l ~ N(mu(h), exp(2 ls(h))) is written as eps_l = (z_l - mu(h)) exp(-ls(h)), so every latent is
standard normal and log p(x) = log N(eps; 0, I) + sum of log-determinants, in nats per sample.
The latents eps_1..eps_{L-1} and the top are put back together in the data's shape by undoing the
squeezes, so `encode` returns z shaped like x (what NFM couplings pair with the data), while
`encode_with_levels` also returns the per-level outputs (what distillation matches). Vectors (D,) are treated
as (D, 1, 1) images: no squeeze, one level, 1x1 convolutions only.

ActNorm and the split priors start at the identity and the coupling networks output zero, so a fresh
Glow is a fixed rotation per step with coupling scales sigmoid(2) = 0.88: near the identity.
With `model.logit_alpha` a > 0 the levels see logit(a + (1 - 2a)(x + 1)/2) of data in [-1, 1] instead of x
(`nfm.logit_map`, as TarFlow does); its log-Jacobian is part of log|det df/dx|, and the per-level outputs
are those of the logit-mapped data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfm.logit_map import check_logit_alpha, from_logit, to_logit


@dataclass
class GlowConfig:
    """Levels, steps and widths of a Glow, and its training-noise level."""

    name: str = "glow"
    levels: int = 2  # L: squeeze -> K steps -> split (no split after the last level); 1 for vectors
    steps: int = 4  # K flow steps per level
    hidden: int = 64  # channels of each coupling network
    eta: float = 0.0  # std of the Gaussian noise added to training data (NFM teachers); 0 for dequantized runs
    logit_alpha: float = 0.0  # > 0: levels see logit(a + (1 - 2a)(x + 1)/2) of data in [-1, 1] (RealNVP); 0: x

    def flow_layers(self) -> int:
        """Flow layers: levels x flow steps per level."""
        return self.levels * self.steps


def squeeze(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """(B, 4C, H, W) -> (B, C, 2H, 2W), the inverse of `squeeze`."""
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


class ActNorm(nn.Module):
    """Per-channel affine y = (x + b) exp(s), starting at the identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = self.log_scale.sum() * x.shape[2] * x.shape[3]
        return (x + self.bias) * self.log_scale.exp(), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * (-self.log_scale).exp() - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution in LU form: W = P L (U + diag(sign exp(log_s))), P fixed, starting at a rotation."""

    def __init__(self, channels: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=g, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign", s.sign().float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(s.abs().log().float())

    def weight(self) -> Tensor:
        eye = torch.eye(len(self.log_s), device=self.log_s.device, dtype=self.log_s.dtype)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * self.log_s.exp())
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = self.log_s.sum() * x.shape[2] * x.shape[3]
        return F.conv2d(x, self.weight().to(x.dtype)[:, :, None, None]), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight().double()).to(y.dtype)
        return F.conv2d(y, w_inv[:, :, None, None])


def coupling_net(c_in: int, c_out: int, hidden: int, kernel: int) -> nn.Sequential:
    """conv k x k -> ReLU -> conv 1x1 -> ReLU -> zero-initialised conv k x k."""
    pad = kernel // 2
    net = nn.Sequential(nn.Conv2d(c_in, hidden, kernel, padding=pad), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                        nn.ReLU(), nn.Conv2d(hidden, c_out, kernel, padding=pad))
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


class AffineCoupling(nn.Module):
    """(x_a, x_b) -> (x_a, (x_b + t(x_a)) sigmoid(r(x_a) + 2)); x_a holds the first ceil(C/2) channels."""

    def __init__(self, channels: int, hidden: int, kernel: int):
        super().__init__()
        self.split = (channels + 1) // 2
        self.net = coupling_net(self.split, 2 * (channels - self.split), hidden, kernel)

    def _params(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(xa).chunk(2, dim=1)
        return shift, torch.sigmoid(raw + 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, :self.split], x[:, self.split:]
        shift, scale = self._params(xa)
        return torch.cat([xa, (xb + shift) * scale], 1), scale.log().flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        ya, yb = y[:, :self.split], y[:, self.split:]
        shift, scale = self._params(ya)
        return torch.cat([ya, yb / scale - shift], 1)


class FlowStep(nn.Module):
    """ActNorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, channels: int, hidden: int, kernel: int, seed: int):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(channels), InvConv1x1(channels, seed), AffineCoupling(channels, hidden,
                                                                                                     kernel)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, logdet = layer(x)
            total = total + logdet
        return x, total

    def inverse(self, y: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class SplitPrior(nn.Module):
    """Learned conditional Gaussian of the split-off half given the kept half: (mu, log sigma) = net(h)."""

    def __init__(self, kept: int, dropped: int, hidden: int, kernel: int):
        super().__init__()
        self.net = coupling_net(kept, 2 * dropped, hidden, kernel)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.net(h).chunk(2, dim=1)
        return mu, log_sigma


class Glow(nn.Module):
    """Multi-scale Glow on (C, H, W) images (H, W divisible by 2^levels) or (D,) vectors."""

    num_classes = 0  # unconditional

    def __init__(self, cfg: GlowConfig, data_shape: tuple[int, ...]):
        super().__init__()
        _check_config(cfg, data_shape)
        self.cfg, self.data_shape, self.eta = cfg, tuple(data_shape), float(cfg.eta)
        self.vector = len(data_shape) == 1
        channels = data_shape[0]
        kernel = 1 if self.vector else 3
        self.levels, self.priors = nn.ModuleList(), nn.ModuleList()
        for level in range(cfg.levels):
            channels = channels if self.vector else 4 * channels
            self.levels.append(nn.ModuleList([FlowStep(channels, cfg.hidden, kernel, seed=1000 * level + k)
                                              for k in range(cfg.steps)]))
            if level < cfg.levels - 1:
                dropped = channels // 2
                self.priors.append(SplitPrior(channels - dropped, dropped, cfg.hidden, kernel))
                channels -= dropped
        self.decode_passes = cfg.levels * cfg.steps + len(self.priors)

    def _as_image(self, x: Tensor) -> Tensor:
        return x[:, :, None, None] if self.vector else x

    def _squeeze(self, x: Tensor) -> Tensor:
        return x if self.vector else squeeze(x)

    def _unsqueeze(self, x: Tensor) -> Tensor:
        return x if self.vector else unsqueeze(x)

    def _encode(self, x: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Per-level outputs (before each split; the last is the top), standardised dropped halves, log|det|."""
        h = self._as_image(x)
        logdet = h.new_zeros(h.shape[0])
        outputs, dropped = [], []
        for level, steps in enumerate(self.levels):
            h = self._squeeze(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            outputs.append(h)
            if level < len(self.priors):
                half = h.shape[1] // 2
                z, h = h[:, :half], h[:, half:]
                mu, log_sigma = self.priors[level](h)
                dropped.append((z - mu) * (-log_sigma).exp())
                logdet = logdet - log_sigma.flatten(1).sum(1)
        return outputs, dropped, logdet

    def encode_with_levels(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """z = f(x) shaped like x, log|det df/dx| (B,) in nats, and the output of every level's K steps
        (before its split; the last is the top latent): the points where a student is matched to a teacher."""
        v, logit_logdet = to_logit(x, self.cfg.logit_alpha, "glow")
        outputs, dropped, logdet = self._encode(v)
        a = outputs[-1]
        for level in reversed(range(len(self.levels))):
            if level < len(dropped):
                a = torch.cat([dropped[level], a], 1)
            a = self._unsqueeze(a)
        return a.reshape(x.shape), logit_logdet + logdet, outputs

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """z = f(x) shaped like x (standard normal under the model) and log|det df/dx| (B,) in nats."""
        z, logdet, _ = self.encode_with_levels(x)
        return z, logdet

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Same as `encode` (the training direction)."""
        return self.encode(x, y)

    def scale_prior_noise(self, noise: Tensor) -> Tensor:
        """Glow's prior is N(0, I): standard normal noise (B, *shape) is its prior noise unchanged."""
        return noise

    @torch.no_grad()
    def decode(self, z: Tensor, y: Tensor | None = None, use_cache: bool = True, guidance: float = 0.0) -> Tensor:
        """x = f^{-1}(z) for z shaped like the data; `y`, `use_cache` and `guidance` do not apply to Glow."""
        return self.inverse(z)

    def inverse(self, z: Tensor) -> Tensor:
        """x = f^{-1}(z), differentiable (synthesized distillation backpropagates through it)."""
        a = self._as_image(z)
        eps = []
        for level in range(len(self.levels)):
            a = self._squeeze(a)
            if level < len(self.priors):
                half = a.shape[1] // 2
                eps.append(a[:, :half])
                a = a[:, half:]
        h = a
        for level in reversed(range(len(self.levels))):
            if level < len(self.priors):
                mu, log_sigma = self.priors[level](h)
                h = torch.cat([eps[level] * log_sigma.exp() + mu, h], 1)
            for step in reversed(self.levels[level]):
                h = step.inverse(h)
            h = self._unsqueeze(h)
        return from_logit(h.reshape(z.shape), self.cfg.logit_alpha)


def _check_config(cfg: GlowConfig, data_shape: tuple[int, ...]) -> None:
    """Raise ValueError for sizes a Glow cannot be built with on this data shape."""
    if min(cfg.levels, cfg.steps, cfg.hidden) < 1 or cfg.eta < 0:
        raise ValueError("glow levels, steps and hidden must be >= 1 and eta >= 0")
    check_logit_alpha("glow", cfg.logit_alpha, cfg.eta)
    if len(data_shape) == 1:
        if cfg.levels != 1:
            raise ValueError(f"glow on vectors has no squeeze: set model.levels=1 (got {cfg.levels})")
        if data_shape[0] < 2:
            raise ValueError("glow needs at least 2 dimensions to couple")
        return
    if len(data_shape) != 3:
        raise ValueError(f"glow takes images (C, H, W) or vectors (D,), got data shape {tuple(data_shape)}")
    side = 2 ** cfg.levels
    if data_shape[1] % side or data_shape[2] % side:
        raise ValueError(f"glow with {cfg.levels} levels needs H and W divisible by {side}, got {data_shape[1:]}")


def build_glow(cfg: GlowConfig, data_shape: tuple[int, ...]) -> Glow:
    """Build `model.name: glow` for images (C, H, W) or vectors (D,)."""
    return Glow(cfg, data_shape)

