r"""PPO math on tensors: per-token rewards, GAE, the clipped losses, whitening, diagnostics.

Shapes: ``B`` rollouts, ``T`` response positions; ``mask`` (B, T) bool is True on generated tokens (up to
and including EOS), which are contiguous from position 0. All statistics that span the batch take an
optional ``accelerator`` and are then computed over the whole data-parallel batch (sums all-reduced),
so a run on ``n`` processes with ``b`` rollouts each computes what one process with ``n * b`` would.
"""

from __future__ import annotations

import torch

from otalign.generation import kl_and_entropy  # noqa: F401 (pm.kl_and_entropy)


def global_sum(x: torch.Tensor, accelerator=None) -> torch.Tensor:
    """``x`` summed over processes (float64 for exact-enough reductions); ``x`` itself on one process."""
    x = x.double()
    if accelerator is not None and accelerator.num_processes > 1:
        x = accelerator.reduce(x.clone(), reduction="sum")
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, accelerator=None) -> torch.Tensor:
    """Mean of ``x`` over the True entries of ``mask`` (over all processes when ``accelerator`` is given)."""
    total = global_sum(torch.stack([(x * mask).sum(), mask.sum()]), accelerator)
    return (total[0] / total[1].clamp_min(1)).float()


def masked_var(x: torch.Tensor, mask: torch.Tensor, accelerator=None) -> torch.Tensor:
    """Unbiased variance of ``x`` over ``mask`` (global with ``accelerator``); 0 for fewer than 2 entries."""
    x = x.double()
    s = global_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum().double()]), accelerator)
    n = s[2]
    mean = s[0] / n.clamp_min(1)
    var = (s[1] - n * mean * mean) / (n - 1).clamp_min(1)
    return var.clamp_min(0).float()


def whiten(x: torch.Tensor, mask: torch.Tensor, accelerator=None, *, shift_mean: bool = True) -> torch.Tensor:
    r""":math:`(x - \mu)/\sqrt{\sigma^2 + 10^{-8}}` over ``mask`` (mean kept unless ``shift_mean``); 0 off-mask."""
    mean, var = masked_mean(x, mask, accelerator), masked_var(x, mask, accelerator)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_rewards(penalty: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    r"""Per-token reward :math:`r_t = -\beta\,\text{penalty}_t`, plus the score (B,) at the last generated token.

    Args:
        penalty: (B, T) regularizer penalty per generated token (0 off-mask).
        scores: (B,) reward-model score of each response.
        mask: (B, T) bool generated positions (at least one per row).
        beta: penalty coefficient.
    """
    rewards = -beta * penalty * mask
    last = mask.long().sum(1).clamp_min(1) - 1
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Generalised advantage estimation over each response, terminal after its last token.

    :math:`\delta_t = r_t + \gamma V_{t+1} - V_t` (with :math:`V_{t+1} = 0` past the end),
    :math:`A_t = \delta_t + \gamma\lambda A_{t+1}`, returns :math:`R_t = A_t + V_t`.

    Returns:
        advantages, returns: (B, T) float32, 0 off-mask.
    """
    m = mask.float()
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards, dtype=torch.float32)
    next_value = torch.zeros(rewards.shape[0], device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t] * m[:, t]
    return advantages, (advantages + values) * m


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    normalizer: float,
    weights: torch.Tensor | None = None,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Clipped surrogate :math:`\sum_t w_t \max(-A_t\rho_t, -A_t\,\mathrm{clip}(\rho_t, 1-\epsilon_l,
    1+\epsilon_h)) / Z`, :math:`\rho_t = \exp(\log\pi_\theta - \log\pi_{old})`, :math:`w_t` = ``weights``
    (default: ``mask``), :math:`\epsilon_l` = ``cliprange``, :math:`\epsilon_h` = ``cliprange_high`` (default:
    ``cliprange``; TRL's ``epsilon``/``epsilon_high``, DAPO's clip-higher when larger).

    ``normalizer`` Z is the number of tokens the loss averages over (per process, so that data-parallel
    gradient averaging yields the global token mean). Stats are sums over the masked tokens (``clipfrac``:
    clipped tokens; ``approx_kl``: :math:`\tfrac12(\log\rho)^2`), to be divided by the global token count.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    high = cliprange if cliprange_high is None else cliprange_high
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + high)
    weights = mask if weights is None else weights
    loss = (torch.maximum(unclipped, clipped) * weights).sum() / normalizer
    stats = {
        "policy/clipfrac": ((clipped > unclipped).float() * mask).sum().detach(),
        "policy/approx_kl": (0.5 * log_ratio.pow(2) * mask).sum().detach(),
        **clip_ratios(ratio, advantages, (cliprange, high), mask),
    }
    return loss, stats


EXTREMES = {"clip_ratio/low_min": "min", "clip_ratio/high_max": "max"}
"""Loss statistics that are per-response values (b,) rather than token sums: each micro-batch's minimum or maximum
over the responses of all processes (NaN entries left out), averaged over the step's micro-batches, as TRL 1.16's
``GRPOTrainer``/``RLOOTrainer`` log them (:meth:`otalign.trainers.rl.RLTrainer.update`)."""


def clip_ratios(
    ratio: torch.Tensor, advantages: torch.Tensor, cliprange: tuple[float, float], tokens: torch.Tensor
) -> dict:
    r"""TRL's clip statistics of a micro-batch with ``cliprange`` :math:`(\epsilon_l, \epsilon_h)`: ratios below
    :math:`1-\epsilon_l` with a negative advantage (low), above :math:`1+\epsilon_h` with a positive one (high),
    where the clip binds.

    ``clip_ratio/low_mean``, ``/high_mean``, ``/region_mean``: sums over tokens, each entry counted ``tokens`` times
    ((b, T) mask with per-token ``ratio``; (b,) token counts with one ``ratio`` per response), to be divided by the
    token count. ``clip_ratio/low_min`` and ``/high_max`` (:data:`EXTREMES`): (b,) per response, as TRL 1.16
    computes them before its ``nanmin``/``nanmax`` over the gathered micro-batch: the share of the response's tokens
    clipped (``masked_seq_mean``, NaN for a response without tokens) or, with one ratio per response (RLOO's
    sequence objective), 0 or 1.
    """
    low_bound, high_bound = cliprange
    low_hit = ((ratio < 1.0 - low_bound) & (advantages < 0)).float()
    high_hit = ((ratio > 1.0 + high_bound) & (advantages > 0)).float()
    low, high = low_hit * tokens, high_hit * tokens
    if ratio.dim() == 2:  # per token: the share of each response's tokens
        count = tokens.float().sum(-1)
        low_seq, high_seq = low.sum(-1) / count, high.sum(-1) / count
    else:
        low_seq, high_seq = low_hit, high_hit
    return {
        "clip_ratio/low_mean": low.sum().detach(),
        "clip_ratio/high_mean": high.sum().detach(),
        "clip_ratio/region_mean": (low + high).sum().detach(),
        "clip_ratio/low_min": low_seq.detach(),
        "clip_ratio/high_max": high_seq.detach(),
    }


def sequence_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    normalizer: float,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""TRL's RLOO objective: one ratio per response :math:`\rho_i = \exp(\sum_t \log\pi_\theta - \sum_t
    \log\pi_{old})` over its generated tokens, loss :math:`\sum_i \max(-A_i\rho_i, -A_i\,\mathrm{clip}(\rho_i,
    1-\epsilon_l, 1+\epsilon_h)) / Z` with Z the responses the loss averages over (per process); the bounds as
    :func:`policy_loss`'s.

    Args:
        logprobs, old_logprobs: (b, T) the sampled tokens' log-probabilities (current with grad; rollout).
        advantages: (b,) one per response. mask: (b, T) generated positions.

    Stats as :func:`policy_loss`'s, sums over the masked tokens: ``policy/clipfrac`` counts every token of a
    response whose ratio is clipped, ``policy/approx_kl`` is per token.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio.sum(1))
    high = cliprange if cliprange_high is None else cliprange_high
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + high)
    loss = torch.maximum(unclipped, clipped).sum() / normalizer
    stats = {
        "policy/clipfrac": ((clipped > unclipped).float() * mask.sum(1)).sum().detach(),
        "policy/approx_kl": (0.5 * log_ratio.pow(2) * mask).sum().detach(),
        **clip_ratios(ratio, advantages, (cliprange, high), mask.sum(1)),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float | None,
    normalizer: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Clipped value loss :math:`\tfrac12\sum_t \max((V-R)^2, (V^{clip}-R)^2)/Z`,
    :math:`V^{clip} = V_{old} + \mathrm{clip}(V - V_{old}, \pm\epsilon_v)` (unclipped when ``cliprange_value`` is None).
    Stats: ``value/clipfrac`` as a sum over masked tokens."""
    unclipped = (values - returns).pow(2)
    if cliprange_value is None:
        worst, frac = unclipped, torch.zeros((), device=values.device)
    else:
        clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
        clipped = (clipped_values - returns).pow(2)
        worst = torch.maximum(unclipped, clipped)
        frac = ((clipped > unclipped).float() * mask).sum().detach()
    return 0.5 * (worst * mask).sum() / normalizer, {"value/clipfrac": frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, accelerator=None) -> float:
    r""":math:`1 - \mathrm{Var}(R - V)/\mathrm{Var}(R)` over ``mask`` (NaN when the returns do not vary)."""
    var_returns = masked_var(returns, mask, accelerator)
    if float(var_returns) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask, accelerator) / var_returns)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) float32 log-probability of ``tokens`` (B, T) under ``softmax(logits / temperature)``, logits (B, T, V)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
