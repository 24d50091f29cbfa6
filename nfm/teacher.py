"""The normalizing-flow teacher as a method: maximum-likelihood training, AR sampling, exact likelihood.

Training minimises the NLL of perturbed data, -log p(x~) / D in nats per dimension, where
x~ = x + eta * eps with the model's `eta` (the value NFM couplings must reuse, saved in the model
config), or x~ = x + uniform cell noise for dequantized likelihood runs (`dequantize`, eta = 0).
Sampling decodes prior noise and, by default, takes one Tweedie step through the flow itself,
x^ = x + eta^2 grad_x log p(x). The likelihood is exact: log p(x) = log N(f(x); 0, I) + log|det df/dx|.

NFE of the teacher counts sequential transformer passes: an encode is 1 (all tokens in parallel),
a decode is T * (N - 1) (one block, one token per pass) and a denoising step is 2 (encode forward
and backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfm.flow_interface import FlowTeacher, is_flow_config
from nfm.glow import GlowConfig
from nfm.tarflow import TarFlowConfig
from shared.catalog import BuildContext
from shared.data import Dataset, bits_per_dim, dequantize, model_to_image
from shared.config import RunConfig
from shared.likelihood import LikelihoodResult
from shared.method import unwrap
from shared.paths import standard_normal_logprob
from shared.sampling import SampleResult

LEVELED_FLOWS = (TarFlowConfig, GlowConfig)  # flow families with intermediate latents (`encode_with_levels`)


@dataclass
class TeacherConfig:
    """Maximum-likelihood training of a normalizing flow (TarFlow or Glow) and how it samples."""

    name: str = "nll"
    dequantize: bool = False  # uniform dequantization (likelihood runs, needs model.eta=0); else x + eta*eps
    denoise: bool = True  # one Tweedie step x + eta^2 grad log p(x) after sampling (nothing to do when eta = 0)
    guidance: float = 0.0  # classifier-free guidance weight w on (alpha, mu) when sampling a conditional model
    temperature: float = 1.0  # std of the prior noise that sampling decodes

    def data_noise(self) -> str:
        """The teacher perturbs its own training data (dequantization or x + eta*eps)."""
        return "method.dequantize or the model's x + eta*eps"

    def run_dependencies(self) -> dict[str, str]:
        """A teacher depends on no other run."""
        return {}


def flow_of(model: nn.Module) -> nn.Module:
    """The normalizing flow (a `FlowTeacher`: TarFlow, Glow or a user's flow) inside DDP / Accelerate wrappers;
    anything else is refused."""
    flow = unwrap(model)
    if not isinstance(flow, FlowTeacher):
        raise TypeError(f"the nll method needs a normalizing flow (tarflow, glow or user_flow), got "
                        f"{type(flow).__name__}")
    return flow


def log_prob(flow: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log p(x) (B,) in nats per sample by the change of variables, and z = f(x); `flow` may be wrapped."""
    z, logdet = flow(x, y=y)
    return standard_normal_logprob(z.to(logdet.dtype)) + logdet, z


def tweedie_denoise(flow: nn.Module, x: Tensor, eta: float, y: Tensor | None = None) -> Tensor:
    """x + eta^2 grad_x log p(x): the posterior mean of clean data under noise of std eta (one score step)."""
    with torch.enable_grad():
        x = x.detach().float().requires_grad_(True)
        logp, _ = log_prob(flow, x, y)
        (score,) = torch.autograd.grad(logp.sum(), x)
    return (x + eta**2 * score).detach()


class TeacherNLL:
    """Loss object `(model, (x[, y]), generator) -> (NLL nats/dim, logs)`: -log p(x~) / D, x~ the perturbed data."""

    def __init__(self, cfg: TeacherConfig, levels: int | None):
        self.cfg, self.levels = cfg, levels

    def perturb(self, flow: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training input: dequantized x, or x + eta * eps with the model's eta."""
        if self.cfg.dequantize:
            return dequantize(x, self.levels, generator)
        if flow.eta == 0:
            return x
        return x + flow.eta * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean NLL in nats per dimension; logs `bpd` (of the perturbed data) for quantized data."""
        flow = flow_of(model)
        x = batch[0]
        y = None
        if flow.num_classes and len(batch) > 1:
            y = batch[1]
            drop = torch.rand(y.shape, generator=generator, device=y.device) < flow.cfg.label_dropout
            y = torch.where(drop, torch.full_like(y, flow.num_classes), y)
        logp, z = log_prob(model, self.perturb(flow, x, generator), y)
        dim = x[0].numel()
        nll = -logp.mean()
        logs = {"z_rms": z.detach().float().pow(2).mean().sqrt()}
        if self.levels is not None:
            logs["bpd"] = bits_per_dim(nll.detach(), dim, self.levels)
        return nll / dim, logs


class TeacherSampler:
    """Decoding (autoregressive for TarFlow, one pass for Glow), one Tweedie step, and the exact likelihood."""

    exact_likelihood = True

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg

    def prior_sample(self, n: int, shape: tuple[int, ...], device: torch.device | str,
                     generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise (n, *shape); `sample` scales it by the temperature."""
        return torch.randn(n, *shape, device=device, generator=generator)

    def sample(self, model: nn.Module, noise: Tensor, steps: int = 8, solver: str = "euler",
               grid: str = "linear", labels: Tensor | None = None) -> SampleResult:
        """Decode prior noise (`scale_prior_noise` of `noise` (B, *shape), times the temperature) with the KV
        cache, then denoise; `steps`, `solver`, `grid` do not apply.

        Conditional models sample `labels`, by default 0, 1, ..., C-1 repeated along the batch.
        """
        flow = flow_of(model)
        if flow.num_classes and labels is None:
            labels = torch.arange(noise.shape[0], device=noise.device) % flow.num_classes
        x = flow.decode(flow.scale_prior_noise(noise) * self.cfg.temperature, labels, use_cache=True,
                        guidance=self.cfg.guidance)
        nfe = flow.decode_passes
        if self.cfg.denoise and flow.eta > 0:
            x = tweedie_denoise(flow, x, flow.eta, labels)
            nfe += 2
        return SampleResult(x, nfe)

    def describe_sampling(self, model: nn.Module, steps: int, solver: str, grid: str) -> tuple[str, str]:
        """(file stem, words) of a draw: one decode, plus the Tweedie step when it applies; steps, solver and
        grid do not apply, so they are not in the name."""
        denoised = self.cfg.denoise and flow_of(model).eta > 0
        return ("decode-denoised", "decode + Tweedie denoising") if denoised else ("decode", "decode")

    @torch.no_grad()
    def log_likelihood(self, model: nn.Module, x: Tensor, divergence: str = "exact",
                       generator: torch.Generator | None = None, labels: Tensor | None = None) -> LikelihoodResult:
        """Exact log p(x) (B,) in nats per sample from one parallel encode (`divergence` does not apply).

        Conditional models score the null-class density unless `labels` are given. A teacher trained
        with noise augmentation scores the density of eta-perturbed data.
        """
        logp, z = log_prob(flow_of(model), x, labels)
        return LikelihoodResult(logp, 1, z)


def categorical_baseline_bpd(dataset: Dataset) -> float:
    """Test bits/dim of independent per-dimension level histograms fit on the train split (add-one smoothing)."""
    if dataset.levels is None:
        raise ValueError(f"data set {dataset.name!r} is not quantized; a categorical baseline needs levels")
    levels = dataset.levels
    train = model_to_image(dataset.train, levels).long().reshape(len(dataset.train), -1)
    test = model_to_image(dataset.test, levels).long().reshape(len(dataset.test), -1)
    counts = F.one_hot(train, levels).sum(0).double() + 1
    log_p = (counts / counts.sum(1, keepdim=True)).log()
    return (-log_p.gather(1, test.T).mean() / math.log(2)).item()


def build_teacher_loss(cfg: TeacherConfig, ctx: BuildContext) -> TeacherNLL:
    """The `nll` method's loss (the model must be a normalizing flow: tarflow or glow)."""
    check_teacher(cfg, ctx.run_config, ctx.dataset)
    return TeacherNLL(cfg, ctx.dataset.levels)


def build_teacher_sampler(cfg: TeacherConfig, run_cfg: RunConfig, dataset: Dataset) -> TeacherSampler:
    """The `nll` method's sampler: decoding and exact likelihood."""
    check_teacher(cfg, run_cfg, dataset)
    return TeacherSampler(cfg)


def check_teacher(cfg: TeacherConfig, run_cfg: RunConfig, dataset: Dataset) -> None:
    """Raise ValueError for a model, data set or setting the `nll` method cannot use."""
    model = run_cfg.model
    if not is_flow_config(model):
        raise ValueError("method nll trains a normalizing flow: set model.name: tarflow, glow or user_flow (a model "
                         f"whose config declares flow_layers()) (got {model.name!r})")
    if cfg.dequantize and dataset.levels is None:
        raise ValueError(f"method.dequantize needs quantized (image) data; {dataset.name!r} is continuous")
    if cfg.dequantize and getattr(model, "eta", 0.0) > 0:
        raise ValueError(f"method.dequantize replaces noise augmentation: set model.eta=0 (got {model.eta})")
    if cfg.temperature <= 0:
        raise ValueError(f"method.temperature must be > 0, got {cfg.temperature}")
    if getattr(model, "num_classes", 0):
        if dataset.train_labels is None:
            raise ValueError(f"model.num_classes={model.num_classes} but data set {dataset.name!r} has no labels")
        if int(dataset.train_labels.max()) >= model.num_classes:
            raise ValueError(f"labels of {dataset.name!r} reach {int(dataset.train_labels.max())}; "
                             f"set model.num_classes >= {int(dataset.train_labels.max()) + 1}")
    elif cfg.guidance:
        raise ValueError("method.guidance needs a class-conditional model (model.num_classes > 0)")
