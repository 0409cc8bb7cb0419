"""The top-k contract (``TopKLogProbs``): the Wasserstein penalty and its support gradient from O(k) numbers per
position, equal to the full-logits path, with no V-sized tensor; the slot surrogate; the f-divergences' sampled-token
penalty; validation errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from otalign.regularizers import FDivergenceRegularizer, TopKLogProbs, WassersteinRegularizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def inputs(n: int, vocab: int, dim: int, *, seed: int = 0, scale: float = 1.0, dtype=torch.float32):
    """``n`` positions: reference logits 3 N(0, 1), policy = reference + 0.3 N(0, 1), sampled tokens from the policy,
    embeddings ``scale * N(0, 1/(2 dim))`` (pairwise distances about ``scale``)."""
    gen = torch.Generator().manual_seed(seed)
    ref = 3.0 * torch.randn(n, vocab, generator=gen, dtype=dtype)
    policy = ref + 0.3 * torch.randn(n, vocab, generator=gen, dtype=dtype)
    actions = torch.multinomial(policy.float().softmax(-1), 1, generator=gen)[:, 0]
    embeddings = scale * torch.randn(vocab, dim, generator=gen) / (2 * dim) ** 0.5
    return policy, ref, actions, embeddings


def full_path(regularizer, policy, ref, actions, **kwargs):
    """The full-logits call on ``n`` positions laid out as one (1, n, V) rollout."""
    return regularizer.evaluate(policy[None], ref[None], actions[None], **kwargs)


def record_of(policy, ref, actions, top_k):
    return TopKLogProbs.from_log_probs(policy.log_softmax(-1), ref.log_softmax(-1), actions, top_k)


def test_from_log_probs_lists_each_side_and_its_counterpart():
    policy, ref, actions, _ = inputs(4, 50, 3)
    lp, lq = policy.log_softmax(-1), ref.log_softmax(-1)
    record = TopKLogProbs.from_log_probs(lp, lq, actions, 5)
    for row in range(4):
        assert set(record.policy_ids[row].tolist()) == set(lp[row].topk(5).indices.tolist())
        assert set(record.ref_ids[row].tolist()) == set(lq[row].topk(5).indices.tolist())
        assert torch.equal(record.policy_logprobs[row], lp[row, record.policy_ids[row]])
        assert torch.equal(record.ref_at_policy_ids[row], lq[row, record.policy_ids[row]])
        assert torch.equal(record.ref_logprobs[row], lq[row, record.ref_ids[row]])
        assert torch.equal(record.policy_at_ref_ids[row], lp[row, record.ref_ids[row]])
    assert torch.equal(record.policy_at_actions, lp[torch.arange(4), actions])
    assert torch.equal(record.ref_at_actions, lq[torch.arange(4), actions])
    record.check(vocab=50)


@pytest.mark.parametrize(
    ("n", "vocab", "dim", "scale", "top_k", "transport"),
    [
        (12, 40, 4, 1.0, 6, "smooth"),
        (12, 40, 4, 1.0, 6, "difference"),
        (12, 40, 4, 1.0, 6, "full"),
        # shaped like the default model (SmolLM2: V = 49152, d = 576, embedding distances about 3)
        (6, 49152, 576, 3.0, 64, "smooth"),
    ],
    ids=["random-smooth", "random-difference", "random-full", "real-shaped-smooth"],
)
def test_topk_path_equals_the_full_logits_path(n, vocab, dim, scale, top_k, transport):
    policy, ref, actions, embeddings = inputs(n, vocab, dim, scale=scale)
    regularizer = WassersteinRegularizer(embeddings, top_k=top_k, transport=transport, max_iter=300)
    full = full_path(regularizer, policy, ref, actions, support_gradient=True)
    topk = regularizer.evaluate_topk(record_of(policy, ref, actions, top_k), support_gradient=True)

    assert topk.penalty.per_token.shape == (n,)
    torch.testing.assert_close(topk.penalty.per_token, full.penalty.per_token[0], rtol=0, atol=1e-6)
    assert set(full.penalty.stats) - set(topk.penalty.stats) == {"kl/exact"}  # the only full-vocabulary statistic
    for name, value in topk.penalty.stats.items():
        assert value == pytest.approx(full.penalty.stats[name], rel=1e-6, abs=1e-6), name
    assert torch.equal(topk.gradient.tokens, full.gradient.tokens)  # the same support, slot for slot
    assert torch.equal(topk.gradient.distinct, full.gradient.distinct)
    for name in ("phi", "dust", "value"):
        torch.testing.assert_close(getattr(topk.gradient, name), getattr(full.gradient, name), rtol=0, atol=1e-6)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_topk_path_allocates_nothing_of_the_vocabulary_size():
    vocab, top_k = 60_000, 8
    policy, ref, actions, _ = inputs(5, vocab, 1)
    record = record_of(policy, ref, actions, top_k)
    embeddings = torch.randn(vocab, 4)
    regularizer = WassersteinRegularizer(embeddings, top_k=top_k, smooth_tau=0.1, max_iter=20, newton_steps=0)
    with LargestTensor() as largest:
        out = regularizer.evaluate_topk(record, support_gradient=True)
    assert torch.isfinite(out.penalty.per_token).all()
    assert 0 < largest.numel < 5_000  # (n, 2k + 2, 2k + 2) problems and (n, 2k + 1, d) embedding rows at most
    with LargestTensor() as largest:
        full_path(regularizer, policy, ref, actions)
    assert largest.numel >= vocab  # the check sees V-sized tensors where there are some


def test_slot_surrogate_equals_the_vocabulary_surrogate_in_value_and_gradient():
    policy, ref, actions, embeddings = inputs(6, 30, 3, dtype=torch.float64)
    embeddings = embeddings.double()
    regularizer = WassersteinRegularizer(embeddings, top_k=4, max_iter=2000, tol=1e-10)
    gradient = regularizer.evaluate_topk(record_of(policy, ref, actions, 4), support_gradient=True).gradient

    logits = policy.clone().requires_grad_(True)
    log_probs = logits.log_softmax(-1)
    over_vocab = gradient.surrogate(log_probs)
    (grad_vocab,) = torch.autograd.grad(over_vocab.sum(), logits)
    # the gathered form: log-probabilities at the support slots only (gathered logits minus the log-sum-exp)
    logits = policy.clone().requires_grad_(True)
    slots = logits.gather(1, gradient.tokens) - logits.logsumexp(-1, keepdim=True)
    at_slots = gradient.surrogate_at_slots(slots)
    (grad_slots,) = torch.autograd.grad(at_slots.sum(), logits)
    torch.testing.assert_close(at_slots, over_vocab, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_slots, grad_vocab, rtol=0, atol=1e-12)
    torch.testing.assert_close(at_slots.detach(), gradient.value, rtol=1e-9, atol=1e-10)  # the surrogate's value is D
    assert grad_slots.abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"slot_logprobs must be \(N, s\)"):
        gradient.surrogate_at_slots(slots[:, :-1])


@pytest.mark.parametrize("kind", ["rkl", "js", "chi2"])
def test_f_divergence_sampled_token_penalty_from_the_record(kind):
    policy, ref, actions, _ = inputs(7, 25, 2)
    regularizer = FDivergenceRegularizer(kind)
    record = record_of(policy, ref, actions, 3)
    out = regularizer.evaluate_topk(record)
    assert torch.equal(out.penalty.per_token, full_path(regularizer, policy, ref, actions).penalty.per_token[0])
    assert set(out.penalty.stats) == {"penalty/mean"}
    assert out.gradient is None
    log_ratio = policy.log_softmax(-1) - ref.log_softmax(-1)
    torch.testing.assert_close(record.sampled_log_ratio(), log_ratio[torch.arange(7), actions], rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="whole vocabulary"):
        regularizer.evaluate_topk(record, support_gradient=True)


def test_record_errors_name_the_field_and_the_position():
    policy, ref, actions, embeddings = inputs(3, 20, 2)
    record = record_of(policy, ref, actions, 4)
    with pytest.raises(ValueError, match="policy_ids must be an int64"):
        dataclasses.replace(record, policy_ids=record.policy_ids.int())
    with pytest.raises(ValueError, match=r"ref_at_policy_ids must have shape \(3, 4\)"):
        dataclasses.replace(record, ref_at_policy_ids=record.ref_at_policy_ids[:, :3])
    with pytest.raises(ValueError, match="ref_logprobs must be a floating-point"):
        dataclasses.replace(record, ref_logprobs=record.ref_ids)
    with pytest.raises(ValueError, match=r"actions must be \(N,\)"):
        dataclasses.replace(record, actions=record.actions[:, None])

    regularizer = WassersteinRegularizer(embeddings, top_k=4)
    ids = record.ref_ids.clone()
    ids[1, 0] = 20
    with pytest.raises(ValueError, match=r"ref_ids holds ids outside \[0, 20\) at position 1"):
        regularizer.evaluate_topk(dataclasses.replace(record, ref_ids=ids))
    ids = record.policy_ids.clone()
    ids[2, 1] = ids[2, 0]
    with pytest.raises(ValueError, match="policy_ids lists an id twice at position 2"):
        regularizer.evaluate_topk(dataclasses.replace(record, policy_ids=ids))
    regularizer.evaluate_topk(dataclasses.replace(record, policy_ids=ids), check=False)  # trusted input: no check
    with pytest.raises(ValueError, match="policy_at_actions must hold normalised log-probabilities"):
        regularizer.evaluate_topk(dataclasses.replace(record, policy_at_actions=record.policy_at_actions + 5.0))
    small = torch.full((1, 4), -3.0)
    heavy = TopKLogProbs(  # disjoint ids; the policy lists 4 x 0.3 + 5 x e^-3 of its mass
        actions=torch.tensor([8]),
        policy_ids=torch.arange(4)[None],
        policy_logprobs=torch.full((1, 4), 0.3).log(),
        ref_ids=torch.arange(4, 8)[None],
        ref_logprobs=small,
        policy_at_ref_ids=small,
        ref_at_policy_ids=small,
        policy_at_actions=torch.tensor([-3.0]),
        ref_at_actions=torch.tensor([-3.0]),
    )
    with pytest.raises(ValueError, match=r"the policy's listed tokens hold mass 1.4489\d* > 1 at position 0"):
        regularizer.evaluate_topk(heavy)
    # a token the reference lists gets another log-probability at the sampled-token entry
    row = 0
    clash = record.ref_at_actions.clone()
    clash[row] = record.ref_logprobs[row, 0] - 1.0
    clash_actions = record.actions.clone()
    clash_actions[row] = record.ref_ids[row, 0]
    policy_at = record.policy_at_actions.clone()
    policy_at[row] = record.policy_at_ref_ids[row, 0]
    moved = dataclasses.replace(record, actions=clash_actions, policy_at_actions=policy_at)
    regularizer.evaluate_topk(
        dataclasses.replace(
            moved,
            ref_at_actions=record.ref_at_actions.clone().index_fill_(
                0, torch.tensor([row]), float(record.ref_logprobs[row, 0])
            ),
        )
    )  # consistent: accepted
    with pytest.raises(ValueError, match="two different reference log-probabilities at position 0"):
        regularizer.evaluate_topk(dataclasses.replace(moved, ref_at_actions=clash))
    with pytest.raises(ValueError, match="record must be a TopKLogProbs"):
        regularizer.evaluate_topk({"actions": actions})
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, V\]"):
        TopKLogProbs.from_log_probs(policy, ref, actions, 21)


def test_which_regularizers_take_a_record():
    from otalign.regularizers import Regularizer

    class Constant(Regularizer):
        def _penalize(self, positions):
            raise AssertionError

    _, _, _, embeddings = inputs(1, 10, 2)
    assert WassersteinRegularizer(embeddings, top_k=2).has_topk and FDivergenceRegularizer("tv").has_topk
    assert not Constant().has_topk
    with pytest.raises(NotImplementedError, match="Constant needs full logits"):
        Constant().evaluate_topk(record_of(*inputs(2, 10, 2)[:3], 2))
