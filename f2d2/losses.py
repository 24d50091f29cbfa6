"""F2D2 training: Shortcut-F2D2 (midpoint self-consistency) and MeanFlow-F2D2 (Eulerian identity by one jvp).

Both train a joint flow map (u, D) of f2d2.flowmap (sign and scale of D are defined there) on
interpolant states x_t of shared.paths, for both orders of (t, s):

- Shortcut: tangent terms u(x,t,t) -> v and D(x,t,t) -> -div v, plus, on dyadic jumps t -> s with
  |s - t| = 2^-k, u(x,t,s) -> (u(x,t,r) + u(x_r,r,s)) / 2 and D likewise, r = (t+s)/2,
  x_r = x + (r-t) u(x,t,r), targets under stop-gradient; the finest level is one explicit midpoint
  step of the coupled (x, log p) ODE (`shortcut_targets` says why not two Euler half steps).
- MeanFlow: u = v + (s-t) du/dt and D = -div v + (s-t) dD/dt with d/dt = v.grad_x + d_t, both total
  derivatives from one torch.func.jvp of x, t, s -> (u, D) with tangents (v, 1, 0), in float32 and
  math attention, under no_grad (the targets are stop-gradient), then a plain forward for the loss.

v and div v come from a frozen teacher run (distill) or from z - x and the model's own tangent
u(., t, t) (self). D residuals are divided by the model's div_scale so the D terms are O(1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from f2d2.flowmap import FlowMapSampler
from shared.catalog import BuildContext
from shared.config import RunConfig
from shared.data import Dataset
from shared.likelihood import PROBES, choose_divergence, divergence_exact, divergence_hutchinson, make_probe
from shared.method import unwrap
from shared.paths import TIME_SAMPLERS, broadcast_time, interpolate, sample_times
from shared.run_build import require_same_data

VARIANTS = ("shortcut", "meanflow")
DIV_SOURCES = ("teacher", "self")


@dataclass
class F2D2Config:
    """Joint distillation of velocity and divergence into a flow map (`model.name: flowmap`)."""

    name: str = "f2d2"
    variant: str = "shortcut"  # shortcut (midpoint self-consistency) or meanflow (Eulerian identity, one jvp)
    teacher: str = ""  # run directory of a velocity-field run (FM / NFM student): v and div v; "" uses z - x
    div_source: str = "teacher"  # tangent divergence target: teacher (frozen) or self (the map's u(., t, t), stop-grad)
    divergence: str = "auto"  # exact, hutchinson, or auto (exact up to 64 dimensions)
    probe: str = "rademacher"  # Hutchinson probe: rademacher or gaussian (one per sample per step)
    d_weight: float = 1.0  # weight of the D terms; 0 trains u only (the stage before the joint one)
    levels: int = 6  # shortcut: jump sizes 2^0 ... 2^-levels
    boot_fraction: float = 0.5  # share of each batch on pairs s != t (the rest trains the tangent, s = t)
    time_sampler: str = "uniform"  # times t (and meanflow's s): uniform or logit_normal
    time_mean: float = 0.0  # logit-normal location
    time_std: float = 1.0  # logit-normal scale
    adaptive_p: float = 0.0  # meanflow: per-sample weight 1 / (sg(err) + 1e-3)^p (MeanFlow's adaptive loss); 0 is MSE
    nll_steps: int = 4  # K used by `log_likelihood`, i.e. by `flowdistill nll`
    nf_teacher: str = ""  # normalizing-flow run whose exact log p `f2d2-eval` reports next to the few-step one

    def data_noise(self) -> str:
        """F2D2 draws its own noise endpoint only; data noise comes from data.dequantize."""
        return ""

    def run_dependencies(self) -> dict[str, str]:
        """The velocity teacher (training) and the NF reference (evaluation only), when set."""
        return {k: v for k, v in (("teacher", self.teacher), ("nf_teacher", self.nf_teacher)) if v}


@contextlib.contextmanager
def _fp32_math(device: torch.device) -> Iterator[None]:
    """No autocast and math attention: forward-mode AD needs both (fused kernels lack jvp, bf16 jvp breaks)."""
    with torch.autocast(device_type=device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        yield


def dyadic_pairs(n: int, levels: int, device: torch.device, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(t, s, fine), each (n,): jumps of size 2^-k on the 2^-k grid, k uniform in 0..levels, either direction;
    `fine` marks the finest size 2^-levels."""
    k = torch.randint(0, levels + 1, (n,), device=device, generator=generator)
    d = torch.pow(2.0, -k.float())
    lo = torch.floor(torch.rand(n, device=device, generator=generator) * torch.pow(2.0, k.float())) * d
    forward = torch.rand(n, device=device, generator=generator) < 0.5
    t, s = torch.where(forward, lo, lo + d), torch.where(forward, lo + d, lo)
    return t, s, k == levels


def shortcut_targets(net: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, t: Tensor,
                     s: Tensor, fine: Tensor) -> tuple[Tensor, Tensor]:
    """Self-consistency targets (u*, D*) of the jumps t -> s from x (B, *shape), t, s, fine (B,); r = (t + s) / 2.

    Coarse jumps compose two half jumps of the map: x_r = x + (r - t) u(x, t, r) and
        u* = (u(x, t, r) + u(x_r, r, s)) / 2,   D* = (D(x, t, r) + D(x_r, r, s)) / 2.
    The finest jumps are one explicit midpoint (RK2) step of the coupled ODE with the map's tangent
    (v = u(., t, t), -div v = D(., t, t)): x_r = x + (r - t) v(x, t), u* = v(x_r, r), D* = -div v(x_r, r).
    Two Euler half steps would make the converged map the Euler discretisation, whose log-density
    increment h tr J exceeds the log det(I + h J) of its own x-step (by ~h^2 ||J||_F^2 / 2 per step for a
    gradient field), so the few-step log p would sit above a normalised density by O(h); the midpoint
    step matches the log det of its x-step to O(h^3) per step, leaving an O(h^2) total.
    """
    r = (t + s) / 2
    u1, d1 = net(x, t, torch.where(fine, t, r))
    u2, d2 = net(x + broadcast_time(r - t, x) * u1, r, torch.where(fine, r, s))
    u1, u2, d1, d2 = u1.float(), u2.float(), d1.float(), d2.float()
    return torch.where(broadcast_time(fine, u2), u2, (u1 + u2) / 2), torch.where(fine, d2, (d1 + d2) / 2)


class F2D2:
    """Loss object `(flow map, (x,), generator) -> (loss, logs)` of Shortcut- or MeanFlow-F2D2."""

    def __init__(self, cfg: F2D2Config, dim: int, teacher: nn.Module | None = None):
        self.cfg = cfg
        self.div_kind = choose_divergence(cfg.divergence, dim)
        self._teacher = None if teacher is None else teacher.eval().requires_grad_(False)

    # ------------------------------------------------------------------ targets

    def teacher(self, device: torch.device) -> nn.Module | None:
        """The frozen teacher velocity field on `device` (None without one)."""
        if self._teacher is not None:
            self._teacher = self._teacher.to(device)
        return self._teacher

    def divergence(self, field: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor,
                   generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """(field(x, t), div field (B,)), exact or Hutchinson with a fresh probe, both detached."""
        if self.div_kind == "exact":
            return divergence_exact(field, x, t)
        return divergence_hutchinson(field, x, t, make_probe(x, self.cfg.probe, generator))

    def tangent_targets(self, net: nn.Module, x: Tensor, z: Tensor, x_t: Tensor, t: Tensor,
                        generator: torch.Generator | None, need_div: bool) -> tuple[Tensor, Tensor | None]:
        """Velocity target (B, *shape) at (x_t, t) and, if asked, the D target -div v (B,), float32, detached."""
        teacher = self.teacher(x.device)
        x_t, t = x_t.float(), t.float()
        with _fp32_math(x.device):
            if need_div and self.cfg.div_source == "teacher":
                v, div = self.divergence(teacher, x_t, t, generator)
                return v, -div
            with torch.no_grad():
                v = teacher(x_t, t) if teacher is not None else (z - x).float()
            if not need_div:
                return v, None
            _, div = self.divergence(lambda y, tt: net(y, tt, tt)[0], x_t, t, generator)
        return v, -div

    # ------------------------------------------------------------------ losses

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """Sum of the u terms and d_weight times the D terms; logs every term."""
        x = batch[0]
        z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        terms = (self._shortcut if self.cfg.variant == "shortcut" else self._meanflow)(model, x, z, generator)
        keep = terms.pop("_keep", 0.0)
        u_loss = sum(v for k, v in terms.items() if k.startswith("u_"))
        d_loss = sum(v for k, v in terms.items() if k.startswith("d_"))
        return u_loss + self.cfg.d_weight * d_loss + keep, {k: v.detach() for k, v in terms.items()}

    def _d_residual(self, net: nn.Module, d: Tensor, target: Tensor) -> Tensor:
        """(D - target) / div_scale (B,): the head-scale residual."""
        return (d.float() - target) / unwrap(net).div_scale

    def _shortcut(self, model: nn.Module, x: Tensor, z: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        cfg, net = self.cfg, unwrap(model)
        n = x.shape[0]
        nb = min(max(round(n * cfg.boot_fraction), 1), n - 1)
        nt = n - nb
        need_div = cfg.d_weight > 0
        t_tan = sample_times(nt, cfg.time_sampler, x.device, generator, cfg.time_mean, cfg.time_std)
        x_tan = interpolate(x[:nt], z[:nt], t_tan)
        v_tan, negdiv = self.tangent_targets(net, x[:nt], z[:nt], x_tan, t_tan, generator, need_div)
        t, s, fine = dyadic_pairs(nb, cfg.levels, x.device, generator)
        x_b = interpolate(x[nt:], z[nt:], t)
        with torch.no_grad(), _fp32_math(x.device):
            u_boot, d_boot = shortcut_targets(net, x_b.float(), t, s, fine)
        u, d = model(torch.cat([x_tan, x_b]), torch.cat([t_tan, t]), torch.cat([t_tan, s]))
        u = u.float()
        terms = {"u_tangent": (u[:nt] - v_tan).pow(2).mean(), "u_boot": (u[nt:] - u_boot).pow(2).mean()}
        if need_div:
            terms["d_tangent"] = self._d_residual(net, d[:nt], negdiv).pow(2).mean()
            terms["d_boot"] = self._d_residual(net, d[nt:], d_boot).pow(2).mean()
        else:
            terms["_keep"] = 0.0 * d.float().mean()  # keeps the untrained head in the graph (DDP)
        return terms

    def _meanflow(self, model: nn.Module, x: Tensor, z: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        cfg, net = self.cfg, unwrap(model)
        n = x.shape[0]
        need_div = cfg.d_weight > 0
        t = sample_times(n, cfg.time_sampler, x.device, generator, cfg.time_mean, cfg.time_std)
        s = sample_times(n, cfg.time_sampler, x.device, generator, cfg.time_mean, cfg.time_std)
        s = torch.where(torch.rand(n, device=x.device, generator=generator) < cfg.boot_fraction, s, t)
        x_t = interpolate(x, z, t)
        v, negdiv = self.tangent_targets(net, x, z, x_t, t, generator, need_div)
        with torch.no_grad(), _fp32_math(x.device):
            _, (du, dd) = torch.func.jvp(net, (x_t.float(), t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
        u, d = model(x_t, t, s)
        u_err = (u.float() - (v + broadcast_time(s - t, v) * du)).pow(2).reshape(n, -1).mean(1)
        terms = {"u_meanflow": self._weighted(u_err)}
        if need_div:
            terms["d_meanflow"] = self._weighted(self._d_residual(net, d, negdiv + (s - t) * dd).pow(2))
        else:
            terms["_keep"] = 0.0 * d.float().mean()  # keeps the untrained head in the graph (DDP)
        return terms

    def _weighted(self, err: Tensor) -> Tensor:
        """Batch mean of per-sample squared errors (B,), with MeanFlow's adaptive weights when adaptive_p > 0."""
        if self.cfg.adaptive_p == 0:
            return err.mean()
        return (err / (err.detach() + 1e-3).pow(self.cfg.adaptive_p)).mean()


def validate(cfg: F2D2Config) -> None:
    """Raise ValueError for settings outside the listed choices or ranges."""
    for key, value, choices in (("variant", cfg.variant, VARIANTS), ("div_source", cfg.div_source, DIV_SOURCES),
                                ("probe", cfg.probe, PROBES), ("time_sampler", cfg.time_sampler, TIME_SAMPLERS)):
        if value not in choices:
            raise ValueError(f"unknown method.{key} {value!r}; choices: {', '.join(choices)}")
    if cfg.div_source == "teacher" and not cfg.teacher and cfg.d_weight > 0:
        raise ValueError("method.div_source=teacher needs method.teacher=<run dir>; or set method.div_source=self")
    if cfg.levels < 0 or cfg.nll_steps < 1 or cfg.d_weight < 0 or cfg.adaptive_p < 0:
        raise ValueError("method.levels, method.d_weight and method.adaptive_p must be >= 0, method.nll_steps >= 1")
    if cfg.variant == "shortcut":  # `flowdistill nll` uses K = nll_steps jumps on the linear grid
        FlowMapSampler(cfg.nll_steps, cfg.levels).check_grid(cfg.nll_steps, "linear", "method.nll_steps: the")
    if not 0 < cfg.boot_fraction < 1:
        raise ValueError(f"method.boot_fraction must lie in (0, 1), got {cfg.boot_fraction}")


def check_init_embeds_time_as_teacher(teacher: str, teacher_model: Any, run_cfg: RunConfig) -> None:
    """A map initialised from its teacher's weights (`train.init_from` = `method.teacher`) must embed time as the
    teacher did (`time_embed_scale`), or it starts from a different field than the teacher's."""
    backbone = getattr(run_cfg.model, "backbone", None)
    if not run_cfg.train.init_from or Path(run_cfg.train.init_from).resolve() != Path(teacher).resolve():
        return
    ours, theirs = getattr(backbone, "time_embed_scale", None), getattr(teacher_model, "time_embed_scale", None)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(f"train.init_from={run_cfg.train.init_from} is the teacher, whose model.time_embed_scale is "
                         f"{theirs:g}, but model.backbone.time_embed_scale is {ours:g}: the map would start from a "
                         f"different field; set model.backbone.time_embed_scale={theirs:g}")


def build_f2d2_loss(cfg: F2D2Config, ctx: BuildContext) -> F2D2:
    """The `f2d2` method's loss (needs `model.name: flowmap`); loads the velocity teacher run when set."""
    check_f2d2(cfg, ctx.run_config)
    teacher = None
    if cfg.teacher:
        run = ctx.load_run(cfg.teacher)
        if run.config.model.name == "flowmap":
            raise ValueError(f"method.teacher={cfg.teacher} is a flow map; the teacher must be a velocity field "
                             "(an fm run)")
        require_same_data(cfg.teacher, run.dataset.base_fingerprint, ctx.dataset, "method.teacher")
        check_init_embeds_time_as_teacher(cfg.teacher, run.config.model, ctx.run_config)
        teacher = run.model
    return F2D2(cfg, ctx.dataset.dim, teacher)


def build_f2d2_sampler(cfg: F2D2Config, run_cfg: RunConfig, dataset: Dataset) -> FlowMapSampler:
    """The `f2d2` method's sampler: K jumps of the map for samples and for log p (K = cfg.nll_steps)."""
    check_f2d2(cfg, run_cfg)
    return FlowMapSampler(cfg.nll_steps, cfg.levels if cfg.variant == "shortcut" else None)


def check_f2d2(cfg: F2D2Config, run_cfg: RunConfig) -> None:
    """Raise ValueError unless the run trains a flow map with valid F2D2 settings."""
    if run_cfg.model.name != "flowmap":
        raise ValueError(f"method f2d2 trains a flow map: set model.name: flowmap (got {run_cfg.model.name!r})")
    validate(cfg)
