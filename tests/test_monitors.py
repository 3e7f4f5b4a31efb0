"""Health monitors on constructed teacher outputs, and loss terms switched on by config reaching the logs."""
import json
import math

import pytest
import torch

from conftest import PYTHON, run_command, tiny_overrides
from esvit_scale.config import LossConfig
from esvit_scale.losses.esvit_loss import EsViTLoss, term_names
from esvit_scale.losses.monitors import PERSIST, CollapseWatch
from esvit_scale.models.esvit import MultiCropOutput

B, K, C, L = 16, 64, 32, 4


def outputs(view_logits: torch.Tensor, features: torch.Tensor, n_crops: int = 4) -> MultiCropOutput:
    """Every crop gets the same logits (so teacher and student agree) and the features as its region tokens."""
    g = torch.Generator().manual_seed(0)
    return MultiCropOutput(view_logits=[view_logits.clone() for _ in range(n_crops)],
                           region_logits=[torch.randn(B, L, K, generator=g) for _ in range(n_crops)],
                           region_features=[features.unsqueeze(1).expand(B, L, C).clone() for _ in range(n_crops)])


def readings(view_logits: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    fn = EsViTLoss(LossConfig(region_loss=False), K)
    fn.monitor = True
    student, teacher = outputs(view_logits, features), outputs(view_logits, features, n_crops=2)
    return {k: float(v) for k, v in fn(student, teacher, teacher_temp=0.04).items()}


def healthy() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    logits = torch.zeros(B, K)
    logits[torch.arange(B), torch.randperm(K, generator=g)[:B]] = 5.0    # each image its own sharp prototype
    return logits, torch.randn(B, C, generator=g)


def test_healthy_outputs_read_sharp_rows_a_spread_batch_and_spread_features():
    r = readings(*healthy())
    assert r["view_teacher_entropy"] < 0.1 * math.log(K)
    assert r["view_teacher_batch_entropy"] == pytest.approx(math.log(B), rel=0.05)    # B prototypes in use
    assert r["view_agreement"] == 1.0
    assert r["feature_std"] == pytest.approx(1 / math.sqrt(C), rel=0.3)
    assert CollapseWatch(K, C).signatures(r) == {}


def test_uniform_outputs_read_ln_k_twice_and_are_named_uniform_collapse():
    _, features = healthy()
    r = readings(torch.zeros(B, K), features)
    assert r["view_teacher_entropy"] == pytest.approx(math.log(K), rel=1e-4)
    assert r["view_teacher_batch_entropy"] == pytest.approx(math.log(K), rel=1e-4)
    assert set(CollapseWatch(K, C).signatures(r)) == {"uniform/view"}


def test_one_prototype_outputs_read_zero_twice_and_collapsed_features_are_named():
    logits = torch.zeros(B, K)
    logits[:, 7] = 20.0                                                      # every image on prototype 7
    r = readings(logits, torch.ones(B, C))                                   # and one point in feature space
    assert r["view_teacher_entropy"] < 1e-3 and r["view_teacher_batch_entropy"] < 1e-3
    assert r["feature_std"] < 1e-6
    assert set(CollapseWatch(K, C).signatures(r)) == {"one_prototype/view", "features"}


def test_the_warning_comes_once_a_signature_persists_and_again_at_intervals(caplog):
    watch = CollapseWatch(K, C)
    uniform = {"view_teacher_entropy": math.log(K), "view_teacher_batch_entropy": math.log(K)}
    given = [bool(watch.update(uniform, step)) for step in range(1, PERSIST + 25)]
    assert given.index(True) == PERSIST - 1 and sum(given) == 2        # at PERSIST and PERSIST + 20 readings
    assert watch.last() == ["uniform/view"]
    assert "lower learning rate" in caplog.text
    watch.update({"view_teacher_entropy": 0.1, "view_teacher_batch_entropy": 3.0}, 100)
    assert watch.last() is None


def test_loss_terms_follow_the_config():
    assert term_names(LossConfig()) == ["view", "region"]
    assert term_names(LossConfig(region_loss=False, koleo_weight=0.1)) == ["view", "koleo"]


def test_a_term_switched_on_by_config_and_the_monitors_reach_metrics_and_summary(image_folder, tmp_path):
    out = tmp_path / "run"
    run_command([PYTHON, "train.py", "--config", "configs/quickstart.yaml", *tiny_overrides(image_folder, out, **{
        "loss.koleo_weight": 0.1, "run.max_steps": 4, "run.log_every_steps": 2})])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all({"koleo_loss", "view_loss", "region_loss"} <= set(r) for r in steps)
    monitored = [r["step"] for r in steps if "view_teacher_entropy" in r]
    assert monitored == [1, 2, 4]                    # the first step (at initialisation), then every log_every_steps
    for r in steps:
        if r["step"] in monitored:
            assert 0 <= r["view_teacher_entropy"] <= math.log(128) + 1e-4
            assert {"region_teacher_entropy", "view_agreement", "feature_std", "view_center_norm"} <= set(r)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["health"]["view_teacher_batch_entropy"] == steps[-1]["view_teacher_batch_entropy"]
