r"""The otalign side of WPR inside verl: the reference served as a top-k "teacher" through verl's on-policy
distillation path, with a ``wasserstein_topk`` distillation loss. Pure torch: verl itself is imported only by the
recipe in ``examples/verl/``.

verl's distillation (``verl.trainer.distillation``) gets the teacher's top-k ids and log-probabilities per token from
its teacher server (vLLM; ``data["teacher_ids"]``, ``data["teacher_logprobs"]``) and computes the per-token loss in
a logits processor from the student's logits (``(bsz, seqlen/sp, V)``, FSDP/VeOmni: the vocabulary not sharded);
the registered loss function then reads the per-token outputs and verl aggregates them with ``agg_loss`` (plus the
policy loss and ``distillation_loss_coef`` with ``use_task_rewards``). With the teacher's model = the actor's
initial weights, the teacher is the reference and the distillation loss is a regularizer.

:func:`wasserstein_topk_outputs` is that logits processor's computation for WPR: the Wasserstein distance between
student and teacher on the support of the teacher's top-k ids (plus dust: every other token), as its
support-gradient surrogate (value: the distance; gradient: the distance's, :mod:`otalign.integrations.topk`).
verl's logits processor passes no sampled token, so the support is the teacher's top-k alone.
"""

from __future__ import annotations

import torch

from otalign.regularizers import Regularizer

from .topk import reference_topk_record, topk_surrogate


def wasserstein_topk_outputs(
    regularizer: Regularizer,
    student_logits: torch.Tensor,
    teacher_topk_log_probs: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    check: bool = True,
) -> dict[str, torch.Tensor]:
    r"""The per-token outputs verl's top-k distillation loss returns from its logits processor, for WPR.

    Args:
        regularizer: an otalign regularizer with a top-k support gradient (``build_regularizer("wasserstein",
            embeddings=...)``); its vocabulary is the student's V.
        student_logits: (bsz, T, V) the student's (policy's) logits at the positions verl scores, differentiable.
        teacher_topk_log_probs: (bsz, T, k) the teacher's (reference's) log-probabilities at its top-k ids,
            normalised over the vocabulary (vLLM's logprobs).
        teacher_topk_ids: (bsz, T, k) int the teacher's top-k ids (distinct per position).
        mask: (bsz, T) bool, the positions to score; None: all (verl's packed ``thd`` layout holds real tokens
            only). Elsewhere the outputs are 0 and the teacher's entries are not read (padding there is fine).
        check: validate the teacher's entries (ids in range and distinct, log-probabilities normalised).

    Returns:
        ``{"distillation_losses", "student_mass", "teacher_mass", "wasserstein_distance"}``, each (bsz, T) float32
        (float64 from float64 logits),
        0 outside ``mask``: the surrogate (value: the distance :math:`D` in cost units; differentiable in
        ``student_logits``, with the gradient of :math:`D`), the two sides' mass on the teacher's top-k ids (what
        verl logs), and :math:`D` detached.

    Raises:
        ValueError: on shapes that do not match, naming the tensors; see :meth:`TopKLogProbs.check` for values.
    """
    shape = tuple(student_logits.shape[:2])
    if student_logits.dim() != 3 or tuple(teacher_topk_ids.shape[:2]) != shape:
        raise ValueError(
            f"student_logits must be (bsz, T, V) and teacher_topk_ids (bsz, T, k) over the same positions, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_topk_ids.shape)}"
        )
    if teacher_topk_log_probs.shape != teacher_topk_ids.shape:
        raise ValueError(
            f"teacher_topk_log_probs must have the shape of teacher_topk_ids {tuple(teacher_topk_ids.shape)}, got "
            f"{tuple(teacher_topk_log_probs.shape)}"
        )
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=student_logits.device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must be (bsz, T) = {shape}, got {tuple(mask.shape)}")
    mask = mask.bool()
    logits = student_logits[mask]
    record = reference_topk_record(logits, teacher_topk_ids[mask], teacher_topk_log_probs[mask])
    surrogate, evaluation = topk_surrogate(regularizer, logits, record, check=check)
    per_position = {
        "distillation_losses": surrogate,
        "student_mass": record.policy_logprobs.detach().exp().sum(1),
        "teacher_mass": record.ref_logprobs.exp().sum(1),
        "wasserstein_distance": evaluation.gradient.value,
    }
    zeros = torch.zeros(shape, dtype=surrogate.dtype, device=student_logits.device)
    return {name: zeros.masked_scatter(mask, values.to(zeros.dtype)) for name, values in per_position.items()}
