r"""Scoring a rollout in micro-batches of rows, in one pass: everything an RL step needs from the two models.

For each chunk of ``chunk_size`` rollouts: one forward of the policy and one of the reference, and from them, piece
by piece of positions, one log-softmax of each and everything the step needs: the sampled tokens' log-probabilities,
the exact full-vocabulary :math:`\mathrm{KL}(\pi\|\pi_{ref})` and entropy, the regularizer's penalty and, when the
penalty goes into the loss, its support gradient from the same solve (:meth:`Regularizer.evaluate`).

**The LM head in pieces.** A Hugging Face causal LM's forward runs with its output head receiving a single position
(a pre-hook on ``get_output_embeddings()`` keeps the final hidden states and passes the head one position), and the
head then runs over pieces of at most ``max_elements // V`` positions: peak memory is ``piece x V``, never
``chunk x T x V`` (as the fused cross-entropy kernels do). Models whose logits are not the head's output alone
(final soft-capping or logit scaling in the config) and modules without an output head get the plain forward's
logits, one row chunk at a time. Only (B, T) tensors and the support gradient's (B, T, s) tensors outlive a chunk,
so the memory of scoring does not grow with the rollout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from otalign.generation import Rollout, kl_and_entropy, response_logits
from otalign.regularizers import PenaltyOutput, Regularizer, SupportGradient
from otalign.regularizers.base import DEFAULT_CHUNK_ELEMENTS

LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
"""Config attributes of models whose logits are not the output head's alone: they are scored from full logits."""

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


def output_head(model) -> torch.nn.Module | None:
    """The model's LM head when its logits are that head's output alone, else None (score from full logits)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return head


def response_hidden(model, head: torch.nn.Module, rollout: Rollout, rows: slice) -> torch.Tensor:
    """(b, T, d) final hidden states that the LM ``head`` turns into the logits predicting each response token of
    ``rollout[rows]``: the model runs once with its head seeing a single position (a forward pre-hook keeps the
    head's input)."""
    kept = []

    def keep(module, args):
        kept.append(args[0])
        return (args[0][:, -1:], *args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        response_logits(model, rollout, rows)
    finally:
        handle.remove()
    steps = rollout.responses.shape[1]
    return kept[-1][:, -(steps + 1) : -1]


def log_prob_pieces(models: tuple, rollout: Rollout, rows: slice, temperature: float, max_elements: int):
    """Yield ``(positions, log_probs)`` over the flattened (b * T) positions of ``rollout[rows]``: ``positions`` a
    slice of them and ``log_probs`` one (n, V) float32 tempered log-softmax per model of ``models`` (see the module
    on the pieces)."""
    heads = [output_head(model) for model in models]
    if any(head is None for head in heads):
        log_probs = [tempered_log_probs(model, rollout, rows, temperature) for model in models]
        yield slice(None), [logp.reshape(-1, logp.shape[-1]) for logp in log_probs]
        return
    hidden = [response_hidden(model, head, rollout, rows) for model, head in zip(models, heads, strict=True)]
    hidden = [h.reshape(-1, h.shape[-1]) for h in hidden]
    per_piece = max(1, max_elements // heads[0].out_features)
    for start in range(0, hidden[0].shape[0], per_piece):
        piece = slice(start, start + per_piece)
        log_probs = []
        for head, states in zip(heads, hidden, strict=True):
            logits = head(states[piece]).float().div_(temperature)
            log_probs.append(logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)))
        yield piece, log_probs


@dataclass
class Positions:
    """Generated positions of a rollout scored together (n of them) and each model's log-probabilities there.

    Attributes:
        rows, cols: (n,) their rollout index and response position.
        tokens: (n,) the sampled tokens.
        log_probs: one (n, V) float32 tempered log-softmax per model, in the order the models were given.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    tokens: torch.Tensor
    log_probs: list[torch.Tensor]


def generated_positions(
    models: tuple,
    rollout: Rollout,
    *,
    temperature: float,
    chunk_size: int,
    max_elements: int = DEFAULT_CHUNK_ELEMENTS,
):
    """Yield the generated positions of ``rollout`` as :class:`Positions`, ``chunk_size`` rollouts per forward of each
    model and at most ``max_elements // V`` positions per LM-head piece: the scoring pass of :func:`score_rollout`
    for measurements that need each model's full next-token distribution (evaluation, analyses), with memory
    bounded by a chunk (see the module)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = rollout.response_mask
    steps = mask.shape[1]
    for start in range(0, mask.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        flat = torch.arange(mask[rows].numel(), device=mask.device)
        chunk_mask, tokens = mask[rows].reshape(-1), rollout.responses[rows].reshape(-1)
        for part, log_probs in log_prob_pieces(models, rollout, rows, temperature, max_elements):
            keep = chunk_mask[part]
            index = flat[part][keep]
            yield Positions(
                rows=start + index // steps,
                cols=index % steps,
                tokens=tokens[part][keep],
                log_probs=[logp[keep] for logp in log_probs],
            )


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
    max_elements: int = DEFAULT_CHUNK_ELEMENTS,
    lap: Callable[[str], None] | None = None,
) -> RolloutScores:
    """Score ``rollout`` with ``policy`` and ``reference`` in chunks of ``chunk_size`` rows (see the module).

    Args:
        policy, reference: causal LMs (the reference may be the policy with its adapters disabled).
        rollout: the sampled batch (B rollouts).
        regularizer: the penalty; with ``support_gradient`` it must implement one.
        temperature: sampling temperature; every distribution here is ``softmax(logits / temperature)``.
        chunk_size: rollouts per forward (>= 1).
        support_gradient: also return the penalty's support gradient (one solve per position for both).
        check: optional finite check of each piece's log-probabilities and penalty.
        max_elements: bound on ``positions x V`` of one piece of the LM head (see the module).
        lap: optional timer, called with ``"forward"`` after each piece's forwards, log-softmax, KL and entropy, and
            with ``"penalty"`` after its regularizer call.

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
        tokens, chunk_mask = rollout.responses[rows].reshape(-1), mask[rows].reshape(-1)
        pieces_of_chunk = log_prob_pieces((policy, reference), rollout, rows, temperature, max_elements)
        for part, (policy_logp, ref_logp) in pieces_of_chunk:
            part_tokens, part_mask = tokens[part], chunk_mask[part]
            if check is not None:
                check("policy logits", policy_logp)
                check("reference logits", ref_logp)
            pieces["old"].append(policy_logp.gather(-1, part_tokens[:, None])[:, 0])
            pieces["ref"].append(ref_logp.gather(-1, part_tokens[:, None])[:, 0])
            kl, entropy = kl_and_entropy(policy_logp, ref_logp, normalized=True)
            pieces["kl"].append(kl)
            pieces["entropy"].append(entropy)
            if lap is not None:
                lap("forward")
            result = regularizer.evaluate(
                policy_logp[None],
                ref_logp[None],
                part_tokens[None],
                part_mask[None],
                support_gradient=support_gradient,
                normalized=True,
                kl_diagnostic=False,  # measured above, per position
            )
            del policy_logp, ref_logp
            if check is not None:
                check("penalty", result.penalty.per_token)
            pieces["penalty"].append(result.penalty.per_token[0])
            if lap is not None:
                lap("penalty")
            if result.gradient is not None:
                gradients.append(result.gradient)
            positions = int(part_mask.sum())
            for name, value in result.penalty.stats.items():
                if name in MAX_STATS:
                    maxima[name] = max(maxima.get(name, float("-inf")), float(value))
                else:
                    sums[name] = sums.get(name, 0.0) + float(value) * positions
    total = int(mask.sum())
    stats = {name: value / total if total else 0.0 for name, value in sums.items()}
    stats.update(maxima)

    def grid(name: str) -> torch.Tensor:
        return torch.cat(pieces[name]).reshape(mask.shape)

    return RolloutScores(
        old_logprobs=grid("old"),
        ref_logprobs=grid("ref"),
        kl=grid("kl"),
        entropy=grid("entropy"),
        penalty=PenaltyOutput(per_token=grid("penalty"), stats=stats),
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
