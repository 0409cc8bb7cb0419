r"""Critic-free RL with any regularizer: GRPO and RLOO (``GRPOConfig``/``GRPOTrainer``, ``RLOOConfig``/``RLOOTrainer``).

One step (:meth:`CriticFreeTrainer.train`; sampling, scoring, the update loop, the penalty and the adaptive beta
are the shared machinery of :mod:`otalign.trainers.rl`):

1. **Rollout**: ``num_generations`` (G) responses per prompt; a process holds whole groups
   (``per_device_train_batch_size`` is a multiple of G), so group statistics never cross processes.
2. **Advantages** (:func:`group_advantages`), one per response, shared by its tokens, from the sequence reward
   :math:`R_i` (the score, minus :math:`\beta\sum_t \text{penalty}_t` with ``penalty_in: reward``):
   GRPO :math:`A_i = R_i - \bar R_g`, RLOO's leave-one-out :math:`A_i = R_i - \frac{1}{G-1}\sum_{j\ne i} R_j`;
   with ``scale_rewards`` (TRL 1.16's) ``group`` divided by the group's standard deviation plus :math:`10^{-4}`,
   ``batch`` by the standard deviation of the whole rollout of all processes plus :math:`10^{-4}`, ``none`` not.
3. **Update**: ``num_iterations`` passes over the same rollouts (``num_mini_batches`` optimizer steps each),
   clipped surrogate :math:`\ell_{it} = -\min(\rho_{it} A_i, \mathrm{clip}(\rho_{it}, 1-\epsilon_l, 1+\epsilon_h)
   A_i)` (TRL's ``epsilon`` and ``epsilon_high``), plus :math:`\beta d_{it}` with ``penalty_in: loss``; no critic;
   with ``mask_truncated_completions`` the responses without EOS have no tokens in the loss (:func:`mask_truncated`).
   Length normalisation ``loss_type``, as TRL 1.16's
   ``GRPOTrainer`` computes it (:func:`token_weights`, :meth:`CriticFreeTrainer.normalizers`), for a mini-batch of
   N responses in micro-batches of b per process, G = ``gradient_accumulation_steps``:
   ``grpo`` :math:`\frac1N\sum_i \frac{1}{|o_i|}\sum_t \ell_{it}`; ``dr_grpo``
   :math:`\sum_{it}\ell_{it} / (N\cdot T_{max})`; ``dapo`` :math:`\sum_{it}\ell_{it}` over the mini-batch divided
   by the whole rollout's token count over ``num_mini_batches`` (the mini-batch's token count when
   ``num_mini_batches`` is 1); ``bnpo`` each micro-batch's own token mean on its process
   :math:`\sum_{it \in m}\ell_{it} / \sum_{i\in m}|o_i|`, divided by G (so the mean of the micro-batch means over
   micro-batches and processes, not the mini-batch's token mean). RLOO's default ``loss_type: sequence`` is TRL's
   ``RLOOTrainer`` objective instead: one clipped ratio per response,
   :math:`\rho_i = \exp(\sum_t \log\pi_\theta - \log\pi_{old})`, averaged over the responses, with optional
   ``normalize_advantages`` over the whole rollout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from accelerate.utils import gather_object

from otalign.generation import response_logits
from otalign.regularizers import k3

from . import ppo_math as pm
from .config import ConfigError, redefault
from .rl import RLConfig, RLTrainer, RolloutBatch
from .rl_metrics import CompletionLog, completion_rows, ended_with_eos
from .rollout_batch import ScoredRollout

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""``loss_type`` values, TRL 1.16's names and normalisations (see the module docstring)."""
RLOO_LOSS_TYPES = ("sequence", *LOSS_TYPES)
"""RLOO's ``loss_type``: TRL's sequence-level objective (:func:`~otalign.trainers.ppo_math.sequence_policy_loss`) or
the per-token loss of a GRPO ``loss_type``."""
ALGORITHMS = ("grpo", "rloo")
SCALE_EPS = 1e-4
SCALE_REWARDS = ("group", "batch", "none")
"""``scale_rewards`` values, TRL 1.16's; ``true``/``false`` mean ``group``/``none`` (:func:`scale_rewards_name`)."""


def scale_rewards_name(value: str | bool) -> str:
    """``scale_rewards`` as one of :data:`SCALE_REWARDS`: TRL's ``True: group, False: none`` (also the strings
    ``true``/``false``, so a boolean config from before keeps its meaning); other values are returned unchanged."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    return {True: "group", False: "none"}.get(value, value) if isinstance(value, bool) else value


def group_advantages(rewards: torch.Tensor, group_size: int, *, algorithm: str, scale: str | bool) -> torch.Tensor:
    r"""(B,) advantages of B = n * G sequence rewards laid out group after group.

    ``grpo``: :math:`A_i = R_i - \mathrm{mean}_g(R)`; ``rloo``: :math:`A_i = R_i - \frac{1}{G-1}\sum_{j\ne i} R_j
    = \frac{G}{G-1}(R_i - \mathrm{mean}_g R)`. ``scale`` (:func:`scale_rewards_name`): ``group`` (or True) divides by
    :math:`\mathrm{std}_g(R) + 10^{-4}` (unbiased std; a group of equal rewards gets 0), ``batch`` by the unbiased std
    of all B rewards plus :math:`10^{-4}` (the trainer takes it over all processes), ``none`` (False) not. Computed in
    float64, returned float32.
    """
    scale = scale_rewards_name(scale)
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {SCALE_REWARDS}, got {scale!r}")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"need groups of >= 2 rewards dividing the batch, got {rewards.numel()} and {group_size}")
    r = rewards.double().reshape(-1, group_size)
    mean = r.mean(1, keepdim=True)
    adv = r - mean if algorithm == "grpo" else r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + SCALE_EPS)
    elif scale == "batch":
        adv = adv / (r.std() + SCALE_EPS)
    return adv.flatten().float()


def token_weights(mask: torch.Tensor, loss_type: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss weights (B, T) and per-response normalizer units (B,) of a ``loss_type``.

    A micro-batch's loss is ``sum(weights * l) / Z``, ``Z`` summing ``units`` over the rows that
    :meth:`CriticFreeTrainer.normalizers` takes for the ``loss_type``: ``grpo`` weights ``1/|o_i|``, units 1 (mean of
    per-sequence means); ``bnpo`` and ``dapo`` weights 1, units ``|o_i|`` (token means: of each micro-batch, of the
    rollout); ``dr_grpo`` weights 1, units ``max_length`` (sum over N x max_length); RLOO's ``sequence`` weights 1,
    units 1 (a penalty in the loss: its sum over each response, averaged over the responses).
    """
    m = mask.float()
    lengths = m.sum(1)
    if loss_type == "grpo":
        return m / lengths.clamp_min(1)[:, None], torch.ones_like(lengths)
    if loss_type in ("bnpo", "dapo"):
        return m, lengths
    if loss_type == "dr_grpo":
        return m, torch.full_like(lengths, float(max_length))
    if loss_type == "sequence":  # one term per response; a penalty in the loss summed over its tokens
        return m, torch.ones_like(lengths)
    raise ValueError(f"loss_type must be one of {RLOO_LOSS_TYPES}, got {loss_type!r}")


def mask_truncated(scored: ScoredRollout, eos_token_id: int | None) -> ScoredRollout:
    """TRL's ``mask_truncated_completions``: ``scored`` with an empty response mask on the responses without EOS
    (:func:`~otalign.trainers.rl_metrics.ended_with_eos`), so that everything computed from the mask leaves them out:
    the penalty in their sequence reward, their loss weights and their units of the normaliser (``dapo``, ``bnpo``
    token counts; ``grpo``, ``dr_grpo`` and RLOO's ``sequence`` still count them as responses, as TRL's means over
    the batch do), and the ``kl`` and ``clip_ratio/*`` metrics. Their scores stay: they count in their group's
    baseline, as in TRL."""
    ended = ended_with_eos(scored.rollout, eos_token_id)
    rollout = dataclasses.replace(scored.rollout, response_mask=scored.mask & ended[:, None])
    return dataclasses.replace(scored, rollout=rollout)


@dataclass
class CriticFreeConfig(RLConfig):
    """Group-based critic-free RL on top of :class:`~otalign.trainers.rl.RLConfig`; see :class:`GRPOConfig`,
    :class:`RLOOConfig`. A rollout's ``step_batch_size`` responses per process are whole groups of
    ``num_generations``."""

    algorithm: ClassVar[str] = "grpo"
    prompts: str = redefault(RLConfig, "prompts", "arithmetic")
    reward_fn: list[str] | None = redefault(RLConfig, "reward_fn", ["arithmetic"])
    num_generations: int = field(
        default=4, metadata={"help": "responses sampled per prompt (a group)", "check": ">= 2"}
    )
    num_iterations: int = field(
        default=1,
        metadata={
            "help": "passes (inner epochs) over each rollout batch, clipped ratio after the first",
            "check": ">= 1",
        },
    )
    loss_type: str = field(
        default="grpo", metadata={"help": "length normalisation of the loss (TRL's names)", "choices": LOSS_TYPES}
    )
    scale_rewards: str | bool = field(
        default="group",
        metadata={
            "help": "divide the advantages by the reward std (TRL's): group (each group's), batch (the whole "
            "rollout's, all processes), none (Dr. GRPO); true/false mean group/none",
            "choices": SCALE_REWARDS,
        },
    )
    penalty_in: str = redefault(RLConfig, "penalty_in", "loss")
    epsilon: float | None = field(
        default=None,
        metadata={
            "help": "clip range (TRL's name): the ratio is clipped to [1 - epsilon, 1 + epsilon_high] (none: "
            "cliprange, else 0.2)",
            "check": "> 0",
        },
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "upper clip bound, DAPO's clip-higher when above epsilon (none: epsilon)", "check": "> 0"},
    )
    cliprange: float | None = field(
        default=None, metadata={"help": "otalign's earlier name of epsilon (give one of the two)", "check": "> 0"}
    )
    response_length: int | None = field(
        default=None,
        metadata={
            "help": "new tokens sampled per response at most (none: max_completion_length, else 256)",
            "check": ">= 1",
        },
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "TRL's name of response_length (give one of the two)", "check": ">= 1"}
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={
            "help": "leave responses without EOS (cut at response_length) out of the loss, as TRL: their tokens "
            "get no weight and no gradient; they still count in their group's baseline"
        },
    )
    log_completions: bool = field(
        default=False,
        metadata={
            "help": "at each logged step append every prompt, completion, reward and advantage of the rollout to "
            "output_dir/completions.jsonl (and a 'completions' table to trackers that take one, e.g. wandb)"
        },
    )
    num_completions_to_print: int | None = field(
        default=None,
        metadata={"help": "log_completions: print the first this many too (none: all; 0: none)", "check": ">= 0"},
    )

    def __post_init__(self) -> None:
        self.scale_rewards = scale_rewards_name(self.scale_rewards)
        self.resolve_alias("epsilon", "cliprange", 0.2)
        self.resolve_alias("response_length", "max_completion_length", 256)
        super().__post_init__()
        if self.step_batch_size % self.num_generations:
            raise ConfigError(
                f"the rollout's {self.step_batch_size} responses per process (per_device_train_batch_size * "
                f"gradient_accumulation_steps * num_mini_batches) "
                f"must be divisible by num_generations={self.num_generations} (each process holds whole groups)",
                "num_generations",
            )


@dataclass
class GRPOConfig(CriticFreeConfig):
    """GRPO: group-normalised advantages, KL (or any regularizer) in the loss by default."""

    algorithm: ClassVar[str] = "grpo"
    output_dir: str = redefault(RLConfig, "output_dir", "runs/grpo")


@dataclass
class RLOOConfig(CriticFreeConfig):
    """RLOO: leave-one-out baseline, the penalty in the sequence reward by default, unscaled advantages, TRL's
    sequence-level objective (``loss_type: sequence``) by default."""

    algorithm: ClassVar[str] = "rloo"
    output_dir: str = redefault(RLConfig, "output_dir", "runs/rloo")
    penalty_in: str = redefault(RLConfig, "penalty_in", "reward")
    scale_rewards: str | bool = redefault(CriticFreeConfig, "scale_rewards", "none")
    loss_type: str = field(
        default="sequence",
        metadata={
            "help": "sequence: TRL's RLOO objective (one clipped ratio exp(sum logp - sum logp_old) per response, "
            "mean over responses); grpo, bnpo, dr_grpo, dapo: per-token ratios normalised as GRPO's loss_type",
            "choices": RLOO_LOSS_TYPES,
        },
    )
    normalize_advantages: bool = field(
        default=False,
        metadata={"help": "standardise the advantages over the whole rollout of all processes (as TRL's RLOO)"},
    )


class CriticFreeTrainer(RLTrainer):
    """GRPO or RLOO (by ``config.algorithm``) for a causal LM policy with any :mod:`otalign.regularizers` penalty.

    Args:
        config: :class:`GRPOConfig` or :class:`RLOOConfig`.
        policy, ref_model, tokenizer, reward, regularizer, prompts, accelerator: see
            :class:`~otalign.trainers.rl.RLTrainer`.
    """

    progress_keys = ("reward/mean", "kl/exact", "beta")

    @property
    def num_generations(self) -> int:
        return self.config.num_generations

    @property
    def algorithm_name(self) -> str:
        return self.config.algorithm.upper()

    @property
    def num_epochs(self) -> int:
        return self.config.num_iterations

    def advantages(self, scored) -> RolloutBatch:
        """Sequence rewards (penalty included with ``penalty_in: reward``), group advantages, ``loss_type`` weights;
        with ``mask_truncated_completions`` all from :func:`mask_truncated` (the batch carries the masked rollout)."""
        c = self.config
        if c.mask_truncated_completions:
            scored = mask_truncated(scored, self.tokenizer.eos_token_id)
        rewards = self.sequence_rewards(scored)
        local = "none" if c.scale_rewards == "batch" else c.scale_rewards
        advantages = group_advantages(rewards, c.num_generations, algorithm=c.algorithm, scale=local)
        if c.scale_rewards == "batch":  # TRL: the std of the rewards gathered from every process
            advantages = advantages / (self.batch_reward_std(rewards) + SCALE_EPS)
        weights, units = token_weights(scored.mask, c.loss_type, c.response_length)
        return RolloutBatch(scored, advantages.to(rewards.device), units, weights)

    def loss(self, batch: RolloutBatch, rows: torch.Tensor, normalizer: float):
        """Micro-batch loss: clipped surrogate with the sequence advantages, ``loss_type`` weights, plus the penalty
        (``penalty_in: loss``), over normalizer Z."""
        c, scored = self.config, batch.scored
        rollout, mask = scored.rollout, scored.mask[rows]
        logits = response_logits(self.policy, rollout, rows) / c.temperature
        logprobs = pm.token_logprobs(logits, rollout.responses[rows])
        advantages, weights = batch.advantages[rows, None].expand_as(logprobs), batch.weights[rows]
        pg, stats = pm.policy_loss(
            logprobs,
            scored.old_logprobs[rows],
            advantages,
            mask,
            cliprange=c.epsilon,
            normalizer=normalizer,
            weights=weights,
            cliprange_high=c.epsilon_high,
        )
        pen = self.penalty_loss(batch, rows, logits, logprobs, normalizer)
        return pg + pen, {"loss/policy": pg.detach(), "loss/penalty": pen.detach()}, stats

    def normalizers(self, batch: RolloutBatch, micro: tuple[torch.Tensor, ...]) -> list[float]:
        """Z of each micro-batch as TRL 1.16 computes it for the ``loss_type`` (units: :func:`token_weights`).

        ``bnpo``: the micro-batch's own token count on this process (at least 1) times ``gradient_accumulation_steps``;
        ``dapo``: the whole rollout's token count over all processes (at least 1) divided by the process count and
        ``num_mini_batches``; ``grpo``, ``dr_grpo``: the mini-batch's units over the process count (the default).
        """
        c, acc = self.config, self.accelerator
        if c.loss_type == "bnpo":
            return [max(float(batch.units[rows].sum()), 1.0) * len(micro) for rows in micro]
        if c.loss_type == "dapo":
            total = max(float(pm.global_sum(batch.units.sum(), acc)), 1.0)
            return [total / (acc.num_processes * c.num_mini_batches)] * len(micro)
        return super().normalizers(batch, micro)

    def batch_reward_std(self, rewards: torch.Tensor) -> torch.Tensor:
        """The unbiased standard deviation of the sequence rewards (B,) of all processes (``scale_rewards: batch``)."""
        every = torch.ones_like(rewards, dtype=torch.bool)
        return pm.masked_var(rewards, every, self.accelerator).double().sqrt().to(rewards.device)

    def begin(self) -> int:
        """:meth:`~otalign.trainers.base.BaseTrainer.begin`; with ``log_completions`` also drops the rows of
        ``completions.jsonl`` past the step resumed from (a fresh run: all of them)."""
        start = super().begin()
        if self.config.log_completions and self.accelerator.is_main_process:
            CompletionLog(self.output_dir).truncate_after(start - 1)
        return start

    def log_rollout(self, step: int, batch: RolloutBatch) -> None:
        """``log_completions``, at the steps whose metrics are logged (every ``logging_steps`` and the last): the
        rollouts of all processes (:func:`~otalign.trainers.rl_metrics.completion_rows`) appended to
        ``output_dir/completions.jsonl``, logged as a ``completions`` table to the trackers that have ``log_table``
        (accelerate's wandb), and the first ``num_completions_to_print`` printed."""
        c, acc = self.config, self.accelerator
        if not c.log_completions or not (step % c.logging_steps == 0 or step == c.max_steps):
            return
        scored = batch.scored
        rows = completion_rows(step, scored.rollout, scored.components, batch.advantages.cpu())
        rows = gather_object(rows) if acc.num_processes > 1 else rows
        if not acc.is_main_process:
            return
        CompletionLog(self.output_dir).append(rows)
        columns = list(rows[0])
        for tracker in acc.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table("completions", columns=columns, data=[list(r.values()) for r in rows], step=step)
        shown = rows if c.num_completions_to_print is None else rows[: c.num_completions_to_print]
        for row in shown:
            self.print(json.dumps(row, ensure_ascii=False))

    def token_kl(self, scored) -> torch.Tensor:
        """(B, T) the per-token KL estimate TRL's trainer logs as ``kl``: GRPO's k3 at the rollout policy."""
        return k3(scored.old_logprobs, scored.ref_logprobs)

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """Mean within-group reward std, share of groups whose rewards are all equal, mean |advantage|; under TRL's
        names ``frac_reward_zero_std`` (share of groups whose sequence rewards, penalty included where the
        advantages include it, have a std close to 0; with ``scale_rewards: batch`` TRL's 1 or 0, whether the whole
        rollout's std is) and ``kl`` (:meth:`token_kl`, mean per generated token)."""
        acc, advantages, scored = self.accelerator, batch.advantages, batch.scored
        g = self.config.num_generations
        groups = scored.scores.reshape(-1, g).std(1)
        rewards = self.sequence_rewards(scored)
        flat = rewards.reshape(-1, g).std(1)
        if self.config.scale_rewards == "batch":
            flat = self.batch_reward_std(rewards).float().expand_as(flat)
        zero = torch.isclose(flat, torch.zeros_like(flat)).sum()
        n = torch.tensor(float(groups.numel()), device=groups.device)
        parts = [groups.sum(), (groups == 0).sum(), n, advantages.abs().sum(), zero]
        stats = torch.stack([x.double().to(groups.device) for x in parts])
        counts = pm.global_sum(stats, acc)
        return {
            "reward/group_std": float(counts[0] / counts[2]),
            "reward/zero_std_frac": float(counts[1] / counts[2]),
            "advantage/abs_mean": float(counts[3] / (counts[2] * g)),
            "frac_reward_zero_std": float(counts[4] / counts[2]),
            "kl": float(pm.masked_mean(self.token_kl(scored), scored.mask, acc)),
        }


class GRPOTrainer(CriticFreeTrainer):
    """:class:`CriticFreeTrainer` with a :class:`GRPOConfig`."""


class RLOOTrainer(CriticFreeTrainer):
    """:class:`CriticFreeTrainer` with an :class:`RLOOConfig`: TRL's ``normalize_advantages`` and sequence-level
    objective (``loss_type: sequence``)."""

    def token_kl(self, scored) -> torch.Tensor:
        """(B, T) TRL's RLOO ``kl``: the first-order log-ratio of the rollout policy to the reference (k1)."""
        return scored.old_logprobs - scored.ref_logprobs

    def advantages(self, scored) -> RolloutBatch:
        r"""The group advantages; with ``normalize_advantages`` standardised over the whole rollout of all processes,
        :math:`(A - \bar A) / (\mathrm{std}(A) + 10^{-4})` (unbiased std), as TRL's ``RLOOTrainer``."""
        batch = super().advantages(scored)
        if self.config.normalize_advantages:
            acc, adv = self.accelerator, batch.advantages
            every = torch.ones_like(adv, dtype=torch.bool)
            mean, std = pm.masked_mean(adv, every, acc), pm.masked_var(adv, every, acc).sqrt()
            batch.advantages = (adv - mean) / (std + SCALE_EPS)
        return batch

    def loss(self, batch: RolloutBatch, rows: torch.Tensor, normalizer: float):
        """``loss_type: sequence``: TRL's clipped sequence-level surrogate
        (:func:`~otalign.trainers.ppo_math.sequence_policy_loss`) plus the penalty (``penalty_in: loss``); else the
        per-token loss of :class:`CriticFreeTrainer`."""
        c, scored = self.config, batch.scored
        if c.loss_type != "sequence":
            return super().loss(batch, rows, normalizer)
        rollout, mask = scored.rollout, scored.mask[rows]
        logits = response_logits(self.policy, rollout, rows) / c.temperature
        logprobs = pm.token_logprobs(logits, rollout.responses[rows])
        pg, stats = pm.sequence_policy_loss(
            logprobs,
            scored.old_logprobs[rows],
            batch.advantages[rows],
            mask,
            cliprange=c.epsilon,
            normalizer=normalizer,
            cliprange_high=c.epsilon_high,
        )
        pen = self.penalty_loss(batch, rows, logits, logprobs, normalizer)
        return pg + pen, {"loss/policy": pg.detach(), "loss/penalty": pen.detach()}, stats
