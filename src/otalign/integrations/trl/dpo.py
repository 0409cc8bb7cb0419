r"""TRL's ``DPOTrainer`` with OTPO token weights: the same loss as ``otalign dpo --token_weighting otpo``.

TRL scores a batch ``[chosen; rejected]`` with its fused LM head and sums the per-token log-probabilities of each
completion, for the policy and then the reference. This trainer multiplies both sides' per-token log-probabilities
by the OTPO weights :math:`w` (:func:`otalign.losses.otpo_weights`, from the policy's last-layer hidden states,
detached) before TRL sums them, so every TRL pairwise loss sees the weighted log-ratio
:math:`\sum_t w_t(\log\pi_\theta(y_t) - \log\pi_{ref}(y_t))` of each completion.

Supported: a separate reference model, or PEFT with the reference = adapters disabled (or TRL's ``"ref"`` adapter).
Refused with one line: ``precompute_ref_log_probs`` (the stored sums are unweighted), ``ld_alpha`` and
``use_weighting`` (they re-weight the same tokens), and the ``sft`` loss type (it reads the per-token
log-probabilities, which would be weighted). TRL's ``logps/*`` metrics are the weighted sums.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer

from otalign.losses import otpo_weights

from .capture import causal_lm, hidden_states


class OTPODPOTrainer(DPOTrainer):
    """``DPOTrainer(model, args=DPOConfig(...), ...)`` plus OTPO's two constants.

    Args:
        otpo_eps1: entropic regularization of the OTPO plan (> 0), as ``otalign dpo --otpo_eps1``.
        otpo_eps2: marginal relaxation (> 0), as ``otalign dpo --otpo_eps2``.
        *args, **kwargs: TRL's ``DPOTrainer`` arguments.

    Raises:
        ValueError: on a setting that would make the weighted loss silently wrong (see the module).
    """

    def __init__(self, *args, otpo_eps1: float = 1.0, otpo_eps2: float = 0.2, **kwargs) -> None:
        if not otpo_eps1 > 0 or not otpo_eps2 > 0:
            raise ValueError(f"otpo_eps1 and otpo_eps2 must be > 0, got {otpo_eps1} and {otpo_eps2}")
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:  # before TRL's __init__, which would precompute reference log-probs
            _refuse(config)
        super().__init__(*args, **kwargs)
        _refuse(self.args)
        self.otpo_eps1, self.otpo_eps2 = float(otpo_eps1), float(otpo_eps2)

    def _compute_loss(self, model, inputs, return_outputs):
        """TRL's loss with both passes' per-token log-probabilities weighted (a hook on each scoring module)."""
        mask = inputs["completion_mask"][..., 1:].bool()
        state: dict[str, torch.Tensor] = {}
        policy = causal_lm(model)
        modules = [policy] + ([causal_lm(self.ref_model)] if self.ref_model is not None else [])

        def weigh(module, args, kwargs, output):
            if not kwargs.get("fused_lm_head"):
                return output
            if "weights" not in state:  # the policy's pass comes first, the reference's second
                state["weights"] = self._weights(kept[0], mask)
            length = mask.shape[1]
            weighted = output.log_probs[:, -length:] * state["weights"].to(output.log_probs.dtype)
            output.log_probs = torch.cat([output.log_probs[:, :-length], weighted], dim=1)
            return output

        handles = [m.register_forward_hook(weigh, with_kwargs=True) for m in dict.fromkeys(modules)]
        try:
            with hidden_states(policy, detach=True) as kept:
                return super()._compute_loss(model, inputs, return_outputs)
        finally:
            for handle in handles:
                handle.remove()

    def _weights(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(2n, T) OTPO weights of a ``[chosen; rejected]`` batch from the backbone's (2n, T + 1, d) hidden states
        (position t predicts token t + 1) and the (2n, T) completion mask of the predicted tokens."""
        states = hidden[:, :-1][:, -mask.shape[1] :]
        pairs = mask.shape[0] // 2
        chosen, rejected = otpo_weights(
            states[:pairs],
            states[pairs:],
            mask[:pairs],
            mask[pairs:],
            eps1=self.otpo_eps1,
            eps2=self.otpo_eps2,
        )
        return torch.cat([chosen, rejected])


def _refuse(args) -> None:
    """One-line ``ValueError`` for a ``DPOConfig`` whose loss the OTPO weights would make silently wrong."""
    if getattr(args, "precompute_ref_log_probs", False):
        raise ValueError(
            "OTPODPOTrainer: precompute_ref_log_probs=True stores unweighted reference sums; set it to False"
        )
    if getattr(args, "ld_alpha", None) is not None:
        raise ValueError("OTPODPOTrainer: ld_alpha re-weights the tokens OTPO weights; set ld_alpha=None")
    if getattr(args, "use_weighting", False):
        raise ValueError("OTPODPOTrainer: use_weighting (WPO) reads per-token log-probs; set use_weighting=False")
    loss_types = args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    if "sft" in loss_types:
        raise ValueError("OTPODPOTrainer: loss_type 'sft' would train on OTPO-weighted log-probs; drop it")
