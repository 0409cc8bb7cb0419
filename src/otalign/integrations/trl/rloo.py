r"""TRL's ``RLOOTrainer`` with any otalign regularizer as the per-token penalty in the reward, in place of its
log-ratio.

TRL's RLOO takes :math:`\beta\sum_t(\log\pi_{old}(y_t) - \log\pi_{ref}(y_t))` off each completion's reward, from
its old-policy pass and its reference pass. This trainer gives TRL, in place of the reference's per-token
log-probabilities, :math:`\log\pi_{old}(y_t) - p_t` with :math:`p_t` the regularizer's penalty
(:meth:`~otalign.regularizers.Regularizer.penalty`, from both passes' final hidden states through the LM heads in
chunks: no ``(B, T, V)`` tensor), so TRL subtracts :math:`\beta\sum_t p_t` and logs its mean as ``kl``. TRL uses
the reference log-probabilities for nothing else. With ``kl``/``rkl`` :math:`p_t` is TRL's own log-ratio (floored
at :data:`~otalign.regularizers.LOG_PROB_FLOOR`): the trainer is TRL's ``RLOOTrainer``.
"""

from __future__ import annotations

import torch
from trl import RLOOTrainer

from otalign.regularizers import Regularizer

from .capture import hidden_states
from .penalty import lm_heads, penalties


class WPRRLOOTrainer(RLOOTrainer):
    """``RLOOTrainer(model, reward_funcs, args=RLOOConfig(beta=...), ..., regularizer=...)``.

    Args:
        regularizer: an otalign :class:`~otalign.regularizers.Regularizer`; its coefficient is ``RLOOConfig.beta``
            (> 0).
        *args, **kwargs: TRL's ``RLOOTrainer`` arguments.

    Raises:
        ValueError: ``beta`` 0, or an LM head that is not a plain linear layer: one line each.
    """

    def __init__(self, *args, regularizer: Regularizer, **kwargs) -> None:
        if not isinstance(regularizer, Regularizer):
            raise ValueError(f"regularizer must be an otalign Regularizer, got {type(regularizer).__name__}")
        self._passes: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        super().__init__(*args, **kwargs)
        if self.beta == 0.0:
            raise ValueError("WPRRLOOTrainer: RLOOConfig.beta is the regularizer's coefficient; set it > 0")
        self.regularizer = regularizer
        self.heads = lm_heads(self.model, self.ref_model if self.ref_model is not None else self.model)

    def _generate_and_score_completions(self, inputs):
        """TRL's step; its scoring passes (old policy, then reference) are kept while it runs."""
        self._passes = []
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._passes = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's scoring pass; in a generation step its second pass (the reference's) returns
        ``old log-probs - penalty`` in place of the reference's log-probs."""
        if self._passes is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        with hidden_states(model, detach=True) as kept:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        hidden = torch.cat([h[:, -logits_to_keep - 1 : -1] for h in kept])
        if not self._passes:  # the old policy's pass comes first
            self._passes.append((out[0], hidden))
            return out
        old_logps, old_hidden = self._passes.pop()
        mask = attention_mask[:, -logits_to_keep:].bool()
        penalty, stats = penalties(
            self.regularizer, self.heads, old_hidden, hidden, input_ids[:, -logits_to_keep:], mask, self.temperature
        )
        mode = "train" if self.model.training else "eval"
        for name, value in stats.items():
            self._metrics[mode][name].append(value)
        return (old_logps - penalty.to(old_logps.dtype), *out[1:])
