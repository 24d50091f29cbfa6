"""Knowledge distillation of normalizing flows (method `nf_kd`): a compact student flow of the teacher's family.

The student (a TarFlow with fewer blocks or a narrower width, or a Glow with fewer steps per level) is
trained with its own maximum likelihood plus terms that use the invertibility of both flows, on the
same perturbed data x~ (dequantized, or x + eta*eps as the teacher was trained):

    L = w_nll * NLL_s(x~) / D                                           nats per dimension
      + w_latent * mean |z_s(x~) - z_t(x~)|^2                           final latents, per dimension
      + w_inter * mean_j mean |h_s,j(x~) - h_t,m(j)(x~)|^2              intermediate outputs, mapped
      + w_synth * mean |f_s^{-1}(z) - f_t^{-1}(z)|_p,  z ~ N(0, T^2 I)   samples of the same noise (Glow)

with w_* >= 0 summing to 1. h_s,j is the output of the student's block (TarFlow) or level (Glow) j and
m(j) the teacher's block or level it stands for (`mapping`, validated: same shapes, increasing, last to
last). The teacher is frozen and run without grad; the synthesized term backpropagates through the
student's inverse. With w_nll = 1 the loss is exactly the undistilled student's (`nll` method).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nfm.teacher import LEVELED_FLOWS, TeacherConfig, TeacherNLL, TeacherSampler, flow_of, log_prob
from shared.catalog import BuildContext
from shared.config import RunConfig
from shared.data import Dataset
from shared.paths import standard_normal_logprob
from shared.run_build import require_same_data

SYNTH_NORMS = ("l1", "l2")


@dataclass
class NFKDConfig:
    """Distillation of a trained flow teacher into a compact student of the same family."""

    name: str = "nf_kd"
    teacher: str = ""  # run directory of the trained teacher flow (same family and eta as the student)
    nll_weight: float = 0.9  # weight of the student's own NLL
    latent_weight: float = 0.1  # weight of final-latent matching
    intermediate_weight: float = 0.0  # weight of intermediate-output matching at `mapping`
    synth_weight: float = 0.0  # weight of sample-space matching (Glow students)
    mapping: tuple[int, ...] = ()  # teacher block/level index for each student block/level (default: Glow levels 1:1)
    synth_norm: str = "l1"  # l1 or l2 distance between the two flows' samples
    synth_batch: int = 16  # noise vectors decoded per step for the synthesized term
    synth_temperature: float = 1.0  # std of that noise
    dequantize: bool = False  # uniform dequantization (likelihood runs, model.eta = 0); else x + eta*eps
    denoise: bool = True  # sampling: one Tweedie step when eta > 0 (as the teacher)
    guidance: float = 0.0  # sampling: unused by unconditional students
    temperature: float = 1.0  # sampling: std of the prior noise

    def data_noise(self) -> str:
        """Like the teacher, the student perturbs its own training data."""
        return "method.dequantize or the model's x + eta*eps"

    def run_dependencies(self) -> dict[str, str]:
        """The teacher run (training only)."""
        return {"teacher": self.teacher}


def check_weights(cfg: NFKDConfig) -> None:
    """The four weights form a convex combination; the synthesized settings are valid."""
    weights = (cfg.nll_weight, cfg.latent_weight, cfg.intermediate_weight, cfg.synth_weight)
    if min(weights) < 0 or not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"method.nll_weight, latent_weight, intermediate_weight and synth_weight must be >= 0 and "
                         f"sum to 1 (a convex combination), got {weights} (sum {sum(weights):.6g})")
    if cfg.synth_norm not in SYNTH_NORMS:
        raise ValueError(f"unknown method.synth_norm {cfg.synth_norm!r}; choices: {', '.join(SYNTH_NORMS)}")
    if cfg.synth_batch < 1 or cfg.synth_temperature <= 0:
        raise ValueError("method.synth_batch must be >= 1 and method.synth_temperature > 0")


def check_mapping(mapping: tuple[int, ...], student: list[Tensor], teacher: list[Tensor]) -> None:
    """Refuse a student -> teacher mapping of intermediate outputs that cannot be matched, saying why."""
    if len(mapping) != len(student):
        raise ValueError(f"method.mapping has {len(mapping)} entries; the student has {len(student)} blocks/levels "
                         f"(one teacher index per student block/level, e.g. {list(range(len(teacher)))[-len(student):]})")
    if any(b <= a for a, b in zip(mapping, mapping[1:])) or min(mapping) < 0:
        raise ValueError(f"method.mapping {list(mapping)} must be strictly increasing teacher indices >= 0")
    if mapping[-1] != len(teacher) - 1:
        raise ValueError(f"method.mapping {list(mapping)} must map the student's last block/level to the teacher's "
                         f"last ({len(teacher) - 1})")
    for j, t in enumerate(mapping):
        if tuple(student[j].shape[1:]) != tuple(teacher[t].shape[1:]):
            raise ValueError(f"method.mapping: student output {j} has shape {tuple(student[j].shape[1:])}, teacher "
                             f"output {t} has {tuple(teacher[t].shape[1:])}; mapped outputs must have the same shape")


class NFKD:
    """Loss object `(student, (x[, y]), generator) -> (loss, logs)` of flow distillation (see the module)."""

    def __init__(self, cfg: NFKDConfig, teacher: nn.Module, levels: int | None):
        self.cfg = cfg
        self.teacher = teacher.eval().requires_grad_(False)
        self.own = TeacherNLL(TeacherConfig(dequantize=cfg.dequantize), levels)
        self.mapping: tuple[int, ...] | None = None

    def _mapping(self, student: list[Tensor], teacher: list[Tensor]) -> tuple[int, ...]:
        if self.mapping is None:
            mapping = self.cfg.mapping or tuple(range(len(teacher)))
            check_mapping(mapping, student, teacher)
            self.mapping = mapping
        return self.mapping

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...], generator: torch.Generator
                 ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, student = self.cfg, flow_of(model)
        self.teacher.to(batch[0].device)
        x = self.own.perturb(student, batch[0], generator)
        dim = x[0].numel()
        if cfg.latent_weight == 0 and cfg.intermediate_weight == 0:
            logp, z_s = log_prob(model, x)
            levels_s = []
        else:
            z_s, logdet, levels_s = student.encode_with_levels(x)
            logp = standard_normal_logprob(z_s.to(logdet.dtype)) + logdet
        nll = -logp.mean() / dim
        loss, logs = cfg.nll_weight * nll, {"nll": nll.detach()}
        if cfg.latent_weight or cfg.intermediate_weight:
            with torch.no_grad():
                z_t, _, levels_t = self.teacher.encode_with_levels(x)
            latent = (z_s - z_t).pow(2).mean()
            mapping = self._mapping(levels_s, levels_t)
            inter = torch.stack([(levels_s[j] - levels_t[t]).pow(2).mean() for j, t in enumerate(mapping)]).mean()
            loss = loss + cfg.latent_weight * latent + cfg.intermediate_weight * inter
            logs.update(latent_mse=latent.detach(), intermediate_mse=inter.detach())
        if cfg.synth_weight:
            noise = cfg.synth_temperature * torch.randn(cfg.synth_batch, *x.shape[1:], device=x.device,
                                                        generator=generator)
            with torch.no_grad():
                x_t = self.teacher.decode(noise)
            diff = student.inverse(noise) - x_t
            synth = diff.abs().mean() if cfg.synth_norm == "l1" else diff.pow(2).mean()
            loss = loss + cfg.synth_weight * synth
            logs["synth"] = synth.detach()
        return loss, logs


def build_nfkd_loss(cfg: NFKDConfig, ctx: BuildContext) -> NFKD:
    """The `nf_kd` loss: loads the teacher run, checks family, data and weights."""
    check_nfkd(cfg, ctx.run_config, ctx.dataset)
    if not cfg.teacher:
        raise ValueError("method nf_kd needs method.teacher=<run directory of a trained flow teacher>")
    run = ctx.load_run(cfg.teacher)
    if type(run.config.model) is not type(ctx.run_config.model):
        raise ValueError(f"method.teacher={cfg.teacher} is a {run.config.model.name} flow; the student is a "
                         f"{ctx.run_config.model.name}: distillation keeps the family")
    require_same_data(cfg.teacher, run.dataset.base_fingerprint, ctx.dataset, "method.teacher")
    if float(run.model.eta) != float(ctx.run_config.model.eta):
        raise ValueError(f"the teacher was trained with eta={run.model.eta}, the student has model.eta="
                         f"{ctx.run_config.model.eta}: they must model the same perturbed density")
    alphas = (getattr(run.config.model, "logit_alpha", 0.0), getattr(ctx.run_config.model, "logit_alpha", 0.0))
    if float(alphas[0]) != float(alphas[1]):
        raise ValueError(f"the teacher's blocks see logit_alpha={alphas[0]}, the student has model.logit_alpha="
                         f"{alphas[1]}: latent matching needs both flows to start from the same logit map")
    return NFKD(cfg, run.model, ctx.dataset.levels)


def build_nfkd_sampler(cfg: NFKDConfig, run_cfg: RunConfig, dataset: Dataset) -> TeacherSampler:
    """The student samples and scores like any flow of its family (exact likelihood)."""
    check_nfkd(cfg, run_cfg, dataset)
    return TeacherSampler(cfg)


def check_nfkd(cfg: NFKDConfig, run_cfg: RunConfig, dataset: Dataset) -> None:
    """Raise ValueError for a model or setting `nf_kd` cannot use."""
    if not isinstance(run_cfg.model, LEVELED_FLOWS):
        raise ValueError(f"method nf_kd trains a normalizing-flow student whose intermediate latents it matches: "
                         f"set model.name: tarflow or glow (got {run_cfg.model.name!r})")
    check_weights(cfg)
    if cfg.synth_weight and run_cfg.model.name != "glow":
        raise ValueError("method.synth_weight > 0 needs a glow student (its inverse is one differentiable pass; "
                         "a tarflow decodes token by token)")
    if cfg.dequantize and dataset.levels is None:
        raise ValueError(f"method.dequantize needs quantized (image) data; {dataset.name!r} is continuous")
    if cfg.dequantize and run_cfg.model.eta > 0:
        raise ValueError(f"method.dequantize replaces noise augmentation: set model.eta=0 (got {run_cfg.model.eta})")

