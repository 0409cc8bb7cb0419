r"""Scoring a rollout in micro-batches of rows, in one pass: everything an RL step needs from the two models.

For each chunk of ``chunk_size`` rollouts: one forward of the policy and one of the reference, one log-softmax of
each (in place, on the tempered logits), and from those log-probabilities the sampled tokens' log-probabilities,
the exact full-vocabulary :math:`\mathrm{KL}(\pi\|\pi_{ref})` and entropy, the regularizer's penalty and, when the
penalty goes into the loss, its support gradient from the same solve (:meth:`Regularizer.evaluate`). Only (B, T)
tensors and the support gradient's (B, T, s) tensors outlive a chunk, so the memory of scoring is bounded by one
chunk's (chunk, T, V) logits, whatever the rollout's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from otalign.generation import Rollout, response_logits
from otalign.regularizers import PenaltyOutput, Regularizer, SupportGradient, exact_f_divergence

MAX_STATS = ("sinkhorn/iters", "sinkhorn/marginal_err")
"""Regularizer statistics reduced by their maximum over chunks (and processes); the others are means over the
generated positions."""


@dataclass
class RolloutScores:
    """A rollout scored under no grad (B rollouts, T response positions).

    Attributes:
        old_logprobs, ref_logprobs: (B, T) float32 log-probabilities of the sampled tokens under the tempered
            policy and reference.
        kl, entropy: (B, T) float32 exact full-vocabulary KL(pi || pi_ref) and entropy of pi (nats).
        penalty: the regularizer's :class:`~otalign.regularizers.PenaltyOutput` over the whole rollout.
        gradient: the penalty's :class:`~otalign.regularizers.SupportGradient` laid out on the (B, T) grid (zeros
            off the generated positions), when asked for.
    """

    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    penalty: PenaltyOutput
    gradient: SupportGradient | None = None


Check = Callable[[str, torch.Tensor], None]
"""``check(quantity, tensor)``: a caller's finite check, given ``"policy logits"``, ``"reference logits"`` (as
tempered log-probabilities) and ``"penalty"`` for each chunk."""


def tempered_log_probs(model, rollout: Rollout, rows: slice, temperature: float) -> torch.Tensor:
    """(b, T, V) float32 log-softmax of ``logits / temperature`` for ``rollout[rows]``, computed in place on the
    model's logits when they are float32 already (no second V-sized tensor)."""
    logits = response_logits(model, rollout, rows).float()
    logits.div_(temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def kl_and_entropy_of_log_probs(
    policy: torch.Tensor, ref: torch.Tensor, *, chunk_positions: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact :math:`\mathrm{KL}(\pi\|\pi_{ref}) = \sum_v \pi_v(\log\pi_v - \log\pi_{ref,v})` and
    :math:`H(\pi) = -\sum_v \pi_v\log\pi_v` per position (nats) from normalised (..., V) log-probabilities, in chunks
    of ``chunk_positions`` positions (temporary memory ``chunk_positions x V``). Returns two (...) float32 tensors."""
    shape = policy.shape[:-1]
    p, q = policy.reshape(-1, policy.shape[-1]), ref.reshape(-1, ref.shape[-1])
    kl = torch.empty(p.shape[0], device=p.device)
    entropy = torch.empty_like(kl)
    for start in range(0, p.shape[0], chunk_positions):
        part = slice(start, start + chunk_positions)
        kl[part] = exact_f_divergence(p[part], q[part], "rkl")
        entropy[part] = -(p[part].exp() * p[part]).sum(-1)
    return kl.reshape(shape), entropy.reshape(shape)


def score_rollout(
    policy,
    reference,
    rollout: Rollout,
    regularizer: Regularizer,
    *,
    temperature: float,
    chunk_size: int,
    support_gradient: bool = False,
    check: Check | None = None,
) -> RolloutScores:
    """Score ``rollout`` with ``policy`` and ``reference`` in chunks of ``chunk_size`` rows (see the module).

    Args:
        policy, reference: causal LMs (the reference may be the policy with its adapters disabled).
        rollout: the sampled batch (B rollouts).
        regularizer: the penalty; with ``support_gradient`` it must implement one.
        temperature: sampling temperature; every distribution here is ``softmax(logits / temperature)``.
        chunk_size: rollouts per forward (>= 1).
        support_gradient: also return the penalty's support gradient (one solve per position for both).
        check: optional finite check of each chunk's log-probabilities and penalty.

    Returns:
        :class:`RolloutScores`; the penalty's statistics are means over the generated positions, except
        :data:`MAX_STATS` (maxima).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = rollout.response_mask
    pieces: dict[str, list[torch.Tensor]] = {"old": [], "ref": [], "kl": [], "entropy": [], "penalty": []}
    gradients: list[SupportGradient] = []
    sums: dict[str, float] = {}
    maxima: dict[str, float] = {}
    for start in range(0, mask.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        tokens, chunk_mask = rollout.responses[rows], mask[rows]
        policy_logp = tempered_log_probs(policy, rollout, rows, temperature)
        ref_logp = tempered_log_probs(reference, rollout, rows, temperature)
        if check is not None:
            check("policy logits", policy_logp)
            check("reference logits", ref_logp)
        pieces["old"].append(policy_logp.gather(-1, tokens[..., None]).squeeze(-1))
        pieces["ref"].append(ref_logp.gather(-1, tokens[..., None]).squeeze(-1))
        kl, entropy = kl_and_entropy_of_log_probs(policy_logp, ref_logp)
        pieces["kl"].append(kl)
        pieces["entropy"].append(entropy)
        result = regularizer.evaluate(policy_logp, ref_logp, tokens, chunk_mask, support_gradient=support_gradient)
        del policy_logp, ref_logp
        if check is not None:
            check("penalty", result.penalty.per_token)
        pieces["penalty"].append(result.penalty.per_token)
        if result.gradient is not None:
            gradients.append(result.gradient)
        positions = int(chunk_mask.sum())
        for name, value in result.penalty.stats.items():
            if name in MAX_STATS:
                maxima[name] = max(maxima.get(name, float("-inf")), float(value))
            else:
                sums[name] = sums.get(name, 0.0) + float(value) * positions
    total = int(mask.sum())
    stats = {name: value / total if total else 0.0 for name, value in sums.items()}
    stats.update(maxima)
    per_token = torch.cat(pieces["penalty"])
    return RolloutScores(
        old_logprobs=torch.cat(pieces["old"]),
        ref_logprobs=torch.cat(pieces["ref"]),
        kl=torch.cat(pieces["kl"]),
        entropy=torch.cat(pieces["entropy"]),
        penalty=PenaltyOutput(per_token=per_token, stats=stats),
        gradient=on_grid(concatenate(gradients), mask) if support_gradient else None,
    )


def concatenate(gradients: list[SupportGradient]) -> SupportGradient:
    """The :class:`SupportGradient` of consecutive chunks of positions, as one (slots padded to the widest chunk,
    padding marked not ``distinct`` with phi 0)."""
    if len(gradients) == 1:
        return gradients[0]
    width = max(g.phi.shape[-1] for g in gradients)

    def pad(x: torch.Tensor | None, value) -> torch.Tensor | None:
        return None if x is None else torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=value)

    return SupportGradient(
        tokens=None if gradients[0].tokens is None else torch.cat([pad(g.tokens, 0) for g in gradients]),
        distinct=None if gradients[0].distinct is None else torch.cat([pad(g.distinct, False) for g in gradients]),
        phi=torch.cat([pad(g.phi, 0.0) for g in gradients]),
        dust=torch.cat([g.dust for g in gradients]),
        value=torch.cat([g.value for g in gradients]),
    )


def on_grid(gradient: SupportGradient, mask: torch.Tensor) -> SupportGradient:
    """``gradient`` over the True positions of ``mask`` (B, T) laid out on the (B, T) grid (zeros elsewhere)."""

    def scatter(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        out = torch.zeros((*mask.shape, *x.shape[1:]), dtype=x.dtype, device=x.device)
        out[mask] = x
        return out

    return SupportGradient(*(scatter(getattr(gradient, name)) for name in ("tokens", "distinct", "phi", "dust")), None)


def rows_of(gradient: SupportGradient, rows: torch.Tensor) -> SupportGradient:
    """The rows ``rows`` of a (B, T) grid :class:`SupportGradient`."""
    take = [None if x is None else x[rows] for x in (gradient.tokens, gradient.distinct, gradient.phi, gradient.dust)]
    return SupportGradient(*take, None)
