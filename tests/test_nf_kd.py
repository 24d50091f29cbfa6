"""NF knowledge distillation: zero-weight equivalence, gradients to the student only, mapping checks, training."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowdistill.api import load_run, resolve_config
from flowdistill.cli import main
from flowdistill.components import CATALOG
from flowdistill.flow_scores import UNDISTILLED
from nfm.glow import Glow, GlowConfig
from nfm.logit_map import to_logit
from nfm.nf_kd import NFKD, NFKDConfig, check_mapping, check_weights
from nfm.tarflow import TarFlow, TarFlowConfig
from nfm.teacher import TeacherConfig, TeacherNLL
from shared.run_build import build_model, init_from_run

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["train.batch_size=32", "train.progress=false", "train.sample_grid=false", "train.log_every=2",
            "train.ckpt_every=2", "train.eval_every=2", "eval.n_samples=16", "eval.nll_samples=16"]  # 2-step digits runs


def flows(seed: int = 0) -> tuple[Glow, Glow]:
    torch.manual_seed(seed)
    teacher = Glow(GlowConfig(levels=2, steps=3, hidden=16, eta=0.05), (1, 8, 8))
    student = Glow(GlowConfig(levels=2, steps=1, hidden=8, eta=0.05), (1, 8, 8))
    with torch.no_grad():
        for p in [*teacher.parameters(), *student.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def test_with_only_the_nll_weight_the_loss_is_the_undistilled_students():
    teacher, student = flows()
    x = (torch.rand(32, 1, 8, 8) * 2 - 1,)
    kd = NFKD(NFKDConfig(nll_weight=1.0, latent_weight=0.0), teacher, levels=None)
    plain = TeacherNLL(TeacherConfig(), levels=None)
    a, _ = kd(student, x, torch.Generator().manual_seed(3))
    grads_a = torch.autograd.grad(a, list(student.parameters()))
    b, _ = plain(student, x, torch.Generator().manual_seed(3))
    grads_b = torch.autograd.grad(b, list(student.parameters()))
    assert a.item() == b.item()
    assert all(torch.equal(u, v) for u, v in zip(grads_a, grads_b))


def test_distillation_terms_train_the_student_and_leave_the_teacher_alone():
    teacher, student = flows(1)
    before = [p.clone() for p in teacher.parameters()]
    kd = NFKD(NFKDConfig(nll_weight=0.5, latent_weight=0.2, intermediate_weight=0.2, synth_weight=0.1), teacher, None)
    loss, logs = kd(student, (torch.rand(16, 1, 8, 8) * 2 - 1,), torch.Generator().manual_seed(0))
    loss.backward()
    assert {"nll", "latent_mse", "intermediate_mse", "synth"} <= set(logs) and logs["latent_mse"] > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in student.levels[0][0].parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    # the latent term pulls the student's latents towards the teacher's
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    match = NFKD(NFKDConfig(nll_weight=0.0, latent_weight=1.0), teacher, None)
    first = match(student, (x,), torch.Generator().manual_seed(0))[1]["latent_mse"]
    for _ in range(30):
        opt.zero_grad()
        match(student, (x,), torch.Generator().manual_seed(0))[0].backward()
        opt.step()
    assert match(student, (x,), torch.Generator().manual_seed(0))[1]["latent_mse"] < 0.5 * first


def test_mappings_that_cannot_be_matched_are_refused_with_the_reason():
    torch.manual_seed(0)
    teacher = TarFlow(TarFlowConfig(blocks=4, layers=1, width=32, head_dim=16), (1, 8, 8))
    student = TarFlow(TarFlowConfig(blocks=2, layers=1, width=16, head_dim=8), (1, 8, 8))
    x = torch.randn(2, 1, 8, 8)
    s_out, t_out = student.encode_with_levels(x)[2], teacher.encode_with_levels(x)[2]
    check_mapping((1, 3), s_out, t_out)  # student block 0 stands for teacher block 1, last to last
    for mapping, message in [((3,), "has 1 entries; the student has 2"), ((3, 1), "strictly increasing"),
                             ((0, 2), "last block/level to the teacher's last"), ((-1, 3), "strictly increasing")]:
        with pytest.raises(ValueError, match=message):
            check_mapping(mapping, s_out, t_out)
    with pytest.raises(ValueError, match="same shape"):
        check_mapping((1,), [torch.zeros(2, 3)], [torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="convex combination"):
        check_weights(NFKDConfig(nll_weight=0.9, latent_weight=0.2))


def test_a_compact_glow_distils_from_a_glow_teacher_through_the_cli(tmp_path, capsys):
    toy = ROOT / "recipes" / "toy2d"
    small = ["data.n_train=2000", "data.n_test=300", "train.batch_size=128", "train.progress=false",
             "train.sample_grid=false", "train.log_every=20", "train.ckpt_every=40"]
    assert main(["train", str(toy / "glow_teacher.yaml"), f"out_dir={tmp_path}", "name=teacher", "train.steps=40",
                 "model.steps=3", "model.hidden=16", *small]) == 0
    assert main(["train", str(toy / "glow_student_kd.yaml"), f"out_dir={tmp_path}", "name=student", "train.steps=40",
                 f"method.teacher={tmp_path / 'teacher'}", *small]) == 0
    assert '"synth"' in (tmp_path / "student" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(["nll", str(tmp_path / "student"), "--device", "cpu"]) == 0
    assert "exact (flow)" in capsys.readouterr().out
    assert main(["train", str(toy / "glow_student_kd.yaml"), f"out_dir={tmp_path}", "name=bad", "train.steps=1",
                 f"method.teacher={tmp_path / 'teacher'}", "model.eta=0.1", *small]) == 2
    assert "same perturbed density" in capsys.readouterr().err


def test_a_tarflow_student_shares_its_teachers_logit_map_and_can_keep_its_blocks(tmp_path, capsys):
    digits = ROOT / "recipes" / "digits"
    assert main(["train", str(digits / "teacher_bpd_logit.yaml"), f"out_dir={tmp_path}", "name=teacher",
                 "train.steps=2", "model.blocks=4", "model.width=16", "model.head_dim=8", "model.logit_alpha=0.001",
                 *TINY_RUN]) == 0
    student = [str(digits / "tarflow_student_kd.yaml"), f"out_dir={tmp_path}", "train.steps=2",
               f"method.teacher={tmp_path / 'teacher'}", "model.width=16", "model.head_dim=8", *TINY_RUN]
    capsys.readouterr()
    assert main(["train", *student, "name=plain"]) == 2
    assert "logit_alpha=0.001" in capsys.readouterr().err
    assert not (tmp_path / "plain" / "checkpoints").exists()
    assert main(["train", *student, "name=logit", "model.logit_alpha=0.001"]) == 0
    assert '"latent_mse"' in (tmp_path / "logit" / "metrics.jsonl").read_text()
    # a student that keeps the teacher's first blocks (train.init_from) starts as the teacher cut after them:
    # its latent is the teacher's output after block 1; its undistilled twin starts fresh
    kept = resolve_config(student[0], [*student[1:], "name=kept", "model.logit_alpha=0.001",
                                       f"train.init_from={tmp_path / 'teacher'}"])
    teacher = load_run(tmp_path / "teacher").model
    run = load_run(tmp_path / "logit")
    model = build_model(kept, run.dataset, CATALOG)
    assert init_from_run(model, kept.train.init_from) == []  # every tensor of the student came from the teacher
    x = run.dataset.test[:8]
    with torch.no_grad():
        z, _, _ = model.encode_with_levels(x)
        _, _, teacher_levels = teacher.encode_with_levels(x)
    torch.testing.assert_close(z, teacher_levels[1])
    assert resolve_config(student[0], [*student[1:], f"train.init_from={tmp_path / 'teacher'}",
                                       *UNDISTILLED]).train.init_from == ""


def test_a_glow_student_that_keeps_the_teachers_first_steps_starts_as_the_cut_teacher(tmp_path):
    digits = ROOT / "recipes" / "digits"
    small = [*TINY_RUN, "model.hidden=8", "model.logit_alpha=0.001"]
    assert main(["train", str(digits / "glow_teacher_bpd.yaml"), f"out_dir={tmp_path}", "name=teacher",
                 "train.steps=2", "model.steps=3", *small]) == 0
    kept = resolve_config(digits / "glow_student_kd_init.yaml",
                          [f"out_dir={tmp_path}", "name=kept", "model.steps=2", f"method.teacher={tmp_path / 'teacher'}",
                           f"train.init_from={tmp_path / 'teacher'}", *small])
    teacher = load_run(tmp_path / "teacher")
    student = build_model(kept, teacher.dataset, CATALOG)
    assert init_from_run(student, kept.train.init_from) == []  # steps 0-1 of each level and the split prior
    x = teacher.dataset.test[:8]
    with torch.no_grad():
        _, _, student_levels = student.encode_with_levels(x)
        h = teacher.model._squeeze(to_logit(x, 0.001, "glow")[0])
        for step in teacher.model.levels[0][:2]:  # the teacher's level 0 cut after its second step
            h, _ = step(h)
        torch.testing.assert_close(student_levels[0], h)
        torch.testing.assert_close(student.priors[0].net[0].weight, teacher.model.priors[0].net[0].weight)
    # the undistilled twin starts fresh
    assert resolve_config(digits / "glow_student_kd_init.yaml", list(UNDISTILLED)).train.init_from == ""


def test_the_cifar10_distillation_recipes_run_on_a_small_local_cifar10(tmp_path, fake_cifar10, capsys):
    """The GPU recipes' data, shapes and level/block mappings, at toy width on 13 fake 3 x 32 x 32 images."""
    root, _ = fake_cifar10
    cifar = ROOT / "recipes" / "cifar10"
    run = [f"out_dir={tmp_path}", f"data.path={root}", "train.steps=2", "train.batch_size=4", "train.warmup_steps=1",
           "train.progress=false", "train.sample_grid=false", "train.log_every=1", "train.ckpt_every=2",
           "eval.n_samples=4", "eval.nll_samples=3"]
    # Glow: 3 levels, every level boundary matched (intermediate term on)
    assert main(["train", str(cifar / "glow_teacher_bpd.yaml"), *run, "name=glow", "model.steps=2",
                 "model.hidden=8", "data.val_fraction=0.2", "train.eval_every=2"]) == 0
    assert main(["train", str(cifar / "glow_student_kd.yaml"), *run, "name=glow-kd", "model.steps=1",
                 "model.hidden=4", f"method.teacher={tmp_path / 'glow'}", "data.val_fraction=0.2",
                 "train.eval_every=2", "method.nll_weight=0.8", "method.latent_weight=0.1",
                 "method.intermediate_weight=0.1"]) == 0
    logged = (tmp_path / "glow-kd" / "metrics.jsonl").read_text()
    assert '"latent_mse"' in logged and '"intermediate_mse"' in logged
    # TarFlow: class-conditional, 6 teacher blocks, student block j standing for teacher blocks 2j and 2j+1
    tiny = ["model.width=16", "model.head_dim=8", "model.layers=1"]
    assert main(["train", str(cifar / "teacher.yaml"), *run, "name=tarflow", *tiny]) == 0
    assert main(["train", str(cifar / "tarflow_student_kd.yaml"), *run, "name=tarflow-kd", *tiny,
                 f"method.teacher={tmp_path / 'tarflow'}", "method.nll_weight=0.8", "method.latent_weight=0.1",
                 "method.intermediate_weight=0.1"]) == 0
    assert '"intermediate_mse"' in (tmp_path / "tarflow-kd" / "metrics.jsonl").read_text()
    capsys.readouterr()
    for name in ("glow-kd", "tarflow-kd"):
        assert main(["nll", str(tmp_path / name), "--device", "cpu"]) == 0
        assert "exact (flow)" in capsys.readouterr().out
