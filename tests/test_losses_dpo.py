"""DPO / IPO / hinge / robust DPO losses and sequence log-probabilities against hand-written formulas."""

import math

import pytest
import torch

from otalign.losses import dpo_loss, implicit_rewards, sequence_logps

# (policy chosen, policy rejected, ref chosen, ref rejected) for three pairs, nats.
PC = [-10.0, -4.0, -7.5]
PR = [-12.0, -3.0, -7.5]
RC = [-11.0, -4.5, -8.0]
RR = [-11.5, -3.5, -6.0]


def _tensors(dtype=torch.float64):
    return [torch.tensor(x, dtype=dtype) for x in (PC, PR, RC, RR)]


def _margins():
    return [(pc - pr) - (rc - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)]


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_matches_formula(beta):
    expected = [-_log_sigmoid(beta * m) for m in _margins()]
    losses, _, _ = dpo_loss(*_tensors(), beta=beta, reduction="none")
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-14)
    mean, _, _ = dpo_loss(*_tensors(), beta=beta)
    assert mean.item() == pytest.approx(sum(expected) / 3, abs=1e-14)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_formula(beta):
    expected = [(m - 1 / (2 * beta)) ** 2 for m in _margins()]
    losses, _, _ = dpo_loss(*_tensors(), beta=beta, kind="ipo", reduction="none")
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_hinge_matches_formula(beta):
    expected = [max(0.0, 1 - beta * m) for m in _margins()]
    losses, _, _ = dpo_loss(*_tensors(), beta=beta, kind="hinge", reduction="none")
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-14)
    total, _, _ = dpo_loss(*_tensors(), beta=beta, kind="hinge", reduction="sum")
    assert total.item() == pytest.approx(sum(expected), abs=1e-13)


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("smoothing", [0.0, 0.2, 0.4])
def test_robust_matches_formula_and_is_unbiased_under_label_flips(beta, smoothing):
    s = smoothing

    def robust(m):
        return (-(1 - s) * _log_sigmoid(beta * m) + s * _log_sigmoid(-beta * m)) / (1 - 2 * s)

    expected = [robust(m) for m in _margins()]
    losses, _, _ = dpo_loss(*_tensors(), beta=beta, kind="robust", label_smoothing=s, reduction="none")
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-13)
    # a label flipped with probability s: the expected robust loss is the clean DPO loss -log sigmoid(beta m)
    for m in _margins():
        assert (1 - s) * robust(m) + s * robust(-m) == pytest.approx(-_log_sigmoid(beta * m), abs=1e-12)


def test_sigmoid_gradient_matches_formula():
    beta = 0.3
    pc, pr, rc, rr = _tensors()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, reduction="sum")
    loss.backward()
    # d/dm [-log sig(b m)] = -b sig(-b m)
    sig = [1 / (1 + math.exp(-x)) for x in (beta * m for m in _margins())]
    expected = torch.tensor([-beta * (1 - q) for q in sig], dtype=torch.float64)
    torch.testing.assert_close(pc.grad, expected)
    torch.testing.assert_close(pr.grad, -expected)


def test_rewards_are_detached_scaled_log_ratios():
    pc, pr, rc, rr = _tensors()
    pc.requires_grad_(True)
    _, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.2)
    assert not chosen.requires_grad
    expected_chosen = [0.2 * (a - b) for a, b in zip(PC, RC, strict=True)]
    expected_rejected = [0.2 * (a - b) for a, b in zip(PR, RR, strict=True)]
    torch.testing.assert_close(chosen, torch.tensor(expected_chosen, dtype=torch.float64))
    torch.testing.assert_close(rejected, torch.tensor(expected_rejected, dtype=torch.float64))
    torch.testing.assert_close(implicit_rewards(pc, rc, 0.2), chosen)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 0.1, "kind": "orpo"}, "kind"),
        ({"beta": 0.1, "kind": "ipo", "label_smoothing": 0.1}, "label_smoothing applies to kind 'robust' only"),
        ({"beta": 0.1, "kind": "sigmoid", "label_smoothing": 0.3}, "label_smoothing applies to kind 'robust' only"),
        ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
        ({"beta": 0.1, "reduction": "max"}, "reduction"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss(*_tensors(), **kwargs)


def test_mismatched_batches_raise():
    pc, pr, rc, rr = _tensors()
    with pytest.raises(ValueError, match="batch sizes differ"):
        dpo_loss(pc, pr[:2], rc, rr, beta=0.1)


def test_sequence_logps_weighted_sum_ignores_padding():
    token_logps = torch.tensor([[-1.0, -2.0, -float("inf")], [-0.5, -0.25, -4.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    weights = torch.tensor([[2.0, 0.5, 7.0], [1.0, 0.0, 0.5]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), torch.tensor([-3.0, -4.75]))
    torch.testing.assert_close(sequence_logps(token_logps, mask, weights), torch.tensor([-3.0, -2.5]))


def test_sequence_logps_rejects_non_bool_mask():
    with pytest.raises(ValueError, match="bool"):
        sequence_logps(torch.zeros(1, 2), torch.ones(1, 2))
