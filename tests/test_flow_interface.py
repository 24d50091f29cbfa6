"""The flow-teacher interface (`nfm.flow_interface.FlowTeacher`) is what TarFlow, Glow and imported flows implement."""
from __future__ import annotations

import math

import pytest
import torch

from nfm.flow_interface import FlowTeacher
from nfm.glow import Glow, GlowConfig
from nfm.ml_tarflow import MLTarFlowShape, tarflow_config
from nfm.tarflow import TarFlow, TarFlowConfig
from shared.backbones import MLPConfig, build_mlp
from shared.paths import standard_normal_logprob


def flows() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    imported = TarFlow(tarflow_config(MLTarFlowShape(1, 8, 2, 64, 2, 1, 3), 0.05), (1, 8, 8))
    for p in imported.parameters():  # an untrained flow is the identity: make every block act
        p.data.add_(0.05 * torch.randn_like(p))
    return [TarFlow(TarFlowConfig(width=32, head_dim=16, blocks=2, eta=0.1), (1, 8, 8)), Glow(GlowConfig(), (1, 8, 8)),
            imported]


def test_tarflow_glow_and_imported_flows_implement_the_interface():
    for flow in flows():
        assert isinstance(flow, FlowTeacher)
        x = torch.rand(3, 1, 8, 8) * 2 - 1
        with torch.no_grad():
            z, logdet = flow.encode(x)
            back = flow.decode(z)
        assert z.shape == x.shape and logdet.shape == (3,)
        assert (back - x).abs().max() < 1e-4  # decode inverts encode
        assert flow.scale_prior_noise(z).shape == z.shape
        # log|det| in nats per sample: the density integrates like one built from an explicit Jacobian
        jac = torch.autograd.functional.jacobian(lambda v: flow.encode(v.reshape(1, 1, 8, 8))[0].flatten(), x[0].flatten())
        assert math.isclose(torch.linalg.slogdet(jac.double())[1].item(), logdet[0].item(), rel_tol=1e-3, abs_tol=1e-3)
        assert standard_normal_logprob(z).shape == (3,)


def test_a_velocity_field_is_not_a_flow_teacher():
    assert not isinstance(build_mlp(MLPConfig(), (2,)), FlowTeacher)


def test_flow_families_are_recognised_by_their_config_interface_not_their_names():
    """A model config is a flow when it declares `flow_layers()`; the nll method and the pipeline's depth column
    read that, so a new family needs no list edited."""
    from dataclasses import dataclass

    from flowdistill.components import MODELS
    from flowdistill.stages.compact import depth
    from nfm.flow_interface import is_flow_config
    from nfm.teacher import TeacherConfig, check_teacher
    from shared.config import RunConfig

    flows = {name for name, choice in MODELS.items() if is_flow_config(choice.config())}
    assert flows == {"tarflow", "glow", "user_flow"}

    @dataclass
    class RingFlowConfig:  # a third family, known to nothing but itself
        name: str = "ringflow"
        rings: int = 3

        def flow_layers(self) -> int:
            return 2 * self.rings

    class Run:
        config = RunConfig(model=RingFlowConfig())

    assert depth(Run()) == 6
    data = type("D", (), {"levels": None, "name": "x"})()
    check_teacher(TeacherConfig(), RunConfig(model=RingFlowConfig()), data)  # accepted: it is a flow
    with pytest.raises(ValueError, match="method nll trains a normalizing flow"):
        check_teacher(TeacherConfig(), RunConfig(model=MODELS["mlp"].config()), data)
