r"""Where an RL trainer puts the regularizer's penalty (``penalty_in``): one object, chosen once per run.

``reward`` (:class:`PenaltyInReward`): :math:`-\beta\,\text{penalty}_t` joins the per-token reward (WPR paper,
Algorithm 2), or its sum over the response joins the sequence reward of a critic-free method; the loss gets nothing.

``loss`` (:class:`PenaltyInLoss`): :math:`\beta\,d_t` joins the loss at every generated position, with :math:`d_t`
the regularizer's own per-token loss term when it has one (the reverse KL's k3, as GRPO) and otherwise the
surrogate :math:`\sum_i \pi_\theta(i\mid\text{ctx})\,\phi_i`, whose gradient is the distance's own
(:class:`otalign.regularizers.SupportGradient`, proof there). The potentials :math:`\phi` come from the scoring
pass (``loss_potentials: rollout``: the rollout policy, the same solve as the penalty) or from the current policy at
every micro-batch (``current``: one more reference forward and solve each time). With ``use_bias_correction_kl``
(TRL 1.16's default) the per-token loss term is multiplied by the ratio :math:`\rho_t = e^{\ell_t - \ell^{old}_t}`
(value 1 at the rollout policy, gradient :math:`d_t\nabla\ell_t` added), TRL's importance-sampling correction of
its KL term: the tokens were sampled from the rollout policy. The surrogate needs none: it sums over the whole
vocabulary at each position.
"""

from __future__ import annotations

import torch

from otalign.generation import Rollout, response_logits
from otalign.regularizers import Regularizer
from otalign.scoring import on_grid, rows_of


class PenaltyInReward:
    """The penalty in the reward: ``reward_beta`` is beta, the loss term is zero."""

    where = "reward"
    needs_support_gradient = False
    """Whether the scoring pass must return the penalty's support gradient."""

    def reward_beta(self, beta: float) -> float:
        """The coefficient of ``-penalty`` in the rewards."""
        return beta

    def loss(self, scored, rows, logits, logprobs, weights, normalizer: float, beta: float) -> torch.Tensor:
        """Zero: the penalty is in the rewards already."""
        return torch.zeros((), device=logprobs.device)


class PenaltyInLoss:
    """The penalty in the loss: :math:`\\beta \\sum_t w_t d_t / Z` per micro-batch (see the module).

    Args:
        regularizer: the penalty; without a :meth:`~otalign.regularizers.Regularizer.loss_term` it must have a
            support gradient.
        potentials: ``rollout`` or ``current`` (``loss_potentials``).
        reference: the frozen reference (``current`` potentials run it per micro-batch).
        temperature: sampling temperature (the distributions are ``softmax(logits / temperature)``).
        bias_correction: multiply a per-token loss term by the ratio to the rollout policy (``use_bias_correction_kl``).
    """

    where = "loss"

    def __init__(
        self, regularizer: Regularizer, potentials: str, reference, temperature: float, bias_correction: bool = False
    ) -> None:
        probe = torch.zeros(1)
        self.uses_loss_term = regularizer.loss_term(probe, probe) is not None
        if not self.uses_loss_term and not regularizer.has_support_gradient:
            raise ValueError(f"penalty_in=loss needs a regularizer with support_gradient, got {regularizer!r}")
        self.regularizer, self.potentials, self.reference, self.temperature = (
            regularizer,
            potentials,
            reference,
            temperature,
        )
        self.bias_correction = bias_correction
        self.needs_support_gradient = not self.uses_loss_term and potentials == "rollout"

    def reward_beta(self, beta: float) -> float:
        return 0.0

    def terms(self, scored, rows: torch.Tensor, logits: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
        """(b, T) per-position distance term with gradient (0 off-mask).

        Args:
            scored: the scored rollout. rows: this micro-batch's rollout rows.
            logits: (b, T, V) tempered policy logits (with grad). logprobs: (b, T) the sampled tokens'
                log-probabilities (with grad).
        """
        mask = scored.mask[rows]
        if self.uses_loss_term:
            terms = self.regularizer.loss_term(logprobs, scored.ref_logprobs[rows])
            if self.bias_correction:
                terms = terms * torch.exp((logprobs - scored.old_logprobs[rows]) * mask)
            return terms * mask
        if self.potentials == "rollout":
            potentials = rows_of(scored.potentials, rows)
        else:
            potentials = self.current_potentials(scored.rollout, rows, logits.detach(), mask)
        return potentials.surrogate(torch.log_softmax(logits.float(), -1)).float() * mask

    @torch.no_grad()
    def current_potentials(self, rollout: Rollout, rows: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor):
        """The support gradient at the current policy's ``logits`` for micro-batch ``rows``, on the (b, T) grid."""
        ref_logits = response_logits(self.reference, rollout, rows) / self.temperature
        return on_grid(self.regularizer.support_gradient(logits, ref_logits, rollout.responses[rows], mask), mask)

    def loss(self, scored, rows, logits, logprobs, weights, normalizer: float, beta: float) -> torch.Tensor:
        """:math:`\\beta \\sum_t w_t d_t / Z` (:meth:`terms`) for micro-batch ``rows`` with loss weights ``weights``
        (b, T) and normalizer ``normalizer`` (Z)."""
        return beta * (self.terms(scored, rows, logits, logprobs) * weights).sum() / normalizer


def penalty_placement(
    where: str, regularizer: Regularizer, potentials: str, reference, temperature: float, bias_correction: bool = False
):
    """:class:`PenaltyInReward` for ``where == "reward"``, else :class:`PenaltyInLoss`."""
    if where == "reward":
        return PenaltyInReward()
    return PenaltyInLoss(regularizer, potentials, reference, temperature, bias_correction)
