"""otalign's preference losses and reward metrics against values computed once by TRL 1.16.0
(``DPOTrainer._compute_loss`` with precomputed reference log-probs, float64 inputs) and committed as
``fixtures/trl_1_16_dpo_losses.json``.

Nothing is imported from TRL: the fixture holds its inputs (summed sequence log-probs, completion lengths) and
TRL's loss and reward metrics per case. Both go through the trainer's own code from the sequence log-probs on, as
``PreferenceTrainer.micro_step`` runs it: the config's loss object (:meth:`PreferenceConfig.build_loss`),
:func:`~otalign.losses.call_loss` (per-token averaging for IPO, the loss's implicit rewards), then
:func:`~otalign.trainers.preference_metrics.example_records` and
:func:`~otalign.trainers.preference_metrics.summarize`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otalign.losses import call_loss
from otalign.trainers import PreferenceConfig
from otalign.trainers.preference_metrics import example_records, summarize

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "trl_1_16_dpo_losses.json").read_text())
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def tensors():
    f = FIXTURE
    policy = torch.tensor(f["policy_chosen_logps"] + f["policy_rejected_logps"], dtype=torch.float64)
    ref = torch.tensor(f["ref_chosen_logps"] + f["ref_rejected_logps"], dtype=torch.float64)
    lengths = torch.tensor(f["chosen_lengths"] + f["rejected_lengths"])
    return policy, ref, lengths


def trainer_loss_and_metrics(config: PreferenceConfig) -> tuple[float, dict[str, float]]:
    """The loss and metrics the trainer logs for the fixture's n pairs as one micro-batch (chosen completions, then
    rejected ones; labelled completions for the unpaired losses, a pair's chosen one desirable)."""
    policy, ref, lengths = tensors()
    n = len(FIXTURE["chosen_lengths"])
    labels = torch.arange(2 * n) < n
    out = call_loss(config.build_loss(), policy, ref, labels, pairs=n, lengths=lengths, beta=config.beta)
    record = example_records(out.rewards, policy, labels, torch.zeros(2 * n), lengths, n)
    return out.loss.item(), summarize(record)


def test_fixture_says_which_trl_produced_it():
    assert FIXTURE["produced_by"].startswith("trl 1.16.0 ")
    assert {c["loss_type"] for c in FIXTURE["cases"]} == {"sigmoid", "hinge", "ipo", "aot", "aot_unpaired", "robust"}


@pytest.mark.parametrize(
    "case", FIXTURE["cases"], ids=lambda c: f"{c['loss_type']}-b{c['beta']}-s{c['label_smoothing']}"
)
def test_loss_and_reward_metrics_match_trl(case):
    config = PreferenceConfig(loss_type=case["loss_type"], beta=case["beta"], label_smoothing=case["label_smoothing"])
    loss, metrics = trainer_loss_and_metrics(config)
    assert loss == pytest.approx(case["loss"], rel=1e-12, abs=1e-12)
    assert set(REWARD_METRICS) <= set(case["metrics"])
    for name in REWARD_METRICS:  # summarize averages in float32, as the trainer logs
        assert metrics[name] == pytest.approx(case["metrics"][name], rel=1e-6, abs=1e-9), name


def test_ipo_without_per_token_averaging_would_differ():
    """The fixture does tell the two IPO forms apart (summed log-probs give another loss)."""
    case = next(c for c in FIXTURE["cases"] if c["loss_type"] == "ipo")
    loss_fn = PreferenceConfig(loss_type="ipo", beta=case["beta"]).build_loss()
    policy, ref, _ = tensors()
    n = len(FIXTURE["chosen_lengths"])
    summed = loss_fn(policy[:n], policy[n:], ref[:n], ref[n:]).loss  # no lengths: the inputs as given
    assert abs(summed.item() - case["loss"]) > 1e-3
