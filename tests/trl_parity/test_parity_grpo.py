"""otalign's GRPOTrainer against TRL 1.16's GRPOTrainer run on the same completions: advantages, micro-batch
losses, gradients and learning rates of every optimizer step (and the weights at the end) equal to 1e-5 relative,
for every ``loss_type``, beta 0 and > 0 with and without ``use_bias_correction_kl``, ``num_iterations`` 1 and 2,
``gradient_accumulation_steps`` 1 and 2, under a linear schedule."""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

from cases import GRPO_CASES, METRIC_CASES  # noqa: E402
from critic_free import Settings, compare, run_otalign, run_trl  # noqa: E402
from parity import assert_same_metrics, params  # noqa: E402


@pytest.mark.parametrize("case", params(GRPO_CASES))
def test_grpo_equals_trl(tmp_path, case):
    settings = Settings(algorithm="grpo", **case.settings)
    ours, rollouts, groups, micro_batches = run_otalign(tmp_path / "ours", settings)
    theirs = run_trl(tmp_path / "theirs", settings, rollouts, groups, micro_batches)
    compare(ours, theirs)


@pytest.mark.parametrize("case", params(METRIC_CASES))
def test_rl_metrics_equal_trl(tmp_path, case):
    """TRL's GRPO/RLOO metric keys, logged by both sides, equal row by row (a rollout is one optimizer step here)."""
    settings = dict(case.settings)
    keys = settings.pop("metrics")
    settings = Settings(**settings)
    ours, rollouts, groups, micro_batches = run_otalign(tmp_path / "ours", settings)
    theirs = run_trl(tmp_path / "theirs", settings, rollouts, groups, micro_batches)
    assert len(ours.recorder.metrics) == settings.rollouts
    assert_same_metrics(ours.recorder, theirs.recorder, keys)


def test_the_comparison_tells_two_loss_types_apart(tmp_path):
    """The harness can fail: otalign's ``dapo`` against TRL's ``bnpo`` (equal but for the normaliser of micro-batches
    with different token counts) is caught."""
    settings = Settings(loss_type="dapo", gradient_accumulation_steps=2, per_device_train_batch_size=2)
    ours, rollouts, groups, micro_batches = run_otalign(tmp_path / "ours", settings)
    lengths = [[len(c) for c in completions] for _, completions in rollouts]
    assert any(len(set(n)) > 1 for n in lengths)  # completions of different lengths: the normalisers differ
    theirs = run_trl(
        tmp_path / "theirs", dataclasses.replace(settings, loss_type="bnpo"), rollouts, groups, micro_batches
    )
    with pytest.raises(AssertionError, match="losses|gradient"):
        compare(ours, theirs)


def test_every_loss_type_has_cases():
    from otalign.trainers.critic_free import LOSS_TYPES

    assert {case.settings.get("loss_type") for case in GRPO_CASES} == set(LOSS_TYPES)
