"""The flow-teacher interface: what NFM pairs, exact likelihoods and teacher sampling need of a flow.

A normalizing flow f (data -> noise) used as a teacher is an `nn.Module` with

    encode(x, y=None) -> (z, logdet)   x (B, *data_shape) -> z (B, *data_shape) and log|det dz/dx| (B,),
                                       in nats per sample (a sum over every value, not a mean), so that
                                       log p(x) = log N(z; 0, I) + logdet
    decode(z, y=None, use_cache=True, guidance=0.0) -> x     the inverse of `encode` (x = f^{-1}(z))
    scale_prior_noise(noise) -> noise' standard normal noise (B, *data_shape) -> the prior noise that
                                       sampling decodes (unchanged for a N(0, I) prior)
    forward(x, *, y=None)              the training direction, the same as `encode`
    eta: float                         std of the Gaussian noise its training data carried (0: none);
                                       NFM pairs perturb data with it before encoding
    num_classes: int                   class labels it is conditioned on (0: unconditional); label
                                       `num_classes` is the null class, also meant by y=None
    data_shape: tuple[int, ...]        the per-sample shape of x
    decode_passes: int                 sequential network passes of one decode (the NFE it is charged)

Token layout: z has the data's shape, value for value, so an NFM student learns to map the noise
z[b, c, h, w] back to the pixel x[b, c, h, w]; a flow that works on tokens internally (TarFlow's p x p
patches, `to_tokens` / `from_tokens`) returns z in the data's layout. `TarFlow` and `Glow` implement this.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class FlowTeacher(Protocol):
    """A flow usable as a teacher (see the module docstring for shapes and units)."""

    eta: float
    num_classes: int
    data_shape: tuple[int, ...]

    @property
    def decode_passes(self) -> int:
        """Sequential network passes of one decode."""

    def encode(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data (B, *data_shape) -> z (B, *data_shape), log|det dz/dx| (B,) in nats."""

    def decode(self, z: Tensor, y: Tensor | None = None, use_cache: bool = True, guidance: float = 0.0) -> Tensor:
        """z (B, *data_shape) -> data (B, *data_shape), the inverse of `encode`."""

    def scale_prior_noise(self, noise: Tensor) -> Tensor:
        """Standard normal noise (B, *data_shape) -> the prior noise sampling decodes."""


def interface_members() -> tuple[str, ...]:
    """The names `FlowTeacher` asks for: its annotated attributes, properties and methods."""
    own = {name for name, value in vars(FlowTeacher).items()
           if not name.startswith("_") and (callable(value) or isinstance(value, property))}
    return tuple(sorted(own | set(FlowTeacher.__annotations__)))


def missing_members(flow: object) -> list[str]:
    """The `FlowTeacher` members `flow` lacks, and `forward` when an `nn.Module` does not define it."""
    from torch import nn

    missing = [name for name in interface_members() if not hasattr(flow, name)]
    if isinstance(flow, nn.Module) and type(flow).forward is nn.Module.forward:
        missing.append("forward")
    return missing


@runtime_checkable
class FlowConfig(Protocol):
    """The config side of a flow family: what marks a model config as a normalizing flow (the `nll` method
    trains it, the pipeline's distillation table reports its depth) without naming the family."""

    def flow_layers(self) -> int | None:
        """Sequential flow layers of the model it builds (None when the config cannot tell)."""


def is_flow_config(model_config: object) -> bool:
    """Whether a model config describes a normalizing flow (implements `FlowConfig`)."""
    return isinstance(model_config, FlowConfig)
