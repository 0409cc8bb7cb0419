r"""OTPO token weights (Li et al. 2025): unbalanced OT between the tokens of the chosen and rejected response.

For each pair, with the policy's last-layer hidden states :math:`h^c_i` (chosen tokens,
i = 1..n) and :math:`h^r_j` (rejected tokens, j = 1..m), taken detached at the positions that
predict each token:

.. math::
    M_{ij} = \|h^c_i - h^r_j\|_2 / \max_{kl}\|h^c_k - h^r_l\|_2, \qquad
    \Gamma = \arg\min_{G \ge 0} \langle G, M\rangle + \varepsilon_1 \mathrm{KL}(G\|ab^\top)
        + \varepsilon_2\big(\mathrm{KL}(G1\|a) + \mathrm{KL}(G^\top 1\|b)\big)

with a = 1_n, b = 1_m (mass 1 per token; POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, M,
reg=eps1, reg_m=eps2)``), and the weights

.. math::
    w^c = \Gamma 1 \cdot \tau / \textstyle\sum\Gamma, \qquad w^r = \Gamma^\top 1 \cdot \tau / \sum\Gamma,
    \qquad \tau = \min(n, m),

so each side's weights sum to tau. They multiply the per-token log-ratios of both policy and
reference (:func:`otalign.losses.sequence_logps`), in any pairwise loss.
"""

from __future__ import annotations

import torch

from otalign.ot import euclidean, unbalanced_sinkhorn

from ._validation import check_positive


def _check_side(name: str, hidden: torch.Tensor, mask: torch.Tensor) -> None:
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"{name}_hidden must be (B, L, H) and {name}_mask (B, L); got {tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}_mask must be a bool tensor, got {mask.dtype}")
    empty = (~mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name} responses of pairs {empty} have no valid token")


@torch.no_grad()
def otpo_weights(
    chosen_hidden: torch.Tensor,
    rejected_hidden: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    eps1: float = 1.0,
    eps2: float = 0.2,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OTPO token weights of a batch of pairs, all solved at once (equations in the module docstring).

    Pairs are padded to common lengths; padded tokens carry zero mass, so they neither receive
    weight nor change any other token's weight.

    Args:
        chosen_hidden: (B, Lc, H) hidden states of the chosen responses' tokens (any float dtype;
            position t is the state that predicts token t). Used detached.
        rejected_hidden: (B, Lr, H) the same for the rejected responses.
        chosen_mask: (B, Lc) bool, True on real tokens; at least one per pair.
        rejected_mask: (B, Lr) bool, same for the rejected responses.
        eps1: entropic regularization of the plan (> 0), in units of the normalized cost.
        eps2: marginal relaxation (> 0); smaller lets more mass be created or destroyed.
        max_iter: Sinkhorn iteration cap.
        tol: stop when the potentials change by at most this (normalized-cost units) in every pair.

    Returns:
        ``(chosen_weights, rejected_weights)``: (B, Lc) and (B, Lr), no gradient, zero on padded
        positions, each row summing to min(|y_c|, |y_r|); float32 (float64 for float64 input).
    """
    _check_side("chosen", chosen_hidden, chosen_mask)
    _check_side("rejected", rejected_hidden, rejected_mask)
    if chosen_hidden.shape[0] != rejected_hidden.shape[0] or chosen_hidden.shape[2] != rejected_hidden.shape[2]:
        raise ValueError(
            f"chosen_hidden {tuple(chosen_hidden.shape)} and rejected_hidden {tuple(rejected_hidden.shape)} "
            "need the same batch and hidden sizes"
        )
    eps1, eps2 = check_positive("eps1", eps1), check_positive("eps2", eps2)

    # Zero the padding so that whatever it holds (even NaN) stays out of the costs.
    chosen = chosen_hidden.detach().masked_fill(~chosen_mask.unsqueeze(-1), 0)
    rejected = rejected_hidden.detach().masked_fill(~rejected_mask.unsqueeze(-1), 0)
    cost = euclidean(chosen, rejected)
    valid = chosen_mask.unsqueeze(-1) & rejected_mask.unsqueeze(-2)
    cost = cost.masked_fill(~valid, 0)
    peak = cost.amax(dim=(-2, -1), keepdim=True)
    cost = torch.where(peak > 0, cost / peak, cost)  # identical states on both sides: all-zero cost

    a, b = chosen_mask.to(cost.dtype), rejected_mask.to(cost.dtype)
    plan = unbalanced_sinkhorn(a, b, cost, eps=eps1, rho=eps2, max_iter=max_iter, tol=tol).plan
    tau = torch.minimum(a.sum(-1), b.sum(-1))
    scale = (tau / plan.sum(dim=(-2, -1))).unsqueeze(-1)
    return plan.sum(-1) * scale, plan.sum(-2) * scale
