"""The otalign side of the OpenRLHF recipe (``otalign.integrations.openrlhf``) on tensors shaped as OpenRLHF's
``Actor.forward`` has them (``output["logits"]`` (B, S, V), ``sequences`` (B, S), ``action_mask`` (B, A)): the
reference's top-k fields, the per-token reward penalty and the loss surrogate equal otalign's full-logits path
where the supports agree, and masked positions are 0 with no gradient. (OpenRLHF itself is not imported: it needs
CUDA, Ray, DeepSpeed and vLLM.)"""

from __future__ import annotations

import pytest
import torch

from otalign.integrations.openrlhf import (
    REF_ACTION_LOGPROBS,
    REF_TOPK_IDS,
    REF_TOPK_LOGPROBS,
    pack_reference,
    reference_topk,
    topk_penalty,
    topk_surrogate_loss_term,
    unpack_reference,
)
from otalign.regularizers import build_regularizer

VOCAB, DIM, K, PROMPT, ACTIONS = 40, 6, 4, 3, 5
TEMPERATURE = 0.8


def wasserstein():
    embeddings = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return build_regularizer("wasserstein", embeddings=embeddings, top_k=K, tol=1e-12, max_iter=5000)


def batch(seed=0, boost=True):
    """Policy and reference logits over prompt + response (B, S, V), the sequences and an action mask with a padded
    tail. With ``boost`` the same k tokens lead both sides at every action position, and each sampled token is one
    of them, so otalign's support ``[y | policy top-k | reference top-k]`` is the reference's top-k plus y."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, PROMPT + ACTIONS, VOCAB)
    ref = torch.randn(shape, generator=gen, dtype=torch.float64)
    boosted = torch.rand(shape, generator=gen).argsort(-1)[..., :K]
    if boost:
        ref.scatter_add_(-1, boosted, torch.full(boosted.shape, 8.0 * TEMPERATURE, dtype=torch.float64))
    policy = ref + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)
    sequences = torch.randint(VOCAB, shape[:2], generator=gen)
    sequences[:, 1:] = boosted[:, :-1, 0]  # the token each row's logits predict is one of the boosted ones
    mask = torch.ones(2, ACTIONS, dtype=torch.bool)
    mask[1, -2:] = False  # a shorter second response
    return policy, ref, sequences, mask


def full_logits(logits, sequences):
    """OpenRLHF's action-position logits, tempered: row t predicts token t + 1."""
    return logits[:, -ACTIONS - 1 : -1] / TEMPERATURE, sequences[:, -ACTIONS:]


def test_reference_topk_fields():
    _, ref, sequences, mask = batch()
    fields = reference_topk(ref, sequences, mask, K, TEMPERATURE)
    logits, actions = full_logits(ref, sequences)
    logprobs = logits.log_softmax(-1)
    assert fields[REF_TOPK_IDS].shape == (2, ACTIONS, K)
    torch.testing.assert_close(fields[REF_TOPK_LOGPROBS], logprobs.topk(K, dim=-1).values)
    torch.testing.assert_close(fields[REF_TOPK_LOGPROBS], logprobs.gather(-1, fields[REF_TOPK_IDS]))
    # OpenRLHF's base_action_log_probs: log_softmax(logits / T) at the rolled sequence, [:, :-1][:, -A:]
    rolled = torch.roll(sequences, shifts=-1, dims=1)
    theirs = (ref / TEMPERATURE).log_softmax(-1).gather(-1, rolled[..., None])[..., 0][:, :-1][:, -ACTIONS:]
    torch.testing.assert_close(fields[REF_ACTION_LOGPROBS], theirs)


@pytest.mark.parametrize("name", ["wasserstein", "kl", "js"])
def test_reward_penalty_equals_the_full_logits_penalty(name):
    """The penalty OpenRLHF adds to the reward (``-kl_coef * kl``) is otalign's full-logits ``penalty`` at the same
    positions: exactly for the f-divergences (sampled-token penalties), and for wasserstein where the supports
    agree."""
    reg = wasserstein() if name == "wasserstein" else build_regularizer(name)
    policy, ref, sequences, mask = batch(boost=name == "wasserstein")
    fields = reference_topk(ref, sequences, mask, K, TEMPERATURE)
    got = topk_penalty(reg, policy, sequences, mask, fields, TEMPERATURE)
    (policy_logits, actions), (ref_logits, _) = full_logits(policy, sequences), full_logits(ref, sequences)
    want = reg.penalty(policy_logits, ref_logits, actions, mask).per_token
    assert got.shape == mask.shape and float(got.abs().max()) > 1e-4
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-6, rtol=1e-6)
    assert float(got[~mask].abs().max()) == 0


def test_loss_surrogate_equals_the_full_logits_surrogate():
    reg = wasserstein()
    policy, ref, sequences, mask = batch()
    fields = reference_topk(ref, sequences, mask, K, TEMPERATURE)
    logits = policy.clone().requires_grad_(True)
    term = topk_surrogate_loss_term(reg, logits, sequences, mask, fields, TEMPERATURE)
    (term.sum()).backward()

    oracle = policy.clone().requires_grad_(True)
    (policy_logits, actions), (ref_logits, _) = full_logits(oracle, sequences), full_logits(ref, sequences)
    evaluation = reg.evaluate(policy_logits.detach(), ref_logits, actions, mask, support_gradient=True)
    evaluation.gradient.surrogate(policy_logits.log_softmax(-1)[mask]).sum().backward()
    torch.testing.assert_close(term.detach()[mask], evaluation.gradient.value, atol=1e-9, rtol=1e-6)
    assert float(evaluation.gradient.value.min()) > 1e-4
    torch.testing.assert_close(logits.grad, oracle.grad, atol=1e-9, rtol=1e-6)
    assert float(term.detach()[~mask].abs().max()) == 0
    rows = torch.zeros_like(mask)
    rows[~mask] = True  # the masked actions' logits rows get no gradient
    assert float(logits.grad[:, -ACTIONS - 1 : -1][rows].abs().max()) == 0


def test_bad_layouts_are_refused():
    policy, ref, sequences, mask = batch()
    with pytest.raises(ValueError, match="no sample packing"):
        reference_topk(ref[:, 1:], sequences, mask, K)
    with pytest.raises(ValueError, match="action_mask"):
        reference_topk(ref, sequences, torch.ones(2, PROMPT + ACTIONS, dtype=torch.bool), K)
    with pytest.raises(ValueError, match="top_k"):
        reference_topk(ref, sequences, mask, VOCAB + 1)


def test_pack_and_unpack_reference():
    """The fields survive the one-tensor form OpenRLHF carries per experience (ids exact in float32)."""
    _, ref, sequences, mask = batch()
    fields = reference_topk(ref, sequences, mask, K, TEMPERATURE)
    fields[REF_TOPK_IDS][0, 0, 0] = 151_935  # a large real vocabulary's last id
    packed = pack_reference(fields)
    assert packed.shape == (2, ACTIONS, 1 + 2 * K) and packed.dtype == torch.float32
    back = unpack_reference(packed)
    assert torch.equal(back[REF_TOPK_IDS], fields[REF_TOPK_IDS])
    torch.testing.assert_close(back[REF_TOPK_LOGPROBS], fields[REF_TOPK_LOGPROBS].float())
    torch.testing.assert_close(back[REF_ACTION_LOGPROBS], fields[REF_ACTION_LOGPROBS].float())
    fields[REF_TOPK_IDS][0, 0, 0] = 2**24
    with pytest.raises(ValueError, match="exact in float32"):
        pack_reference(fields)
    with pytest.raises(ValueError, match="1 \\+ 2k"):
        unpack_reference(packed[..., :-1])
