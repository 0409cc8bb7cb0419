r"""The otalign side of WPR inside OpenRLHF: the reference actor returns top-k fields along with its action
log-probabilities, and the Wasserstein penalty goes into the per-token reward (in place of the KL passed to
``compute_reward``) or its surrogate into the actor loss (in place of the ``kl.use_loss`` term). Pure torch: OpenRLHF
itself is imported only by the recipe in ``examples/openrlhf/``.

Layout, as OpenRLHF's ``Actor.forward`` has it (no sample packing): ``sequences`` (B, S) prompt + response token ids,
``action_mask`` (B, A) over the last A positions, and the model's ``output["logits"]`` (B, S, V), whose row
``t`` predicts token ``t + 1``: the logits of the A actions are ``logits[:, -A - 1 : -1]``, the actions
``sequences[:, -A:]``, and OpenRLHF divides the logits by its sampling temperature first.

The support of each position is the sampled token and the reference's top-k (:mod:`otalign.integrations.topk`).
"""

from __future__ import annotations

import torch

from otalign.regularizers import Regularizer

from .topk import gathered_log_probs, reference_topk_record, topk_surrogate

REF_TOPK_IDS = "ref_topk_ids"
REF_TOPK_LOGPROBS = "ref_topk_logprobs"
REF_ACTION_LOGPROBS = "ref_action_logprobs"
EXACT_IDS = 2**24
"""Token ids below this are exact in float32 (:func:`pack_reference`)."""


def action_logits(
    logits: torch.Tensor, sequences: torch.Tensor, action_mask: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits (B, A, V) / temperature, actions (B, A))`` at the A action positions (see the module)."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(sequences.shape):
        raise ValueError(
            f"logits must be (B, S, V) over sequences (B, S) (no sample packing), got {tuple(logits.shape)} and "
            f"{tuple(sequences.shape)}"
        )
    steps = action_mask.shape[1]
    if action_mask.dim() != 2 or action_mask.shape[0] != sequences.shape[0] or not 0 < steps < sequences.shape[1]:
        raise ValueError(f"action_mask must be (B, A) with 0 < A < S = {sequences.shape[1]}, got {action_mask.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits[:, -steps - 1 : -1] / temperature, sequences[:, -steps:]


@torch.no_grad()
def reference_topk(
    ref_logits: torch.Tensor,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    top_k: int,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    r"""What the reference actor returns for the penalty: its top-k at each action position.

    Args:
        ref_logits: (B, S, V) the reference model's ``output["logits"]``.
        sequences: (B, S) token ids.
        action_mask: (B, A) the response positions (only its shape is read: every position is filled).
        top_k: k, 1 <= k <= V.
        temperature: OpenRLHF's ``temperature`` (the logits are divided by it, as its log-probabilities are).

    Returns:
        ``{REF_TOPK_IDS: (B, A, k) int64, REF_TOPK_LOGPROBS: (B, A, k) float32, REF_ACTION_LOGPROBS: (B, A)
        float32}``: the top-k ids, :math:`\log\pi_{ref}` there, and :math:`\log\pi_{ref}(y)` (OpenRLHF's
        ``base_action_log_probs`` before its action-mask multiplication).
    """
    logits, actions = action_logits(ref_logits, sequences, action_mask, temperature)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must be an integer in [1, V] = [1, {logits.shape[-1]}], got {top_k!r}")
    flat = logits.reshape(-1, logits.shape[-1])
    ids = flat.topk(top_k, dim=-1).indices
    logprobs = gathered_log_probs(flat, torch.cat([actions.reshape(-1, 1), ids], dim=1))
    shape = actions.shape
    return {
        REF_TOPK_IDS: ids.view(*shape, top_k),
        REF_TOPK_LOGPROBS: logprobs[:, 1:].reshape(*shape, top_k),
        REF_ACTION_LOGPROBS: logprobs[:, 0].reshape(shape),
    }


def pack_reference(reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """One (B, A, 1 + 2k) float32 tensor ``[log pi_ref(y) | top-k log-probabilities | top-k ids]`` holding
    :func:`reference_topk`'s fields, for a framework that carries one reference tensor per experience (OpenRLHF's
    ``base_action_log_probs``, split and batched along B as the log-probabilities are). Ids are exact in float32
    below :data:`EXACT_IDS`."""
    ids = reference[REF_TOPK_IDS]
    if ids.numel() and int(ids.max()) >= EXACT_IDS:
        raise ValueError(f"pack_reference: token ids must be < {EXACT_IDS} to be exact in float32")
    action = reference[REF_ACTION_LOGPROBS].float()[..., None]
    return torch.cat([action, reference[REF_TOPK_LOGPROBS].float(), ids.float()], dim=-1)


def unpack_reference(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`pack_reference`'s (B, A, 1 + 2k) tensor back to the fields of :func:`reference_topk`."""
    if packed.dim() != 3 or packed.shape[-1] < 3 or packed.shape[-1] % 2 != 1:
        raise ValueError(f"packed must be (B, A, 1 + 2k) from pack_reference, got {tuple(packed.shape)}")
    k = (packed.shape[-1] - 1) // 2
    return {
        REF_ACTION_LOGPROBS: packed[..., 0],
        REF_TOPK_LOGPROBS: packed[..., 1 : 1 + k],
        REF_TOPK_IDS: packed[..., 1 + k :].round().long(),
    }


def _record(policy_logits, sequences, action_mask, reference, temperature):
    """The masked positions' (N, V) policy logits and their record (:func:`reference_topk_record`)."""
    logits, actions = action_logits(policy_logits, sequences, action_mask, temperature)
    mask = action_mask.bool()
    rows = logits[mask]
    record = reference_topk_record(
        rows,
        reference[REF_TOPK_IDS][mask],
        reference[REF_TOPK_LOGPROBS][mask],
        actions[mask],
        reference[REF_ACTION_LOGPROBS][mask],
    )
    return mask, rows, record


@torch.no_grad()
def topk_penalty(
    regularizer: Regularizer,
    policy_logits: torch.Tensor,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    reference: dict[str, torch.Tensor],
    temperature: float = 1.0,
    *,
    check: bool = True,
) -> torch.Tensor:
    """(B, A) float32 the regularizer's per-token penalty at the sampled tokens (0 outside ``action_mask``): pass it
    as ``kl`` to OpenRLHF's ``compute_reward(r, kl_coef, kl, action_mask)``, which adds ``-kl_coef * kl``.

    Args:
        regularizer: any otalign regularizer with a top-k form (``wasserstein``; the f-divergences' sampled-token
            penalties need only the two log-probabilities at the action).
        policy_logits: (B, S, V) the actor's ``output["logits"]``.
        sequences, action_mask, temperature: as :func:`reference_topk`.
        reference: the reference actor's :func:`reference_topk` of the same batch.
        check: validate the reference's entries.
    """
    mask, _, record = _record(policy_logits, sequences, action_mask, reference, temperature)
    values = regularizer.evaluate_topk(record, check=check).penalty.per_token
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_scatter(mask, values.float())


def topk_surrogate_loss_term(
    regularizer: Regularizer,
    policy_logits: torch.Tensor,
    sequences: torch.Tensor,
    action_mask: torch.Tensor,
    reference: dict[str, torch.Tensor],
    temperature: float = 1.0,
    *,
    check: bool = True,
) -> torch.Tensor:
    r"""(B, A) float32 (float64 from float64 logits) the support-gradient surrogate (value: the distance; gradient:
    the distance's), differentiable in ``policy_logits`` (the actor's training forward), 0 outside ``action_mask``:
    aggregate it as OpenRLHF aggregates its ``kl.use_loss`` term (``aggregate_loss(term, action_mask, ...)``) and
    scale by the coefficient.

    Args: as :func:`topk_penalty`; ``regularizer`` needs a top-k support gradient (``wasserstein``).
    """
    mask, rows, record = _record(policy_logits, sequences, action_mask, reference, temperature)
    surrogate, _ = topk_surrogate(regularizer, rows, record, check=check)
    return torch.zeros(mask.shape, dtype=surrogate.dtype, device=mask.device).masked_scatter(mask, surrogate)
