r"""TRL's ``GRPOTrainer`` with any otalign regularizer in the loss (in place of TRL's k3 term) or in the reward.

TRL's GRPO loss is :math:`\mathrm{agg}(\ell^{PG}_t) + \beta\,\mathrm{agg}(k3_t)`, where :math:`\mathrm{agg}` is the
loss type's masked average (linear in its per-token input). This trainer runs TRL's loss with the k3 term off and
adds :math:`\beta\,\mathrm{agg}(R_t)` with the same :math:`\mathrm{agg}`, ``beta = GRPOConfig.beta``:

- a regularizer with a per-token loss term (:meth:`~otalign.regularizers.Regularizer.loss_term`: ``kl``/``rkl``,
  the k3 estimate) gives :math:`R_t` from TRL's own sampled-token log-probabilities, times TRL's importance weight
  under ``use_bias_correction_kl``: TRL's GRPO loss and gradients exactly;
- any other regularizer with a support gradient (``wasserstein``, the f-divergences) gives the surrogate
  :math:`R_t = \sum_i \pi_\theta(i)\,\phi_i` (:class:`~otalign.regularizers.SupportGradient`: its gradient in
  :math:`\theta` is the gradient of the distance :math:`D(\pi_\theta, \pi_{ref})` at each generated position),
  solved at the current policy every micro-batch (``otalign grpo --penalty_in loss --loss_potentials current``).

With ``penalty_in="reward"`` the regularizer's per-token penalty (its ``penalty``, e.g. the Wasserstein potential
at the sampled token, or :math:`\log\pi_\theta/\pi_{ref}` for ``kl``) is summed over each completion and
:math:`\beta` times that sum is taken off the completion's reward before TRL's group normalisation (the loss then
has no regularizer term), as WPR's PPO puts ``-beta * penalty`` into the reward. The policy side comes from TRL's
old-policy pass when it runs one, else from one extra scoring pass of the policy (no gradient).

No ``(B, T, V)`` tensor is built. TRL keeps its fused LM head for the sampled-token log-probabilities; the
backbone's final hidden states of TRL's own passes (O(d) per position: the reference's from TRL's reference pass,
kept with the batch; the policy's from the loss pass, with gradient) go through the LM heads in chunks of positions
(``regularizer.max_chunk_elements`` logits at a time) for the solve, and the surrogate's chunk is recomputed in
the backward pass (activation checkpointing) instead of being stored. The reference is TRL's: ``ref_model``, or
with PEFT the model with its adapters disabled. Generation is untouched, so TRL's vLLM generation works as is.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint
from trl import GRPOTrainer

from otalign.regularizers import Regularizer, SupportGradient

from .capture import hidden_states
from .penalty import chunk_rows, lm_heads, mean_stats, penalties, tempered_log_probs

REF_HIDDEN = "ref_hidden"
"""The batch key of the reference's (B, T, d) final hidden states at the completion positions."""

PENALTY_IN = ("loss", "reward")


class WPRGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer(model, reward_funcs, args=GRPOConfig(beta=...), ..., regularizer=...)``.

    Args:
        regularizer: an otalign :class:`~otalign.regularizers.Regularizer` (e.g.
            ``build_regularizer("wasserstein", embeddings=...)``); in the loss it needs a ``loss_term`` or a support
            gradient. Its coefficient is ``GRPOConfig.beta`` (> 0).
        penalty_in: ``"loss"`` (default) or ``"reward"`` (see the module).
        *args, **kwargs: TRL's ``GRPOTrainer`` arguments.

    Raises:
        ValueError: ``beta`` 0, a regularizer with neither form in the loss, an LM head that is not a plain linear
            layer (logit scaling or soft-capping, an adapted head) where the heads are needed, or (in the reward)
            ``multi_objective_aggregation="normalize_then_sum"`` or tools: one line each.
    """

    def __init__(self, *args, regularizer: Regularizer, penalty_in: str = "loss", **kwargs) -> None:
        if not isinstance(regularizer, Regularizer):
            raise ValueError(f"regularizer must be an otalign Regularizer, got {type(regularizer).__name__}")
        if penalty_in not in PENALTY_IN:
            raise ValueError(f"penalty_in must be one of {PENALTY_IN}, got {penalty_in!r}")
        probe = torch.zeros(1)
        self.penalty_in = penalty_in
        self.uses_surrogate = penalty_in == "loss" and regularizer.loss_term(probe, probe) is None
        if self.uses_surrogate and not regularizer.has_support_gradient:
            raise ValueError(f"{regularizer!r} has neither a loss_term nor a support gradient: it cannot be in a loss")
        self._scored = None
        self._passes: list[tuple] | None = None  # a list only while TRL's generation step runs
        super().__init__(*args, **kwargs)
        if self.beta == 0.0:
            raise ValueError("WPRGRPOTrainer: GRPOConfig.beta is the regularizer's coefficient; set it > 0")
        if penalty_in == "reward":
            if self.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError(
                    "WPRGRPOTrainer: penalty_in='reward' needs multi_objective_aggregation='sum_then_normalize'"
                )
            if getattr(self, "tools", None):
                raise ValueError("WPRGRPOTrainer: penalty_in='reward' does not support tools (tool tokens unmasked)")
        self.regularizer = regularizer
        if self.uses_surrogate or penalty_in == "reward":
            self.heads = lm_heads(self.model, self.ref_model if self.ref_model is not None else self.model)

    # ------------------------------------------------------------------ TRL's passes, with their hidden states
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's scoring pass; also keeps, in ``self._scored``, its per-token log-probs and (where the heads are
        needed) the (B, T, d) final hidden states predicting the ``logits_to_keep`` completion tokens; the passes of
        a generation step are listed in ``self._passes`` as ``(input_ids, attention_mask, logits_to_keep, hidden)``."""
        if not (self.uses_surrogate or self.penalty_in == "reward"):
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            self._scored = (out[0], None)
            return out
        with hidden_states(model, detach=not torch.is_grad_enabled()) as kept:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        hidden = torch.cat([h[:, -logits_to_keep - 1 : -1] for h in kept])
        self._scored = (out[0], hidden)
        if self._passes is not None:
            self._passes.append((input_ids, attention_mask, logits_to_keep, hidden))
        return out

    def _generate_and_score_completions(self, inputs):
        """TRL's batch, plus the reference's hidden states from TRL's reference pass (its last scoring pass)."""
        self._passes = []
        try:
            output = super()._generate_and_score_completions(inputs)
            if self.uses_surrogate:
                output[REF_HIDDEN] = self._passes[-1][3]
        finally:
            self._scored = None
            self._passes = None
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's (N, F) rewards of every process; with ``penalty_in="reward"``, ``beta`` times each completion's
        summed penalty taken off its first scored column (divided by that column's weight, so that TRL's weighted
        sum loses exactly ``beta * penalty``)."""
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.penalty_in != "reward":
            return rewards
        penalty = self.accelerator.gather(self._sequence_penalties()).to(rewards.device)
        scored = ~torch.isnan(rewards)
        column = scored.float().argmax(dim=1, keepdim=True)  # the first scored column of each row
        weights = self.reward_weights.to(rewards.device)[column[:, 0]]
        if bool((weights[scored.any(1)] == 0).any()):
            raise ValueError("WPRGRPOTrainer: penalty_in='reward' needs a non-zero weight on each row's first reward")
        shift = torch.where(scored.any(1), self.beta * penalty / weights.where(weights != 0, 1.0), 0.0)
        return rewards.scatter_add(1, column, -shift[:, None].to(rewards.dtype))

    def _sequence_penalties(self) -> torch.Tensor:
        """(B,) the regularizer's penalty summed over each completion of this step, from the reference's pass (the
        last scoring pass) and the policy's (TRL's old-policy pass, or one more pass here)."""
        input_ids, attention_mask, keep, ref_hidden = self._passes[-1]
        if len(self._passes) >= 2:
            policy_hidden = self._passes[-2][3]
        else:
            with torch.no_grad():
                self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, keep)
            policy_hidden = self._scored[1]
        mask = attention_mask[:, -keep:].bool()
        per_token, stats = penalties(
            self.regularizer, self.heads, policy_hidden, ref_hidden, input_ids[:, -keep:], mask, self.temperature
        )
        self._log_stats({**stats, "regularizer/penalty_sum": float(per_token.sum(1).mean())})
        return per_token.sum(1)

    def _log_stats(self, stats: dict) -> None:
        mode = "train" if self.model.training else "eval"
        for name, value in stats.items():
            self._metrics[mode][name].append(value)

    # ------------------------------------------------------------------ the loss
    def _compute_loss(self, model, inputs):
        """TRL's loss without its k3 term, plus ``beta`` times the regularizer's term under the same aggregation."""
        beta = self.beta
        self.beta = 0.0
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self.beta = beta
        logps, hidden = self._scored
        self._scored = None
        if self.penalty_in == "reward":
            return loss
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        if self.uses_surrogate:
            term = self._surrogate(hidden, inputs[REF_HIDDEN], inputs["completion_ids"], mask.bool())
        else:
            term = self.regularizer.loss_term(logps, inputs["ref_per_token_logps"])
            if self.args.use_bias_correction_kl:
                term = term * self._importance_weights(logps, inputs, mask)
        mode = "train" if self.model.training else "eval"
        value = (term.detach() * mask).sum() / mask.sum().clamp(min=1.0)
        self._metrics[mode]["regularizer/term"].append(self.accelerator.gather(value).nanmean().item())
        return loss + beta * self._aggregate(term, mask, inputs, mode)

    def _surrogate(
        self, hidden: torch.Tensor, ref_hidden: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(B, T) the support-gradient surrogate at the generated positions (0 elsewhere), differentiable in the
        policy's (B, T, d) ``hidden`` and LM head; the reference's (B, T, d) ``ref_hidden`` is held fixed."""
        head, ref_head = self.heads
        states, ref_states, tokens = hidden[mask], ref_hidden[mask].to(hidden.device), actions[mask]
        values, parts = [], []
        for rows in chunk_rows(self.regularizer, head, tokens.shape[0]):
            with torch.no_grad():
                evaluation = self.regularizer.evaluate(
                    tempered_log_probs(head, states[rows], self.temperature)[None],
                    tempered_log_probs(ref_head, ref_states[rows], self.temperature)[None],
                    tokens[rows][None],
                    support_gradient=True,
                    normalized=True,
                )
            values.append(checkpoint(self._chunk_surrogate, states[rows], evaluation.gradient, use_reentrant=False))
            parts.append((tokens[rows].shape[0], evaluation.penalty.stats))
        term = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
        if values:
            term = term.masked_scatter(mask, torch.cat(values).float())
        self._log_stats(mean_stats(parts))
        return term

    def _chunk_surrogate(self, states: torch.Tensor, gradient: SupportGradient) -> torch.Tensor:
        """(n,) the surrogate of ``n`` positions from their (n, d) hidden states through the policy's head."""
        return gradient.surrogate(tempered_log_probs(self.heads[0], states, self.temperature))

    def _importance_weights(self, logps: torch.Tensor, inputs: dict, mask: torch.Tensor) -> torch.Tensor:
        """TRL's importance weight of the k3 term under ``use_bias_correction_kl``: (B, T) or (B, 1)."""
        old = inputs.get("old_per_token_logps")
        log_ratio = logps - (logps.detach() if old is None else old)
        if self.importance_sampling_level == "sequence":
            log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return torch.exp(log_ratio)

    def _aggregate(self, per_token: torch.Tensor, mask: torch.Tensor, inputs: dict, mode: str) -> torch.Tensor:
        """The scalar TRL's ``loss_type`` makes of a (B, T) per-token loss (its masked average and normalizer)."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        masked = per_token * mask
        if self.loss_type in ("grpo", "sapo"):
            return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
        if self.loss_type == "bnpo":
            return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return masked.sum() / (per_token.size(0) * self.max_completion_length) / accumulation
        if self.loss_type in ("cispo", "dapo", "vespo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return masked.sum() / normalizer
        if self.loss_type == "luspo":
            return masked.sum(-1).mean() / accumulation
        raise ValueError(f"WPRGRPOTrainer: unknown loss_type {self.loss_type!r}")
