"""``Regularizer.evaluate``: the penalty, its statistics and the support gradient from one pass: one log-softmax
per chunk of positions and one solve per position, with results identical to the separate calls."""

from __future__ import annotations

import pytest
import torch

from otalign.regularizers import FDivergenceRegularizer, WassersteinRegularizer
from otalign.regularizers.base import Positions

pytestmark = pytest.mark.usefixtures("torch_single_thread")

B, T, V, D, K = 3, 5, 64, 6, 4


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ref = 3.0 * torch.randn(B, T, V, generator=gen)
    policy = ref + 0.3 * torch.randn(B, T, V, generator=gen)
    actions = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) > 0.3
    embeddings = torch.randn(V, D, generator=gen) / (2 * D) ** 0.5
    return policy, ref, actions, mask, embeddings


class Counter:
    """Counts the positions each patched call handles and how often it is called."""

    def __init__(self) -> None:
        self.calls, self.positions = 0, 0


def count_solves(monkeypatch) -> Counter:
    counter = Counter()
    solve = WassersteinRegularizer.solve

    def counted(self, problem):
        counter.calls += 1
        counter.positions += problem.a.shape[0]
        return solve(self, problem)

    monkeypatch.setattr(WassersteinRegularizer, "solve", counted)
    return counter


def count_log_softmax(monkeypatch) -> Counter:
    counter = Counter()
    log_probs = Positions.log_probs

    def counted(self, start, stop, dtype=torch.float32):
        counter.calls += 1
        counter.positions += stop - start
        return log_probs(self, start, stop, dtype)

    monkeypatch.setattr(Positions, "log_probs", counted)
    return counter


def assert_same_gradient(one, other) -> None:
    for name in ("tokens", "distinct", "phi", "dust", "value"):
        first, second = getattr(one, name), getattr(other, name)
        assert (first is None and second is None) or torch.equal(first, second), name


@pytest.mark.parametrize(("transport", "debias"), [("smooth", False), ("difference", False), ("full", True)])
def test_wasserstein_evaluate_solves_each_position_once(monkeypatch, transport, debias):
    policy, ref, actions, mask, embeddings = inputs()
    # small chunks: several log-softmax chunks (7 positions each) and several Sinkhorn chunks
    settings = dict(top_k=K, transport=transport, debias=debias, max_iter=300, max_chunk_elements=7 * V)
    regularizer = WassersteinRegularizer(embeddings, **settings)
    separate_penalty = regularizer.penalty(policy, ref, actions, mask)
    separate_gradient = regularizer.support_gradient(policy, ref, actions, mask)

    solves, softmaxes = count_solves(monkeypatch), count_log_softmax(monkeypatch)
    out = regularizer.evaluate(policy, ref, actions, mask, support_gradient=True)
    generated = int(mask.sum())
    assert solves.positions == generated and solves.calls > 1  # each position solved once, in several chunks
    assert softmaxes.positions == generated and softmaxes.calls == -(-generated // 7)  # one log-softmax per chunk
    assert torch.equal(out.penalty.per_token, separate_penalty.per_token)
    assert out.penalty.stats == separate_penalty.stats
    assert_same_gradient(out.gradient, separate_gradient)
    # the penalty is the sampled token's slot of the gradient (slot 0)
    torch.testing.assert_close(out.gradient.phi[:, 0].float(), out.penalty.per_token[mask], rtol=0, atol=0)

    without = regularizer.evaluate(policy, ref, actions, mask)
    assert without.gradient is None and torch.equal(without.penalty.per_token, separate_penalty.per_token)


@pytest.mark.parametrize("kind", ["rkl", "js"])
def test_f_divergence_evaluate_takes_one_log_softmax_per_chunk(monkeypatch, kind):
    policy, ref, actions, mask, _ = inputs(1)
    regularizer = FDivergenceRegularizer(kind, max_chunk_elements=4 * V)
    separate_penalty = regularizer.penalty(policy, ref, actions, mask)
    separate_gradient = regularizer.support_gradient(policy, ref, actions, mask)

    softmaxes = count_log_softmax(monkeypatch)
    out = regularizer.evaluate(policy, ref, actions, mask, support_gradient=True)
    assert softmaxes.positions == int(mask.sum())
    assert torch.equal(out.penalty.per_token, separate_penalty.per_token)
    assert out.penalty.stats == separate_penalty.stats
    assert_same_gradient(out.gradient, separate_gradient)


def test_no_generated_position_gives_an_empty_result():
    policy, ref, actions, _, embeddings = inputs()
    mask = torch.zeros(B, T, dtype=torch.bool)
    out = WassersteinRegularizer(embeddings, top_k=K).evaluate(policy, ref, actions, mask, support_gradient=True)
    assert torch.equal(out.penalty.per_token, torch.zeros(B, T))
    assert out.penalty.stats == {"penalty/mean": 0.0}
    assert out.gradient.tokens.shape == (0, 2 * K + 1) and out.gradient.value.shape == (0,)


def test_the_embeddings_are_not_replaced_when_the_logits_are_elsewhere():
    """The regularizer keeps a copy per device instead of moving ``self.embeddings`` (which callers may share)."""
    _, _, _, _, embeddings = inputs()
    regularizer = WassersteinRegularizer(embeddings, top_k=K)
    moved, radius = regularizer._embeddings_on(torch.device("meta"))
    assert moved.device.type == "meta" and radius is None
    assert regularizer.embeddings is not moved and regularizer.embeddings.device.type == "cpu"
    assert regularizer._embeddings_on(torch.device("meta"))[0] is moved  # copied once, then reused
