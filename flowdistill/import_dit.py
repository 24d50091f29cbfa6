"""A diffusers `DiTTransformer2DModel` velocity field as flowdistill's `dit` model (`shared.dit.TimeDiT`).

diffusers gives every block its own embedder, c = MLP_t(emb(timestep)) + label_table[class]; TimeDiT
computes one c = MLP_t(emb(1000 t)) and every block reads it (`flowdistill.export` writes the copies).
Importing reverses that: the blocks' embedders must agree (a DiT converted from the original code, or
exported by flowdistill, has copies of one), the label table must hold one embedding for every class (an
unconditional field; flowdistill exports a zero table), and that embedding is folded into the bias of
MLP_t's output layer, so the field is the one diffusers computes for any class label, value for value.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from flowdistill.diffusers_settings import check_same_settings, model_cfg_side
from shared.dit import DiTConfig

DIT_FIXED = {"sample_size", "in_channels", "out_channels", "num_embeds_ada_norm"}  # from the data; labels folded
EMBEDDER = "norm1.emb."  # a block's timestep-and-label embedder
TABLE = "class_embedder.embedding_table.weight"


def dit_config_of(net: Any, time: str, timestep_scale: float) -> DiTConfig:
    """Our `DiTConfig` that builds `net`'s architecture; ValueError naming the settings or the time convention
    flowdistill's dit model does not build."""
    from shared.dit import TimeDiT

    if time != "noise-at-1" or timestep_scale != 1000:
        raise ValueError(f"a DiTTransformer2DModel is imported in flowdistill's and diffusers' time convention only "
                         f"(--time noise-at-1 --timestep-scale 1000), got --time {time} --timestep-scale "
                         f"{timestep_scale:g}")
    theirs = dict(net.config)
    cfg = DiTConfig(patch=theirs["patch_size"], depth=theirs["num_layers"], heads=theirs["num_attention_heads"],
                    head_dim=theirs["attention_head_dim"], dropout=theirs.get("dropout", 0.0))
    side = model_cfg_side(net)
    ours = dict(TimeDiT(cfg, (theirs["in_channels"], side, side)).dit.config)
    check_same_settings(theirs, ours, DIT_FIXED, "DiTTransformer2DModel", "dit")
    return cfg


def dit_weights(net: Any) -> dict[str, Tensor]:
    """TimeDiT's state dict from a DiTTransformer2DModel: the blocks' weights, one time embedder (`t_embed.*`),
    the label embedding folded into its output bias; ValueError when the blocks' embedders differ or the field
    is class-conditional."""
    state = net.state_dict()
    embedders = [{k[len(p):]: v for k, v in state.items() if k.startswith(p)}
                 for p in (f"transformer_blocks.{i}.{EMBEDDER}" for i in range(len(net.transformer_blocks)))]
    first = embedders[0]
    for i, other in enumerate(embedders[1:], start=1):
        differ = sorted(k for k in first if not torch.equal(first[k], other[k]))
        if differ:
            raise ValueError(f"block {i} of this DiTTransformer2DModel has its own time or label embedding "
                             f"({', '.join(differ)} differ from block 0's); flowdistill's dit shares one across blocks")
    table = first[TABLE]
    if not torch.equal(table, table[:1].expand_as(table)):
        raise ValueError(f"this DiTTransformer2DModel is class-conditional ({len(table)} different label "
                         "embeddings); flowdistill's dit is an unconditional velocity field")
    weights = {f"dit.{k}": v for k, v in state.items() if EMBEDDER not in k}
    prefix = "timestep_embedder."
    weights.update({f"t_embed.{k[len(prefix):]}": v for k, v in first.items() if k.startswith(prefix)})
    weights["t_embed.linear_2.bias"] = weights["t_embed.linear_2.bias"] + table[0]
    return weights
