"""The joint flow map of the coupled ODE (x, log p): model, few-step sampler and few-step likelihood.

Sign and scale of D, defined here once and used by training, sampling, likelihood and guidance:

    X(x, t, s)            = x + (s - t) u(x, t, s)
    log p_s(X(x, t, s))   = log p_t(x) + (s - t) D(x, t, s)

With dx/dt = v(x, t) and d log p_t(x_t)/dt = -div v(x_t, t) (shared.likelihood), u is the average
velocity and D(x, t, s) = 1/(s - t) * integral_t^s -div v(x_tau, tau) dtau the average of -div v
along the trajectory, in nats per unit time per sample; on the diagonal u(x, t, t) = v(x, t) and
D(x, t, t) = -div v(x, t). The scalar head outputs D / div_scale (div_scale = data dimension
unless the model config sets it), so the head is O(1) while `forward` returns D itself.

The backbones embed t * time_embed_scale (1000 by default: up to 1,000 rad per unit t), so their outputs
wiggle in t with a period near 0.006: harmless for flow matching and Shortcut jumps on a dyadic grid, but MeanFlow's
target (s - t) du/dt amplifies such wiggles by |s - t| * 1000 and feeds them back. `time_scale` < 1
slows every time feature down (0.01: at most 10 rad per unit time), at the price of a teacher init.

Times follow shared.paths (t = 0 data, t = 1 noise): a jump with s < t moves towards the data
(sampling), s > t towards the noise (likelihood). Models are trained for both orders of (t, s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from shared.backbones import MLPConfig, TimeMLP, TimeUNet, timestep_embedding
from shared.dit import TimeDiT
from shared.likelihood import LikelihoodResult, choose_divergence, divergence_exact, divergence_hutchinson, make_probe
from shared.paths import standard_normal_logprob
from shared.sampling import SampleResult, time_grid

FlowMapFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


_BACKBONE_KEYS = ("hidden", "depth", "time_dim", "layer_norm", "channels", "layers_per_block", "attention",
                  "attention_head_dim", "norm_groups", "dropout")


@dataclass
class FlowMapConfig:
    """A backbone taking (x, t, s) with an average-velocity output u and a scalar average-divergence head D."""

    name: str = "flowmap"
    backbone: Any = field(default_factory=MLPConfig)  # section {name: mlp | unet | dit, <that backbone's own keys>}
    time_scale: float = 1.0  # times enter as time_scale * t: 1 keeps the backbone embedding; MeanFlow: ~0.01
    head_hidden: int = 128  # width of the two hidden layers of the D head
    head_time_dim: int = 64  # sinusoidal embedding size of t and s in the D head
    div_scale: float = 0.0  # D = div_scale * head output (nats per unit time); 0 means the data dimension

    MOVED_KEYS: ClassVar[dict[str, str]] = {
        key: f"it is model.backbone.{key} now, inside the backbone's own section "
             f"(e.g. model: {{name: flowmap, backbone: {{name: mlp, {key}: ...}}}})" for key in _BACKBONE_KEYS}


class DivergenceHead(nn.Module):
    """Scalar head on backbone features and the embeddings of t and s: (B, F), (B,), (B,) -> (B,); zero at init."""

    def __init__(self, feature_dim: int, time_dim: int, hidden: int):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(nn.Linear(feature_dim + 2 * time_dim, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: Tensor, t: Tensor, s: Tensor) -> Tensor:
        emb = [timestep_embedding(t, self.time_dim), timestep_embedding(s, self.time_dim)]
        return self.net(torch.cat([features] + [e.to(features.dtype) for e in emb], dim=-1)).squeeze(-1)


class FlowMapMLP(TimeMLP):
    """TimeMLP whose first layer also reads emb(s) through a zero-initialised projection.

    Parameter names equal those of a flow-matching `mlp` of the same size, so `train.init_from` copies a
    teacher completely and the fresh map starts as u(x, t, s) = v_teacher(x, t), D = 0.
    """

    def __init__(self, cfg: FlowMapConfig, dim: int, div_scale: float):
        super().__init__(replace(cfg.backbone, second_time=False), dim)
        self.s_embed = nn.Linear(cfg.backbone.time_dim, cfg.backbone.hidden)
        nn.init.zeros_(self.s_embed.weight)
        nn.init.zeros_(self.s_embed.bias)
        self.div_head = DivergenceHead(self.feature_dim, cfg.head_time_dim, cfg.head_hidden)
        self.div_scale, self.time_scale = div_scale, cfg.time_scale

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, *shape), t (B,), s (B,) -> u (B, *shape), D (B,) in nats per unit time."""
        t, s = t * self.time_scale, s * self.time_scale
        emb_t = timestep_embedding(t, self.cfg.time_dim, scale=self.cfg.time_embed_scale).to(x.dtype)
        emb_s = timestep_embedding(s, self.cfg.time_dim, scale=self.cfg.time_embed_scale).to(x.dtype)
        h = self.body[0](torch.cat([x.flatten(1), emb_t], dim=-1)) + self.s_embed(emb_s)
        h = self.body[1:](h)
        return self.out(h).view(x.shape), self.div_scale * self.div_head(h, t, s)


class _FeatureDivergence(nn.Module):
    """Mixin for image backbones that return pooled features: scales both times, adds the D head on them."""

    def _attach_head(self, cfg: FlowMapConfig, div_scale: float) -> None:
        self.div_head = DivergenceHead(self.feature_dim, cfg.head_time_dim, cfg.head_hidden)
        self.div_scale, self.time_scale = div_scale, cfg.time_scale

    def forward(self, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, H), t (B,), s (B,) -> u (B, C, H, H), D (B,) in nats per unit time."""
        t, s = t * self.time_scale, s * self.time_scale
        u, features = super().forward(x, t, s, return_features=True)
        return u, self.div_scale * self.div_head(features, t, s)


class FlowMapUNet(_FeatureDivergence, TimeUNet):
    """TimeUNet with the second time s (its embedding zero-initialised) and a D head on the pooled mid block."""

    def __init__(self, cfg: FlowMapConfig, data_shape: tuple[int, ...], div_scale: float):
        TimeUNet.__init__(self, replace(cfg.backbone, second_time=True), data_shape)
        nn.init.zeros_(self.unet.class_embedding.linear_2.weight)
        nn.init.zeros_(self.unet.class_embedding.linear_2.bias)
        self._attach_head(cfg, div_scale)


class FlowMapDiT(_FeatureDivergence, TimeDiT):
    """TimeDiT with the second time s (its embedding zero-initialised) and a D head on the mean token."""

    def __init__(self, cfg: FlowMapConfig, data_shape: tuple[int, ...], div_scale: float):
        TimeDiT.__init__(self, replace(cfg.backbone, second_time=True), data_shape)
        self._attach_head(cfg, div_scale)


FLOWMAP_BACKBONES: dict[str, Callable[..., nn.Module]] = {  # model.backbone.name -> (cfg, data_shape, D scale)
    "mlp": lambda cfg, shape, scale: FlowMapMLP(cfg, math.prod(int(n) for n in shape), scale),
    "unet": FlowMapUNet,
    "dit": FlowMapDiT,
}


def build_flowmap(cfg: FlowMapConfig, data_shape: tuple[int, ...]) -> nn.Module:
    """Flow map on the backbone `cfg.backbone.name` names in FLOWMAP_BACKBONES: an MLP (any shape, flattened), a
    UNet or a DiT (square images)."""
    name = getattr(cfg.backbone, "name", None)
    if name not in FLOWMAP_BACKBONES:
        raise ValueError(f"model.backbone must be one of {', '.join(FLOWMAP_BACKBONES)}, got {cfg.backbone!r}")
    if cfg.head_hidden < 1 or cfg.head_time_dim < 1 or cfg.div_scale < 0 or cfg.time_scale <= 0:
        raise ValueError(f"model.head_hidden and model.head_time_dim must be >= 1, model.div_scale >= 0 and "
                         f"model.time_scale > 0, got {cfg.head_hidden}, {cfg.head_time_dim}, {cfg.div_scale} and "
                         f"{cfg.time_scale}")
    scale = cfg.div_scale or float(math.prod(int(n) for n in data_shape))
    return FLOWMAP_BACKBONES[name](cfg, data_shape, scale)


def _pairs(steps: int, grid: str, device: torch.device, dtype: torch.dtype,
           towards_noise: bool) -> list[tuple[Tensor, Tensor]]:
    """Consecutive (t, s) of the shared time grid: 1 -> 0 for sampling, reversed for likelihood."""
    times = time_grid(steps, grid, device=device, dtype=dtype)
    if towards_noise:
        times = times.flip(0)
    return list(zip(times[:-1], times[1:]))


def untrained_jumps(steps: int, grid: str, levels: int) -> list[tuple[float, float]]:
    """The jumps (t, s) of `time_grid(steps, grid)` that Shortcut training with `levels` never produces.

    Shortcut trains sizes 2^-k, k = 0..levels, starting on multiples of their size (`f2d2.losses.dyadic_pairs`).
    """
    times = time_grid(steps, grid, dtype=torch.float64).tolist()
    bad = []
    for s, t in zip(times[:-1], times[1:]):  # ascending t -> s
        size = s - t
        k = round(-math.log2(size)) if size > 0 else -1
        if not (0 <= k <= levels and abs(size - 2.0**-k) < 1e-12 and abs(t / size - round(t / size)) < 1e-9):
            bad.append((t, s))
    return bad


def jump(model: FlowMapFn, x: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """One map evaluation: X(x, t, s) and the log-density change (s - t) D = log p_s(X) - log p_t(x) (B,)."""
    t, s = t.expand(x.shape[0]), s.expand(x.shape[0])
    u, d = model(x, t, s)
    dt = (s - t).to(x.dtype)
    return x + dt.reshape(-1, *([1] * (x.dim() - 1))) * u, dt * d


@torch.no_grad()
def few_step_sample(model: FlowMapFn, noise: Tensor, steps: int, grid: str = "linear") -> tuple[SampleResult, Tensor]:
    """K jumps from noise (B, *shape) at t = 1 to samples at t = 0 (NFE = K) and the samples' model log p_0 (B,)."""
    x, logp = noise, standard_normal_logprob(noise)
    for t, s in _pairs(steps, grid, noise.device, noise.dtype, towards_noise=False):
        x, dlogp = jump(model, x, t, s)
        logp = logp + dlogp
    return SampleResult(x, steps), logp


@torch.no_grad()
def few_step_log_likelihood(model: FlowMapFn, x: Tensor, steps: int, grid: str = "linear") -> LikelihoodResult:
    """log p_0(x) (B,) in nats per sample from K jumps data -> noise, no Jacobian (NFE = K).

    log p_0(x) = log N(x_1; 0, I) - sum_k (s_k - t_k) D(x_k, t_k, s_k) with t_0 = 0 < ... < t_K = 1.
    """
    delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for t, s in _pairs(steps, grid, x.device, x.dtype, towards_noise=True):
        x, dlogp = jump(model, x, t, s)
        delta = delta + dlogp
    return LikelihoodResult(standard_normal_logprob(x) - delta, steps, x)


@torch.no_grad()
def naive_log_likelihood(model: FlowMapFn, x: Tensor, steps: int, grid: str = "linear", divergence: str = "auto",
                         probe: str = "rademacher", generator: torch.Generator | None = None) -> LikelihoodResult:
    """The invalid baseline without D: K Euler steps of the coupled ODE with the map's u in place of v.

    Along the same K jumps, log p_0(x) ~ log N(x_1) + sum_k (s_k - t_k) div_x u(x_k, t_k, s_k): the
    average velocity treated as instantaneous, its divergence taken at the K start points only. Costs
    K NFE plus K Jacobian traces (exact, or Hutchinson with one probe fixed for the solve).
    """
    kind = choose_divergence(divergence, x[0].numel())
    eps = make_probe(x, probe, generator) if kind == "hutchinson" else None
    delta = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for t, s in _pairs(steps, grid, x.device, x.dtype, towards_noise=True):
        tv, sv = t.expand(x.shape[0]), s.expand(x.shape[0])

        def field(y: Tensor, tt: Tensor) -> Tensor:
            return model(y, tt, sv)[0]

        u, div = divergence_exact(field, x, tv) if eps is None else divergence_hutchinson(field, x, tv, eps)
        x = x + (s - t) * u
        delta = delta + (s - t) * div
    return LikelihoodResult(standard_normal_logprob(x) + delta, steps, x)


class FlowMapSampler:
    """Sampling and log-likelihood of a flow map with K jumps (NFE = K); solvers and divergences do not apply.

    `trained_levels`: a Shortcut map's method.levels; grids asking for jumps it never trained are refused
    (None: every (t, s) was trained, as in MeanFlow).
    """

    exact_likelihood = False

    def __init__(self, nll_steps: int = 4, trained_levels: int | None = None):
        self.nll_steps, self.trained_levels = nll_steps, trained_levels

    def check_grid(self, steps: int, grid: str, what: str = "") -> None:
        """Raise ValueError when `steps` jumps on `grid` include a jump size this map was not trained on."""
        if self.trained_levels is None:
            return
        bad = untrained_jumps(steps, grid, self.trained_levels)
        if bad:
            t, s = bad[0]
            raise ValueError(
                f"{what or 'the'} {grid} grid with K = {steps} asks for the jump {t:g} -> {s:g} (size {s - t:g}), which "
                f"Shortcut training never produced: it trains sizes 2^-k (k = 0..{self.trained_levels}, method.levels) "
                f"starting on multiples of their size. Use the linear grid with K a power of two up to "
                f"{2 ** self.trained_levels}, or the geometric grid with K up to {self.trained_levels + 1}")

    def describe_sampling(self, model: nn.Module, steps: int, solver: str, grid: str) -> tuple[str, str]:
        """(file stem, words) of a draw: K jumps on a grid (no solver applies)."""
        return f"jumps{steps}-{grid}", f"{steps} jumps, {grid} grid"

    def prior_sample(self, n: int, shape: tuple[int, ...], device: torch.device | str,
                     generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise (n, *shape) at t = 1."""
        return torch.randn(n, *shape, device=device, generator=generator)

    def sample(self, model: nn.Module, noise: Tensor, steps: int = 8, solver: str = "euler",
               grid: str = "linear") -> SampleResult:
        """`steps` jumps of the map from t = 1 to 0 on `grid` (NFE = steps); `solver` does not apply."""
        self.check_grid(steps, grid)
        return few_step_sample(model, noise, steps, grid)[0]

    def log_likelihood(self, model: nn.Module, x: Tensor, divergence: str = "exact",
                       generator: torch.Generator | None = None, steps: int | None = None) -> LikelihoodResult:
        """Few-step log p (B,) in nats per sample with K = steps or nll_steps jumps; `divergence` does not apply."""
        self.check_grid(steps or self.nll_steps, "linear")
        return few_step_log_likelihood(model, x, steps or self.nll_steps)
