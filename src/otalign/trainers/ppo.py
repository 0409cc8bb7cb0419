r"""PPO with a pluggable per-token regularizer (WPR paper, Algorithm 2): ``PPOConfig`` and ``PPOTrainer``.

One step, read top to bottom in :meth:`PPOTrainer.train` (sampling, scoring and the update loop are the
shared machinery of :mod:`otalign.trainers.rl`):

1. **Rollout** (no grad): sample a response per prompt from the current policy; run the policy and the
   frozen reference on it; the regularizer turns both logits into a penalty per generated token (only
   these (B, T) values are kept); score the responses with the reward; critic values.
2. **Advantages**: per-token reward :math:`r_t = -\beta\,\text{penalty}_t` (``penalty_in: reward``) plus the
   score at the last token; GAE (:math:`\gamma = 1, \lambda = 0.95`); advantages whitened over the whole
   data-parallel batch.
3. **Update**: ``num_ppo_epochs`` passes over ``num_mini_batches`` mini-batches (each accumulated over
   ``gradient_accumulation_steps`` micro-batches) minimising the clipped surrogate plus ``vf_coef`` times
   the clipped value loss (plus :math:`\beta D` with ``penalty_in: loss``); losses are token means over the
   global mini-batch.

The policy distribution is ``softmax(logits / temperature)`` everywhere (ratios, penalty, KL), as in TRL.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from otalign.generation import response_logits, response_values
from otalign.models import ValueModel

from . import ppo_math as pm
from .config import TrainerConfig, redefault
from .rl import RLConfig, RLTrainer, RolloutBatch

__all__ = ["PPOConfig", "PPOTrainer"]


@dataclass
class PPOConfig(RLConfig):
    """PPO hyperparameters (defaults: WPR paper Table 9) on top of :class:`~otalign.trainers.rl.RLConfig` (data,
    sampling, rewards, regularizer, ``penalty_in``, adaptive beta, batch sizes as TRL's ``PPOConfig``)."""

    output_dir: str = redefault(TrainerConfig, "output_dir", "runs/ppo")
    critic_model_name_or_path: str | None = field(
        default=None,
        metadata={"path": "model", "help": "critic backbone, e.g. the reward model (none: the policy's weights)"},
    )
    critic_freeze_backbone: bool = field(
        default=False, metadata={"help": "train only the critic's value head (the backbone runs without grad)"}
    )
    gamma: float = field(default=1.0, metadata={"help": "GAE discount", "check": "[0, 1]"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda", "check": "[0, 1]"})
    cliprange_value: float | None = field(default=0.2, metadata={"help": "value clip (none: off)", "check": "> 0"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight", "check": ">= 0"})
    num_ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout batch", "check": ">= 1"})
    whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over the global batch"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten per-token rewards over the global batch"})


class PPOTrainer(RLTrainer):
    """PPO trainer for a causal LM policy with any :mod:`otalign.regularizers` penalty.

    Everything not passed in is built from the config (models from ``model_name_or_path``).

    Args:
        config: :class:`PPOConfig`.
        critic: :class:`otalign.models.ValueModel` (default: backbone copied from the policy).
        policy, ref_model, tokenizer, reward, regularizer, prompts, accelerator: see
            :class:`~otalign.trainers.rl.RLTrainer`.
    """

    progress_keys = ("reward/mean", "kl/exact", "penalty/mean")

    def __init__(self, config: PPOConfig, *, critic=None, **kwargs) -> None:
        self._critic = critic
        super().__init__(config, **kwargs)

    def build_models(self, policy) -> dict:
        """The critic: given, or from ``critic_model_name_or_path``, or a value head on a copy of the policy."""
        c, critic = self.config, self._critic
        del self._critic
        if critic is None:
            path, frozen = c.critic_model_name_or_path, c.critic_freeze_backbone
            critic = (
                ValueModel.from_pretrained(path, dtype=c.model_dtype, freeze_backbone=frozen)
                if path
                else ValueModel.from_causal_lm(policy, freeze_backbone=frozen)
            )
        return {"critic": critic}

    algorithm_name = "PPO"

    @property
    def num_epochs(self) -> int:
        return self.config.num_ppo_epochs

    def advantages(self, scored) -> RolloutBatch:
        """Critic values, per-token rewards (penalty included with ``penalty_in: reward``), GAE, whitening; the loss
        is a token mean (weights: the mask, units: token counts)."""
        c, acc, mask = self.config, self.accelerator, scored.mask
        old_values = response_values(acc.unwrap_model(self.critic), scored.rollout)
        rewards = pm.token_rewards(scored.penalty.per_token, scored.scores, mask, self.placement.reward_beta(self.beta))
        if c.whiten_rewards:
            rewards = pm.whiten(rewards, mask, acc, shift_mean=False)
        advantages, returns = pm.gae(rewards, old_values, mask, gamma=c.gamma, lam=c.lam)
        if c.whiten_advantages:
            advantages = pm.whiten(advantages, mask, acc)
        units, weights = mask.sum(1).float(), mask.float()
        return RolloutBatch(scored, advantages, units, weights, old_values=old_values, returns=returns)

    def loss(self, batch: RolloutBatch, rows: torch.Tensor, normalizer: float):
        """The loss of micro-batch ``rows`` for :meth:`~otalign.trainers.rl.RLTrainer.update`: clipped surrogate
        + ``vf_coef`` x clipped value loss (+ the penalty with ``penalty_in: loss``), over normalizer Z."""
        c, scored = self.config, batch.scored
        rollout, mask = scored.rollout, scored.mask[rows]
        logits = response_logits(self.policy, rollout, rows) / c.temperature
        logprobs = pm.token_logprobs(logits, rollout.responses[rows])
        values = response_values(self.critic, rollout, rows)
        old_logprobs, advantages = scored.old_logprobs[rows], batch.advantages[rows]
        pg, pg_stats = pm.policy_loss(
            logprobs, old_logprobs, advantages, mask, cliprange=c.cliprange, normalizer=normalizer
        )
        old_values, returns = batch.old_values[rows], batch.returns[rows]
        vf, vf_stats = pm.value_loss(
            values, old_values, returns, mask, cliprange_value=c.cliprange_value, normalizer=normalizer
        )
        pen = self.penalty_loss(batch, rows, logits, logprobs, normalizer)
        parts = {"loss/policy": pg.detach(), "loss/value": vf.detach(), "loss/penalty": pen.detach()}
        return pg + c.vf_coef * vf + pen, parts, {**pg_stats, **vf_stats}

    def batch_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        acc, mask, values = self.accelerator, batch.scored.mask, batch.old_values
        return {
            "value/mean": float(pm.masked_mean(values, mask, acc)),
            "value/explained_variance": pm.explained_variance(values, batch.returns, mask, acc),
        }

    def no_sync(self, *, last: bool):
        """Skip the data-parallel gradient all-reduce on all but the last micro-batch of a mini-batch."""
        if last:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.no_sync(self.policy))
        stack.enter_context(self.accelerator.no_sync(self.critic))
        return stack
