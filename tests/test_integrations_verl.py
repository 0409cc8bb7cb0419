"""The otalign side of the verl recipe (``otalign.integrations.verl``) on tensors shaped as verl's top-k
distillation logits processor gets them (student logits (bsz, T, V), the teacher's top-k ids and log-probabilities
(bsz, T, k)): the distance and the surrogate's gradient equal the full-logits ``evaluate`` where the supports agree,
the gradient is a finite difference of the distance, and masked positions are neither read nor differentiated.
(verl itself is not imported: it needs CUDA, Ray and vLLM.)"""

from __future__ import annotations

import pytest
import torch

from otalign.integrations.verl import wasserstein_topk_outputs
from otalign.regularizers import build_regularizer

VOCAB, DIM, K = 48, 6, 5


def regularizer(**kwargs):
    embeddings = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return build_regularizer("wasserstein", embeddings=embeddings, top_k=K, tol=1e-12, max_iter=5000, **kwargs)


def teacher_batch(bsz=2, steps=4, seed=0, dtype=torch.float64):
    """Student and teacher logits whose top-k sets agree (k tokens boosted by +8 on both sides, then the student
    moved by 0.3 N(0, 1)), and the teacher's top-k as verl's teacher server returns it."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(bsz, steps, VOCAB, generator=gen, dtype=dtype)
    boosted = torch.rand(bsz, steps, VOCAB, generator=gen).argsort(-1)[..., :K]
    ref.scatter_add_(-1, boosted, torch.full(boosted.shape, 8.0, dtype=dtype))
    student = ref + 0.3 * torch.randn(ref.shape, generator=gen, dtype=dtype)
    ref_logprobs = ref.log_softmax(-1)
    ids = ref_logprobs.topk(K, dim=-1).indices
    assert torch.equal(ids.sort(-1).values, student.topk(K, dim=-1).indices.sort(-1).values)
    return student, ref, ids, ref_logprobs.gather(-1, ids)


def full_logits_oracle(reg, student, ref, ids, mask):
    """otalign's own path: ``evaluate`` on full logits with the sampled token inside the teacher's top-k (so the
    support ``[y | policy top-k | reference top-k]`` is the teacher's top-k); the distance and the full-logits
    surrogate's gradient in the student's logits."""
    student = student.detach().requires_grad_(True)
    evaluation = reg.evaluate(student.detach(), ref, ids[..., 0], mask, support_gradient=True)
    evaluation.gradient.surrogate(student.log_softmax(-1)[mask]).sum().backward()
    return evaluation.gradient.value, student.grad


def test_distance_and_gradient_equal_the_full_logits_path():
    reg = regularizer()
    student, ref, ids, teacher_logprobs = teacher_batch()
    mask = torch.ones(student.shape[:2], dtype=torch.bool)
    logits = student.clone().requires_grad_(True)
    out = wasserstein_topk_outputs(reg, logits, teacher_logprobs, ids)
    assert set(out) == {"distillation_losses", "student_mass", "teacher_mass", "wasserstein_distance"}
    assert all(value.shape == student.shape[:2] for value in out.values())
    out["distillation_losses"].sum().backward()
    distance, grad = full_logits_oracle(reg, student, ref, ids, mask)
    assert float(distance.min()) > 1e-4
    torch.testing.assert_close(out["wasserstein_distance"][mask], distance, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(out["distillation_losses"].detach()[mask], distance, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(logits.grad, grad, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(out["teacher_mass"], teacher_logprobs.exp().sum(-1))
    torch.testing.assert_close(out["student_mass"], student.log_softmax(-1).gather(-1, ids).exp().sum(-1))


@pytest.mark.parametrize("transport", ["smooth", "full"])
def test_surrogate_gradient_is_the_finite_difference_of_the_distance(transport):
    """On the fixed support (the teacher's ids), the directional derivative of the summed surrogate along a random
    direction of the student's logits equals the central difference of the summed distance (float64)."""
    reg = regularizer(transport=transport)
    gen = torch.Generator().manual_seed(3)
    student = 2.0 * torch.randn(2, 3, VOCAB, generator=gen, dtype=torch.float64)
    ref = student + torch.randn(student.shape, generator=gen, dtype=torch.float64)
    ids = ref.topk(K, dim=-1).indices  # not the student's top-k: the support is the teacher's alone
    teacher = ref.log_softmax(-1).gather(-1, ids)
    logits = student.clone().requires_grad_(True)
    wasserstein_topk_outputs(reg, logits, teacher, ids)["distillation_losses"].sum().backward()
    direction = torch.randn(student.shape, generator=gen, dtype=torch.float64)
    analytic = float((logits.grad * direction).sum())

    def distance(step):
        with torch.no_grad():
            return float(
                wasserstein_topk_outputs(reg, student + step * direction, teacher, ids)["wasserstein_distance"].sum()
            )

    numeric = (distance(1e-5) - distance(-1e-5)) / 2e-5
    assert abs(numeric) > 1e-3
    assert analytic == pytest.approx(numeric, rel=1e-6)


def test_masked_positions_are_not_read_and_get_no_gradient():
    reg = regularizer()
    student, ref, ids, teacher_logprobs = teacher_batch(steps=5, seed=1)
    mask = torch.ones(student.shape[:2], dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 0] = False
    ids, teacher_logprobs = ids.clone(), teacher_logprobs.clone()
    ids[~mask] = 0  # the teacher server's padding: repeated pad ids, log-probabilities 0
    teacher_logprobs[~mask] = 0.0
    logits = student.clone().requires_grad_(True)
    out = wasserstein_topk_outputs(reg, logits, teacher_logprobs, ids, mask)
    out["distillation_losses"].sum().backward()
    assert all(float(value.detach()[~mask].abs().max()) == 0 for value in out.values())
    assert float(logits.grad[~mask].abs().max()) == 0
    distance, grad = full_logits_oracle(reg, student, ref, ids, mask)
    torch.testing.assert_close(out["wasserstein_distance"][mask], distance, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(logits.grad, grad, atol=1e-9, rtol=1e-6)
    with pytest.raises(ValueError, match="twice"):  # unmasked, the padding is refused
        wasserstein_topk_outputs(reg, logits, teacher_logprobs, ids)


def test_bad_shapes_are_refused():
    reg = regularizer()
    student, _, ids, teacher_logprobs = teacher_batch()
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        wasserstein_topk_outputs(reg, student, teacher_logprobs, ids[:, :2])
    with pytest.raises(ValueError, match="teacher_topk_log_probs"):
        wasserstein_topk_outputs(reg, student, teacher_logprobs[..., :2], ids)
    with pytest.raises(ValueError, match="mask"):
        wasserstein_topk_outputs(reg, student, teacher_logprobs, ids, torch.ones(1, 1, dtype=torch.bool))
