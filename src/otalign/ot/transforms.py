r"""The soft c-transform: the entropic dual's exact update of one side's potential given the other's.

In the product-reference form :math:`P_{ij} = a_i b_j e^{(u_i + v_j - C_{ij})/\varepsilon}` (:mod:`otalign.ot`),
the row marginals are exact (:math:`P1 = a`) when :math:`u = \mathrm{ct}(v)` with

.. math::
    \mathrm{ct}(v)_i = -\varepsilon \log \sum_j b_j \exp\big((v_j - C_{ij})/\varepsilon\big),

and symmetrically for the columns. Sinkhorn alternates the two; a zero-mass atom's potential is the
c-transform of the other side (its value on the plan's support if the atom had mass).
"""

from __future__ import annotations

import torch


def c_transform(
    potential: torch.Tensor, log_mass: torch.Tensor, cost: torch.Tensor, eps: float, dim: int
) -> torch.Tensor:
    r"""Soft c-transform: :math:`-\varepsilon \log \sum_k \exp(\log w_k + (h_k - C_{k\cdot})/\varepsilon)`.

    Args:
        potential: ``h``, (B, n) when ``dim == 1`` or (B, m) when ``dim == 2``, in cost units (product-reference
            form: finite on zero-mass atoms).
        log_mass: ``log w``, the same shape: log-masses of the side summed over (``-inf`` for zero mass).
        cost: (B, n, m) costs.
        eps: the entropic regularisation, cost units, > 0.
        dim: the axis of ``cost`` summed over: 1 gives the column side's potential (B, m), 2 the row side's (B, n).

    Returns:
        The transformed potential, cost units. An atom with no finite cost to a positive-mass partner gets 0
        (it carries no plan mass, so its potential is arbitrary).
    """
    weights = (log_mass + potential / eps).unsqueeze(-1 if dim == 1 else -2)
    out = -eps * torch.logsumexp(weights - cost / eps, dim=dim)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)
