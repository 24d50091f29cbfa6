"""The application's component tables: every model, method and coupling a recipe can name.

Adding a component means writing its module (config dataclass + builder) and one line here. Nothing
registers itself on import; `CATALOG` is passed down to `shared.run` and `shared.config`.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from f2d2.flowmap import FlowMapConfig, build_flowmap
from f2d2.losses import F2D2Config, build_f2d2_loss, build_f2d2_sampler
from nfm.couplings import (IndependentConfig, IndependentCoupling, MinibatchOTConfig, MinibatchOTCoupling,
                           SemidiscreteOTConfig, SemidiscreteOTCoupling)
from nfm.glow import GlowConfig, build_glow
from nfm.losses import FlowMatchingConfig, build_flow_matching_loss, build_velocity_sampler
from nfm.nf_kd import NFKDConfig, build_nfkd_loss, build_nfkd_sampler
from nfm.tarflow import TarFlowConfig, build_tarflow
from nfm.teacher import TeacherConfig, build_teacher_loss, build_teacher_sampler
from nfm.teacher_coupling import NFTeacherConfig, NFTeacherCoupling, NFTeacherOTCoupling
from nfm.user_flow import UserFlowConfig, build_user_flow
from shared.backbones import MLPConfig, UNetConfig, build_mlp, build_unet
from shared.catalog import Catalog, Choice, MethodChoice
from shared.dit import DiTConfig, build_dit
from shared.ensemble import EnsembleConfig, build_ensemble

VELOCITY_FIELDS: dict[str, Choice] = {  # the flow map's backbone (model.backbone), an ensemble's member (model.member)
    "mlp": Choice(MLPConfig, build_mlp),  # velocity field on vectors or flattened images
    "unet": Choice(UNetConfig, build_unet),  # diffusers UNet2DModel velocity field on images
    "dit": Choice(DiTConfig, build_dit),  # diffusers DiTTransformer2DModel (DiT/SiT-style) velocity field on images
}

MODELS: dict[str, Choice] = {
    **VELOCITY_FIELDS,
    "ensemble": Choice(EnsembleConfig, partial(  # averaged velocity fields trained apart (`flowdistill ensemble`)
        build_ensemble, members={name: choice.build for name, choice in VELOCITY_FIELDS.items()})),
    "tarflow": Choice(TarFlowConfig, build_tarflow),  # transformer autoregressive normalizing flow
    "glow": Choice(GlowConfig, build_glow),  # multi-scale Glow normalizing flow
    "user_flow": Choice(UserFlowConfig, build_user_flow),  # a user's own flow class, by import path (save_teacher)
    "flowmap": Choice(FlowMapConfig, build_flowmap),  # F2D2 flow map (u, D) on an mlp, unet or dit backbone
}

METHODS: dict[str, MethodChoice] = {
    "fm": MethodChoice(FlowMatchingConfig, build_flow_matching_loss, build_velocity_sampler),  # flow matching
    "nll": MethodChoice(TeacherConfig, build_teacher_loss, build_teacher_sampler),  # maximum likelihood (flows)
    "f2d2": MethodChoice(F2D2Config, build_f2d2_loss, build_f2d2_sampler),  # flow map with divergence head
    "nf_kd": MethodChoice(NFKDConfig, build_nfkd_loss, build_nfkd_sampler),  # compact flow distilled from a flow
}

COUPLINGS: dict[str, Choice] = {
    "independent": Choice(IndependentConfig, IndependentCoupling.from_config),
    "minibatch_ot": Choice(MinibatchOTConfig, MinibatchOTCoupling.from_config),
    "semidiscrete_ot": Choice(SemidiscreteOTConfig, SemidiscreteOTCoupling.from_config),
    "nf_teacher": Choice(NFTeacherConfig, NFTeacherCoupling.from_config),  # NFM
    "nf_teacher_ot": Choice(NFTeacherConfig, NFTeacherOTCoupling.from_config),  # NFM-OT
}

PRETRAINED_ROOT = Path(__file__).resolve().parent / "pretrained"
PRETRAINED: dict[str, Path] = {  # packed runs shipped with the package (`pretrained:<name>`, flowdistill.packed)
    "digits-tarflow": PRETRAINED_ROOT / "digits-tarflow",  # recipes/digits/teacher.yaml: the digits NFM teacher
    "mnist-tarflow-bpd": PRETRAINED_ROOT / "mnist-tarflow-bpd",  # recipes/mnist/teacher_bpd_bf16.yaml: MNIST-5k, 1.39 bpd
}

CATALOG = Catalog(models=MODELS, methods=METHODS, nested={"method.coupling": COUPLINGS,
                                                   "model.backbone": VELOCITY_FIELDS, "model.member": VELOCITY_FIELDS},
                  named_runs=PRETRAINED)


def needs_teacher(coupling: str) -> bool:
    """Whether a coupling's pairs come from a teacher run, read from its config's `run_dependencies()` (the one
    place that answers it; no list of names)."""
    return "teacher" in COUPLINGS[coupling].config().run_dependencies()
