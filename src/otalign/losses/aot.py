r"""AOT: alignment via optimal transport (Melnyk et al. 2024), paired and unpaired.

AOT asks the distribution of a score U to dominate that of V in the first order and penalises
violations of the quantile order with a convex loss h:

.. math::
    \mathcal{L} = \int_0^1 h\big(Q_U(t) - Q_V(t)\big)\,dt = \mathrm{OT}_h(\hat\mu_U, \hat\mu_V),

the one-dimensional OT cost with ground cost h(u - v), solved exactly by sorting. Scores are
sequence log-probability ratios in nats:

- paired: :math:`u_i = \log\pi_\theta(y^+_i|x_i) - \log\pi_\theta(y^-_i|x_i)`,
  :math:`v_i = \log\pi_{\mathrm{ref}}(y^+_i|x_i) - \log\pi_{\mathrm{ref}}(y^-_i|x_i)`;
- unpaired: :math:`u_i = \log\pi_\theta(y^+_i|x^+_i) - \log\pi_{\mathrm{ref}}(y^+_i|x^+_i)` over
  the chosen samples and :math:`v_j` the same over the rejected samples, which may come from
  other prompts and be fewer or more than the chosen ones.

Losses h (beta > 0): ``logistic`` :math:`\log(1 + e^{-\beta z})`, ``hinge2``
:math:`(\beta - z)_+^2`, ``lsq`` :math:`(\beta - z)^2` (beta is a scale in the first and a
margin in the other two). With n samples of each, the loss is
:math:`\frac1n\sum_i h(u_{(i)} - v_{(i)})` over the order statistics; with n != m it is the same
integral over the merged quantile grid (north-west-corner coupling of the two uniform measures):
:math:`\sum_k w_k\,h(u_{(\lfloor t_k n\rfloor)} - v_{(\lfloor t_k m\rfloor)})` with
:math:`w_k = t_{k+1} - t_k` and :math:`\{t_k\} = \{i/n\} \cup \{j/m\}`.

The sort spans the whole data-parallel batch: under ``torch.distributed`` (``accelerate launch``)
the scores of all processes are gathered first, the gradient flowing back to each process's own
scores, so the loss does not depend on how the batch is split over devices. (TRL's ``aot`` and
``aot_pair`` losses sort per device.)

:class:`AOTLoss` binds :func:`aot_loss` to config values as a loss object (:mod:`otalign.losses.interface`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._distributed import all_gather_with_grad, is_distributed
from ._validation import check_choice, check_positive, check_vectors
from .interface import LossOutput, implicit_rewards

AOT_LOSSES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "logistic": lambda z, beta: F.softplus(-beta * z),
    "hinge2": lambda z, beta: F.relu(beta - z) ** 2,
    "lsq": lambda z, beta: (beta - z) ** 2,
}


def quantile_coupling(n: int, m: int, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
    """Optimal coupling of two sorted uniform empirical measures of sizes ``n`` and ``m``.

    Args:
        n: number of atoms of the first measure (>= 1).
        m: number of atoms of the second measure (>= 1).
        device: where to put the result.

    Returns:
        ``(i, j, w)``, each (K,) with K <= n + m - 1: the k-th piece couples the i_k-th smallest
        atom of the first measure with the j_k-th smallest of the second, with mass w_k
        (float64, sum 1); ``i`` and ``j`` are int64. For n == m this is i = j = arange(n), w = 1/n.
    """
    if n < 1 or m < 1:
        raise ValueError(f"both measures need at least one atom, got n={n}, m={m}")
    # Breakpoints i/n and j/m of the two quantile functions, in integer units of 1/(n m).
    edges = torch.unique(torch.cat([torch.arange(n + 1, device=device) * m, torch.arange(m + 1, device=device) * n]))
    starts = edges[:-1]
    return starts // m, starts // n, (edges[1:] - starts).double() / (n * m)


def sorted_ot_loss(
    u: torch.Tensor, v: torch.Tensor, h: str = "logistic", beta: float = 0.01, label_smoothing: float = 0.0
) -> torch.Tensor:
    r"""One-dimensional OT cost :math:`\int_0^1 h(Q_u(t) - Q_v(t))dt` between two empirical samples.

    Args:
        u: (n,) scores that should dominate.
        v: (m,) scores that should be dominated.
        h: ``"logistic"``, ``"hinge2"`` or ``"lsq"`` (module docstring).
        beta: scale (logistic) or margin (hinge2, lsq), > 0.
        label_smoothing: s in [0, 0.5), logistic only: :math:`(1-s)\,h(z) + s\,h(-z)` (TRL 1.16's AOT).

    Returns:
        Scalar loss, differentiable w.r.t. ``u`` and ``v`` (through the sort's permutation).
    """
    check_choice("h", h, tuple(AOT_LOSSES))
    beta = check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and h != "logistic":
        raise ValueError(f"label_smoothing applies to h='logistic' only, got h={h!r}")
    i, j, w = quantile_coupling(u.shape[0], v.shape[0], device=u.device)
    u_sorted, v_sorted = torch.sort(u).values, torch.sort(v).values
    z = u_sorted[i] - v_sorted[j]
    losses = AOT_LOSSES[h](z, beta)
    if label_smoothing:
        losses = (1.0 - label_smoothing) * losses + label_smoothing * AOT_LOSSES[h](-z, beta)
    return (w.to(u.dtype) * losses).sum()


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    paired: bool = True,
    h: str = "logistic",
    beta: float = 0.01,
    label_smoothing: float = 0.0,
    distributed: bool = True,
) -> torch.Tensor:
    """AOT loss over the whole data-parallel batch (equations in the module docstring).

    Args:
        policy_chosen_logps: (n,) :math:`\\log\\pi_\\theta(y^+|x)` of the chosen responses, nats.
        policy_rejected_logps: (n,) paired / (m,) unpaired :math:`\\log\\pi_\\theta(y^-|x)`.
        ref_chosen_logps: (n,) the same as ``policy_chosen_logps`` under the reference model.
        ref_rejected_logps: like ``policy_rejected_logps``, under the reference model.
        paired: paired AOT (row i of all four tensors is one preference pair) or unpaired AOT
            (chosen and rejected are two independent samples, any prompts, any sizes n and m).
        h: ``"logistic"``, ``"hinge2"`` or ``"lsq"``.
        beta: scale (logistic) or margin (hinge2, lsq), > 0.
        label_smoothing: see :func:`sorted_ot_loss` (logistic only).
        distributed: gather the scores of all processes when ``torch.distributed`` is running.
            Every process must then call this, and gets the loss of the global batch.

    Returns:
        Scalar loss. With one pair and ``h="logistic"`` it equals ``dpo_loss(kind="sigmoid")``.
    """
    empty = is_distributed(distributed)  # a process's share of the gathered batch may be empty
    check_vectors(empty, policy_chosen_logps=policy_chosen_logps, ref_chosen_logps=ref_chosen_logps)
    check_vectors(empty, policy_rejected_logps=policy_rejected_logps, ref_rejected_logps=ref_rejected_logps)
    if paired:
        check_vectors(empty, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps)
        u = policy_chosen_logps - policy_rejected_logps
        v = ref_chosen_logps - ref_rejected_logps
    else:
        u = policy_chosen_logps - ref_chosen_logps
        v = policy_rejected_logps - ref_rejected_logps
    u, v = all_gather_with_grad(u, v.to(u.dtype), enabled=distributed)
    return sorted_ot_loss(u, v, h=h, beta=beta, label_smoothing=label_smoothing)


@dataclass
class AOTLoss:
    """Paired or unpaired AOT loss object (:func:`aot_loss`), sorted over the whole data-parallel batch.

    Paired: called with the four (n,) vectors of n pairs. Unpaired: with ``(policy, ref, labels, ...)`` of labelled
    completions; u = the chosen completions' log-ratios, v = the rejected ones' (any sizes >= 1). Rewards: the
    implicit rewards of the inputs, in their order.
    """

    paired: bool
    beta: float
    h: str = "logistic"
    label_smoothing: float = 0.0
    needs_kl = False

    def __call__(self, *logps: torch.Tensor) -> LossOutput:
        if self.paired:
            policy_chosen, policy_rejected, ref_chosen, ref_rejected = logps
            policy, ref = torch.cat([policy_chosen, policy_rejected]), torch.cat([ref_chosen, ref_rejected])
        else:
            policy, ref, labels = logps[:3]
            policy_chosen, policy_rejected = policy[labels], policy[~labels]
            ref_chosen, ref_rejected = ref[labels], ref[~labels]
        loss = aot_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            paired=self.paired,
            h=self.h,
            beta=self.beta,
            label_smoothing=self.label_smoothing,
        )
        return LossOutput(loss, implicit_rewards(policy, ref, self.beta))
