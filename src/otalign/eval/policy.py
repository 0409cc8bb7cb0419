"""Held-out evaluation of a policy against its reference: reward, exact KL and OT distance per response.

Every policy is sampled with the same per-prompt seeds (common random numbers, see
:func:`otalign.generation.sample_seeds`), so two policies that agree on a prompt produce the same
response and differences between methods are not sampling noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from otalign.generation import SamplingParams, kl_and_entropy, sample_batches, sample_seeds
from otalign.guard import ConvergenceWarning
from otalign.rewards import Reward, check_scores
from otalign.scoring import MAX_STATS, generated_positions


@dataclass
class EvalResult:
    """Per-prompt results of one policy on an evaluation set.

    Attributes:
        prompts, responses: texts, one per prompt.
        scores: reward of each response.
        lengths: generated tokens of each response (EOS included).
        kl: summed exact full-vocabulary KL(pi || pi_ref) over each response's tokens (nats).
        ot: summed entropic OT value to the reference over each response's tokens (cost units), or None.
        extra: per-response values of the ``extras`` measurements of :func:`evaluate_policy`, by name.
        stats: the ``regularizer`` statistics of :func:`evaluate_policy` over all generated positions (means
            weighted by positions; :data:`otalign.scoring.MAX_STATS` maxima), by name.
    """

    prompts: list[str]
    responses: list[str]
    scores: list[float]
    lengths: list[int]
    kl: list[float]
    ot: list[float] | None
    extra: dict[str, list[float]] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)

    def summary(self, reference: EvalResult | None = None) -> dict[str, float]:
        """Means with 95% normal-approximation confidence half-widths; win rate against ``reference``.

        Keys: ``reward_mean``, ``reward_ci95``, ``kl_per_token``, ``kl_per_response``, ``ot_per_token``,
        ``response_length`` and, with a reference, ``win_rate`` (ties count one half) and ``win_rate_ci95``.
        """
        tokens = max(sum(self.lengths), 1)
        out = {
            "reward_mean": _mean(self.scores),
            "reward_ci95": _ci95(self.scores),
            "kl_per_token": sum(self.kl) / tokens,
            "kl_per_response": _mean(self.kl),
            "response_length": _mean(self.lengths),
        }
        if self.ot is not None:
            out["ot_per_token"] = sum(self.ot) / tokens
        if reference is not None:
            wins = [float(a > b) + 0.5 * float(a == b) for a, b in zip(self.scores, reference.scores, strict=True)]
            out["win_rate"] = _mean(wins)
            out["win_rate_ci95"] = _ci95(wins)
        return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _ci95(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = _mean(values)
    return 1.96 * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@torch.no_grad()
def evaluate_policy(
    policy,
    ref_model,
    tokenizer,
    prompt_texts: list[str],
    prompt_ids: list[list[int]],
    reward,
    *,
    params: SamplingParams,
    seed: int,
    batch_size: int = 16,
    scoring_batch_size: int = 4,
    ot_regularizer=None,
    extras: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] | None = None,
    columns: Mapping[str, list] | None = None,
    regularizer=None,
) -> EvalResult:
    """Sample one response per prompt from ``policy`` and measure it against ``ref_model``.

    Args:
        policy, ref_model: unwrapped causal LMs on one device.
        tokenizer: their tokenizer.
        prompt_texts, prompt_ids: rendered prompts and their token ids (:func:`encode_prompts`).
        reward: an :class:`otalign.rewards.Reward`, or any callable ``reward(rollout, rows, columns) -> (B,)`` that
            scores a whole rollout (``rows``: the prompts' positions; a trainer's weighted sum of rewards).
        params: sampling settings; distributions are ``softmax(logits / temperature)`` as in training.
        seed: evaluation seed; prompt ``i`` uses sample index ``i``.
        batch_size: prompts per generation batch.
        scoring_batch_size: responses per forward when scoring a generation batch: the two models' next-token
            distributions are computed a chunk at a time (:func:`otalign.scoring.generated_positions`), never
            (batch_size, T, V) at once.
        ot_regularizer: a :class:`~otalign.regularizers.WassersteinRegularizer` whose per-position OT value
            is summed per response (None: no OT distance).
        extras: ``name -> fn(policy_logp, ref_logp) -> (n,)`` further per-position measurements on the same
            samples, from the (n, V) tempered log-probabilities at n generated positions; summed over each
            response's positions into ``EvalResult.extra[name]``.
        columns: the prompt rows' columns, each a list aligned with ``prompt_texts``, for a reward that reads
            them (e.g. the arithmetic ``answer``).
        regularizer: an :class:`otalign.regularizers.Regularizer` whose statistics (``penalty/mean``, its
            ``distance_stat``, ...) of the policy against the reference are gathered over all generated positions
            into ``EvalResult.stats`` (None: none).
    """
    extras = dict(extras or {})
    result = EvalResult([], [], [], [], [], [] if ot_regularizer is not None else None, {k: [] for k in extras})
    seeds = sample_seeds(seed, list(range(len(prompt_ids))))
    stats = RegularizerStats()
    start = 0
    for rollout in sample_batches(policy, tokenizer, prompt_texts, prompt_ids, seeds, params, batch_size):
        stop = start + len(rollout.prompt_texts)
        batch_columns = {name: list(values[start:stop]) for name, values in (columns or {}).items()}
        start = stop
        mask = rollout.response_mask
        totals = {name: torch.zeros(mask.shape[0], dtype=torch.float64, device=mask.device) for name in ("kl", *extras)}
        if ot_regularizer is not None:
            totals[OT] = torch.zeros_like(totals["kl"])
        for positions in generated_positions(
            (policy, ref_model), rollout, temperature=params.temperature, chunk_size=scoring_batch_size
        ):
            policy_logp, ref_logp = positions.log_probs
            measured = {"kl": kl_and_entropy(policy_logp, ref_logp, normalized=True)[0]}
            if ot_regularizer is not None:
                measured[OT] = ot_values(ot_regularizer, policy_logp, ref_logp, positions.tokens)
            for name, measure in extras.items():
                measured[name] = measure(policy_logp, ref_logp)
            for name, values in measured.items():
                totals[name].index_add_(0, positions.rows, values.double())
            if regularizer is not None:
                stats.add(regularizer, policy_logp, ref_logp, positions.tokens)
        rows = range(stop - len(rollout.prompt_texts), stop)
        if isinstance(reward, Reward):
            ids, seq_mask = rollout.right_aligned(tokenizer.pad_token_id)
            scores = reward(rollout.prompt_texts, rollout.response_texts, ids, seq_mask, batch_columns)
        else:
            scores = reward(rollout, list(rows), batch_columns)
        check_scores(scores, getattr(reward, "name", "reward"), rows)
        result.prompts += rollout.prompt_texts
        result.responses += rollout.response_texts
        result.scores += scores.tolist()
        result.lengths += mask.sum(1).tolist()
        result.kl += totals["kl"].float().tolist()
        if ot_regularizer is not None:
            result.ot += totals[OT].float().tolist()
        for name in extras:
            result.extra[name] += totals[name].tolist()
    result.stats = stats.result()
    return result


class RegularizerStats:
    """A regularizer's statistics over pieces of generated positions: means weighted by positions, the
    :data:`otalign.scoring.MAX_STATS` maxima."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.positions = 0

    def add(self, regularizer, policy_logp: torch.Tensor, ref_logp: torch.Tensor, tokens: torch.Tensor) -> None:
        """Evaluate ``regularizer`` on (n, V) normalised log-probabilities at n positions with sampled ``tokens``."""
        count = tokens.shape[0]
        if count == 0:
            return
        evaluation = regularizer.evaluate(
            policy_logp[None], ref_logp[None], tokens[None], normalized=True, kl_diagnostic=False
        )
        for name, value in evaluation.penalty.stats.items():
            if name in MAX_STATS:
                self.totals[name] = max(self.totals.get(name, float(value)), float(value))
            else:
                self.totals[name] = self.totals.get(name, 0.0) + float(value) * count
        self.positions += count

    def result(self) -> dict[str, float]:
        return {k: v if k in MAX_STATS else v / max(self.positions, 1) for k, v in self.totals.items()}


OT = "ot distance"
"""The key of the OT values among a batch's per-response totals (not a valid extras name: it has a space)."""


def ot_values(
    reg,
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    chunk: int = 64,
) -> torch.Tensor:
    """(n,) entropic OT value to the reference at each of n positions, solved exactly as the Wasserstein
    regularizer ``reg`` does (same support, cost, dust and Sinkhorn settings), ``chunk`` positions per batched solve.

    Args:
        policy_logits, ref_logits: (n, V) logits or log-probabilities of the two next-token distributions.
        actions: (n,) the sampled tokens (the support holds them).

    Positions whose solve ended above ``reg.tol`` (Sinkhorn's ``max_iter`` and Newton's steps spent) are counted, and a
    :class:`~otalign.guard.ConvergenceWarning` names how many (their values are approximate).
    """
    from otalign.regularizers import build_problem

    values = torch.zeros(actions.shape[0], dtype=torch.float32, device=actions.device)
    unconverged = torch.zeros((), dtype=torch.long, device=actions.device)
    embeddings = reg.embeddings.to(policy_logits.device)
    for start in range(0, actions.shape[0], chunk):
        part = slice(start, start + chunk)
        problem = build_problem(
            policy_logits[part],
            ref_logits[part],
            actions[part],
            embeddings,
            top_k=reg.top_k,
            metric=reg.metric,
            radius=reg.radius,
            dust_cost=reg.dust_cost,
        )
        solution = reg.solve(problem)
        values[part] = solution.value
        unconverged += (~solution.converged).sum()
    if count := int(unconverged):
        # the full transport runs no Newton steps (they finish the difference and smooth forms only)
        newton = "" if reg.transport == "full" else f", and newton_steps={reg.newton_steps} Newton steps did not finish"
        warnings.warn(
            f"OT distance: Sinkhorn stopped at max_iter={reg.max_iter} above tol={reg.tol:g}{newton}, at {count} of "
            f"{actions.shape[0]} positions (lambda={reg.lam:g}); their values are approximate",
            ConvergenceWarning,
            stacklevel=2,
        )
    return values
