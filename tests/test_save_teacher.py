"""`flowdistill.save_teacher`: a user's own flow becomes a teacher run that `load_run`, `nll`, `sample` and NFM
couplings read, with its exact density; what cannot be rebuilt from its import path is refused, writing nothing."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import yaml
from own_flow_example import EncodeOnlyFlow, SinhArcsinhFlow

import flowdistill as fd
from flowdistill.cli import main

PARAMS = {"shift": [0.3, -0.2], "log_scale": [0.9, 1.1], "log_tail": [0.25, -0.2], "skew": [0.4, -0.3],
          "shear": 0.6}


def example_flow(**kwargs) -> SinhArcsinhFlow:
    """The example flow with fixed parameters far from the identity."""
    flow = SinhArcsinhFlow(**kwargs)
    with torch.no_grad():
        for name, value in PARAMS.items():
            getattr(flow, name).copy_(torch.tensor(value))
    return flow


def hand_log_density(x: np.ndarray) -> np.ndarray:
    """log p(x) (B,) in nats of the example flow in float64: z written out by hand, log|det dz/dx| from a central
    difference Jacobian of that map (not from the flow's own log-determinant)."""
    p = {k: np.asarray(v, dtype=np.float64) for k, v in PARAMS.items()}

    def z_of(x: np.ndarray) -> np.ndarray:
        u = (x - p["shift"]) * np.exp(-p["log_scale"])
        v = np.sinh(np.exp(p["log_tail"]) * np.arcsinh(u) - p["skew"])
        return np.stack([v[:, 0], v[:, 1] + p["shear"] * v[:, 0]], axis=1)

    h = 1e-6
    columns = [(z_of(x + h * e) - z_of(x - h * e)) / (2 * h) for e in np.eye(2)]  # d z / d x_k, (B, 2) each
    jac = np.stack(columns, axis=2)  # (B, 2, 2)
    z = z_of(x)
    return -0.5 * (z**2).sum(1) - math.log(2 * math.pi) + np.log(np.abs(np.linalg.det(jac)))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "flow"
    assert fd.save_teacher(example_flow(eta=0.05), data={"name": "8gaussians", "n_train": 2000, "n_test": 500},
                           out=out) == out
    return out


def test_the_saved_flow_has_the_hand_computed_density(teacher, capsys):
    run = fd.load_run(teacher)
    assert isinstance(run.model, SinhArcsinhFlow) and run.model.init_kwargs == {"dim": 2, "eta": 0.05, "flip": False}
    assert run.step == run.config.train.steps  # a finished run
    config = yaml.safe_load((teacher / "config.yaml").read_text())
    assert config["model"] == {"name": "user_flow", "flow": "own_flow_example:SinhArcsinhFlow",
                               "init_kwargs": {"dim": 2, "eta": 0.05, "flip": False}}
    x = run.dataset.test[:200]
    expected = hand_log_density(x.double().numpy())
    assert np.abs(fd.log_likelihood(run, x).double().numpy() - expected).max() < 1e-4
    assert main(["nll", str(teacher), "--n", "100", "--device", "cpu"]) == 0
    with open(teacher / "nll-test.csv") as fh:
        rows = list(csv.DictReader(fh))
    index = [int(r["index"]) for r in rows]
    logp = np.array([float(r["logp_nats"]) for r in rows])
    assert np.abs(logp - hand_log_density(run.dataset.test[index].double().numpy())).max() < 1e-4
    samples = fd.sample(run, n=64).x
    assert samples.shape == (64, 2) and torch.isfinite(samples).all()
    assert main(["sample", str(teacher), "--n", "16", "--device", "cpu"]) == 0


def test_an_nfm_student_trains_on_pairs_from_the_saved_flow(tmp_path, teacher):
    student = fd.train("recipes/toy2d/fm_nf_teacher.yaml", [
        f"method.coupling.teacher={teacher}", "method.coupling.draws=1", "train.steps=5", "train.batch_size=32",
        "train.progress=false", "train.sample_grid=false", "model.hidden=16", "model.depth=2",
        "data.n_train=2000", "data.n_test=500", f"out_dir={tmp_path}", "name=student", "train.warmup_steps=1"])
    run = fd.load_run(student)
    assert run.step == 5 and torch.isfinite(fd.sample(run, n=8, steps=2).x).all()


def test_flows_that_cannot_be_rebuilt_are_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "flow"

    def refused(match: str, module: torch.nn.Module, **kwargs) -> None:
        with pytest.raises(ValueError, match=match):
            fd.save_teacher(module, data="8gaussians", out=out, **kwargs)
        assert not out.exists() and list(tmp_path.iterdir()) == []

    script = type("ScriptFlow", (SinhArcsinhFlow,), {"__module__": "__main__"})
    refused(r"ScriptFlow is defined in __main__ .*move the class into a module that can be imported", script())

    class LocalFlow(SinhArcsinhFlow):
        pass

    refused(r"LocalFlow is defined inside a function.*move the class into a module", LocalFlow())
    refused(r"models samples of shape \(3,\), but data '8gaussians' has samples of shape \(2,\)",
            SinhArcsinhFlow(dim=3))
    refused(r"flip.*does not reproduce it: z differs by up to [0-9.e+-]+ \(relative\)", example_flow(),
            init_kwargs={"dim": 2, "eta": 0.0, "flip": True})
    refused(r"has eta=0.0, the given flow 0.05: pass the init_kwargs", example_flow(eta=0.05), init_kwargs={})
    refused(r"cannot be constructed with model.init_kwargs \{'width': 3\}", example_flow(), init_kwargs={"width": 3})
    grown = example_flow()
    grown.register_parameter("extra", torch.nn.Parameter(torch.ones(2)))  # a parameter its constructor does not make
    refused(r"does not take the flow's weights: .*Unexpected key\(s\) in state_dict: \"extra\"", grown)
    refused(r"does not implement the flow-teacher interface .*missing decode, forward", EncodeOnlyFlow())
    refused(r"must be plain JSON/YAML values", example_flow(), init_kwargs={"dim": torch.tensor(2)})


def test_an_existing_folder_is_kept_unless_overwrite(tmp_path, teacher):
    out = tmp_path / "flow"
    out.mkdir()
    assert fd.save_teacher(example_flow(), data="8gaussians", out=out) == out  # an empty folder is fine
    (out / "config.yaml").write_text("kept")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        fd.save_teacher(example_flow(), data="8gaussians", out=out)
    assert (out / "config.yaml").read_text() == "kept"
    fd.save_teacher(example_flow(), data="8gaussians", out=out, overwrite=True)
    assert fd.load_run(out).config.model.name == "user_flow"
