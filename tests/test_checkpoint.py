"""Checkpoints: atomic layout, round trip, and refusal of corrupt or truncated files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from shared.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_weights, save_checkpoint,
                               verify_checkpoint)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 3))


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).pow(2).mean().backward()
    opt.step()
    return opt


def test_round_trip_restores_weights_and_optimizer(tmp_path):
    model, ema = _model(0), _model(1)
    opt = _optimizer(model)
    path = save_checkpoint(tmp_path, 7, model, ema, opt, {"extra": 1.5})
    assert latest_checkpoint(tmp_path) == path
    model2, ema2 = _model(2), _model(3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    state = load_checkpoint(path, model2, ema2, opt2)
    assert state == {"step": 7, "extra": 1.5}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_keeps_only_latest_checkpoints_and_no_temporaries(tmp_path):
    model = _model()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corrupt_checkpoint_is_refused_with_clear_message(tmp_path, damage):
    model = _model()
    path = save_checkpoint(tmp_path, 5, model, optimizer=_optimizer(model))
    target = path / "model.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "delete":
        target.unlink()
    else:
        (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, _model(1))
    message = str(err.value)
    assert str(path) in message
    assert any(word in message for word in ("truncated", "corrupt", "missing"))


def test_truncated_weights_file_without_manifest_is_refused(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path, 1, model)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_weights(weights, _model())


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, _model())
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(path / "model.safetensors", nn.Linear(3, 3))


def test_latest_pointer_to_missing_folder_is_reported(tmp_path):
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="does not exist"):
        latest_checkpoint(tmp_path)
    assert verify_checkpoint(save_checkpoint(tmp_path, 9, _model()))["step"] == 9


def test_rewriting_a_step_keeps_the_old_checkpoint_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    import os as _os

    import torch

    from shared.checkpoint import latest_checkpoint, remove_temporaries, save_checkpoint, verify_checkpoint

    model = torch.nn.Linear(3, 2)
    first = save_checkpoint(tmp_path, 5, model)
    replace = _os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".step_00000005.") and not Path(src).name.endswith(".previous") \
                and Path(dst).name == "step_00000005":
            raise OSError("disk full")  # the new folder cannot be put in place
        return replace(src, dst)

    monkeypatch.setattr("shared.checkpoint.os.replace", failing_replace)
    with pytest.raises(CheckpointError, match="disk full.*step_00000005\\) is kept"):
        save_checkpoint(tmp_path, 5, model)
    monkeypatch.setattr("shared.checkpoint.os.replace", replace)
    assert ("step_00000005", ".step_00000005.previous") in calls  # the old checkpoint was moved aside ...
    assert latest_checkpoint(tmp_path) == first and verify_checkpoint(first)["step"] == 5  # ... and put back
    _os.replace(first, tmp_path / ".step_00000005.previous")  # a kill between the two renames
    remove_temporaries(tmp_path)  # the next start puts it back
    assert latest_checkpoint(tmp_path) == first and verify_checkpoint(first)["step"] == 5
    (tmp_path / ".step_00000009.abc").mkdir()  # a temp folder of a killed write
    (tmp_path / ".latest.k3j2.tmp").write_text("step_00000009\n")  # a kill inside the pointer's write
    assert remove_temporaries(tmp_path) == [".step_00000009.abc", ".latest.k3j2.tmp"]
    assert not list(tmp_path.glob(".*"))
    assert latest_checkpoint(tmp_path) == first
