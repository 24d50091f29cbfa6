"""How a diffusers model folder's config compares with the one flowdistill builds (UNet and DiT imports)."""
from __future__ import annotations

from typing import Any


def check_same_settings(theirs: dict[str, Any], ours: dict[str, Any], fixed: set[str], cls: str, model: str) -> None:
    """ValueError naming each diffusers setting (outside `fixed`, set from the data) in which the config `theirs`
    differs from the one flowdistill's `model` builds (`ours`), and an output of another channel count."""
    differ = [f"{k}={theirs.get(k)!r} (flowdistill builds {ours.get(k)!r})" for k in sorted(set(ours) | set(theirs))
              if not k.startswith("_") and k not in fixed and _plain(theirs.get(k)) != _plain(ours.get(k))]
    out_channels = theirs.get("out_channels") or theirs["in_channels"]
    if theirs["in_channels"] != out_channels:
        differ.append(f"out_channels={out_channels} (a velocity field needs in_channels)")
    if differ:
        raise ValueError(f"this {cls} is not one flowdistill's {model} model builds: " + "; ".join(differ))


def _plain(value: Any) -> Any:
    """Config values compared as JSON would store them (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def model_cfg_side(net: Any) -> int:
    """The image side of a diffusers model's `sample_size` (an int or an (H, W) pair)."""
    size = net.config.sample_size
    return int(size if isinstance(size, int) else size[0])
