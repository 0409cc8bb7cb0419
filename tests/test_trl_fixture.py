"""otalign's preference losses against values computed once by TRL 1.16.0 (``DPOTrainer._compute_loss`` with
precomputed reference log-probs, float64 inputs) and committed as ``fixtures/trl_1_16_dpo_losses.json``.

Nothing is imported from TRL: the fixture holds its inputs (summed sequence log-probs, completion lengths) and
TRL's loss and reward metrics per case. The loss goes through the trainer's path: :func:`loss_inputs` (per-token
averaging for IPO) and then the registered loss object.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otalign.trainers import PreferenceConfig
from otalign.trainers.preference_losses import build_preference_loss, loss_inputs

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "trl_1_16_dpo_losses.json").read_text())


def tensors():
    f = FIXTURE
    policy = torch.tensor(f["policy_chosen_logps"] + f["policy_rejected_logps"], dtype=torch.float64)
    ref = torch.tensor(f["ref_chosen_logps"] + f["ref_rejected_logps"], dtype=torch.float64)
    lengths = torch.tensor(f["chosen_lengths"] + f["rejected_lengths"])
    return policy, ref, lengths


def test_fixture_says_which_trl_produced_it():
    assert FIXTURE["produced_by"].startswith("trl 1.16.0 ")
    assert {c["loss_type"] for c in FIXTURE["cases"]} == {"sigmoid", "hinge", "ipo", "aot", "aot_unpaired", "robust"}


@pytest.mark.parametrize(
    "case", FIXTURE["cases"], ids=lambda c: f"{c['loss_type']}-b{c['beta']}-s{c['label_smoothing']}"
)
def test_loss_matches_trl(case):
    config = PreferenceConfig(loss_type=case["loss_type"], beta=case["beta"], label_smoothing=case["label_smoothing"])
    loss_fn = build_preference_loss(config.loss_type, beta=config.beta, label_smoothing=config.label_smoothing)
    policy, ref, lengths = tensors()
    n = len(FIXTURE["chosen_lengths"])
    policy_in, ref_in = loss_inputs(loss_fn, policy, ref, lengths)
    if loss_fn.paired:
        loss, _ = loss_fn(policy_in[:n], policy_in[n:], ref_in[:n], ref_in[n:])
    else:  # labelled completions: each pair's chosen one desirable, its rejected one not
        labels = torch.arange(2 * n) < n
        loss, _ = loss_fn(policy_in, ref_in, labels, None, None)
    assert loss.item() == pytest.approx(case["loss"], rel=1e-12, abs=1e-12)
    rewards = config.beta * (policy - ref)  # the trainer's rewards/* metrics: summed log-probs, as TRL
    metrics = case["metrics"]
    assert rewards[:n].mean().item() == pytest.approx(metrics["rewards/chosen"], rel=1e-12)
    assert rewards[n:].mean().item() == pytest.approx(metrics["rewards/rejected"], rel=1e-12)
    assert (rewards[:n] - rewards[n:]).mean().item() == pytest.approx(metrics["rewards/margins"], rel=1e-12)
    assert (rewards[:n] > rewards[n:]).double().mean().item() == metrics["rewards/accuracies"]


def test_ipo_without_per_token_averaging_would_differ():
    """The fixture does tell the two IPO forms apart (summed log-probs give another loss)."""
    case = next(c for c in FIXTURE["cases"] if c["loss_type"] == "ipo")
    loss_fn = build_preference_loss("ipo", beta=case["beta"])
    policy, ref, _ = tensors()
    n = len(FIXTURE["chosen_lengths"])
    summed, _ = loss_fn(policy[:n], policy[n:], ref[:n], ref[n:])
    assert abs(summed.item() - case["loss"]) > 1e-3
