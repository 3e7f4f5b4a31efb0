"""`bench chaos`: a real 2-rank job under torchrun with real faults (kill -9, signals, damaged checkpoints, a stalled
rank, injected NaNs and spikes, a full disk, a lost launcher), compared step by step with the same job without them.
The short run is in the default suite; the long ones (>= 20 faults at ZeRO-2, and ZeRO-3 with async saves) are slow."""
import json

import pytest

from conftest import PYTHON, run_command, tiny_overrides
from esvit_scale.bench.chaos import FIRST_FAULT_STEP, GAP, KINDS, compare, make_schedule


def test_the_schedule_draws_every_kind_before_repeating_at_distinct_steps():
    faults = make_schedule(list(KINDS), 25, seed=3, ranks=2)
    assert sorted(f.kind for f in faults[:len(KINDS)]) == sorted(KINDS)
    steps = [f.step for f in faults]
    assert steps == sorted(steps) and len(set(steps)) == 25 and steps[0] >= FIRST_FAULT_STEP
    assert all(b - a >= 2 for a, b in zip(steps, steps[1:])) and steps[-1] < FIRST_FAULT_STEP + GAP * 25
    assert make_schedule(list(KINDS), 25, seed=3, ranks=2) == faults          # seeded


def test_compare_finds_missing_duplicated_unequal_and_unexpected_skips():
    reference = {1: [5.0], 2: [4.0], 3: ["skipped"], 4: [3.0]}
    assert not any(compare(reference, reference, 4, {3}).values())
    chaos = {1: [5.0], 2: [4.0, 4.0], 3: [3.5], 5: [1.0]}
    assert compare(chaos, reference, 4, {3}) == {"missing_steps": [4], "duplicated_steps": [2],
                                                 "unequal_steps": [3], "unexpected_skips": [3]}


def chaos(image_folder, tmp_path, *options, **overrides) -> dict:
    report = tmp_path / "chaos.json"
    proc = run_command([PYTHON, "-m", "esvit_scale.bench", "chaos", "--json", str(report), "--work-dir",
                        str(tmp_path / "work"), *options, *tiny_overrides(image_folder, tmp_path / "unused",
                                                                          **overrides)],
                       timeout=3000, check=False)
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["passed"], (proc.stdout[-3000:], {k: v for k, v in result.items() if k != "faults"},
                              [f for f in result["faults"] if f["event"] is None])
    return result


def test_a_short_chaos_run_recovers_every_fault_with_the_losses_of_an_undisturbed_run(image_folder, tmp_path):
    """A damaged checkpoint followed by a kill (the restart skips it), a transient NaN, a persistent spike."""
    result = chaos(image_folder, tmp_path, "--schedule", "damage_checkpoint,nan,spike_persistent",
                   **{"deepspeed.zero_stage": 2})
    assert result["faults_survived"] == 3 and result["relaunches"] == 0
    assert len(result["skipped_steps"]) == 1 and result["steps_recomputed"] > 0
    events = [f["event"]["event"] for f in result["faults"]]
    assert events == ["checkpoint_damaged", "transient", "skipped_batch"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, async_save, seed", [(2, "false", 1), (3, "true", 2)], ids=["zero2", "zero3_async"])
def test_twenty_two_random_faults_at_zero_2_and_zero_3_with_async_saves(stage, async_save, seed, image_folder,
                                                                         tmp_path):
    result = chaos(image_folder, tmp_path, "--faults", "22", "--seed", str(seed),
                   **{"deepspeed.zero_stage": stage, "run.async_checkpoint": async_save})
    assert result["faults_injected"] == result["faults_survived"] == 22
    assert result["relaunches"] == sum(f["kind"] == "lost_node" for f in result["faults"])
