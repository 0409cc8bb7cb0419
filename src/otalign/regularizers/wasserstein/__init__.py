r"""The Wasserstein policy regularization (WPR) penalty: an entropic OT potential over token embeddings.

At each generated position, with policy :math:`a = \pi_\theta(\cdot)`, reference :math:`b = \pi_{ref}(\cdot)`
and the sampled token :math:`y` (docs/design.md, "WPR penalty"):

1. **Support.** :math:`S = \text{top-}k(a) \cup \text{top-}k(b) \cup \{y\}`, stored in ``2k + 1`` slots
   (slot 0 is :math:`y`); a slot repeating a token of an earlier slot is a *duplicate* and carries no mass,
   so the sampled token's slot always carries its mass. The mass outside :math:`S` of each distribution goes
   to one *dust* atom (the last slot). Duplicates are moved to the end and dropped where a whole chunk has
   them, so Sinkhorn runs on ``s + 1 <= 2k + 2`` atoms, ``s`` the largest number of distinct tokens.
2. **Cost.** :math:`C_{ij}` = Euclidean distance (or 1 - cosine similarity) of the embedding rows of the
   support, computed on the fly with one batched matmul. With ``knn = k1``, a pair is a neighbour pair iff
   :math:`C_{ij} \le \max(r_i, r_j)` with :math:`r_i` the distance of token :math:`i` to its k1-th nearest
   token (:func:`otalign.ot.knn_radius`): "j among the k1 nearest of i, or i among those of j".
3. **Dust.** :math:`C(\text{dust}, \text{dust}) = 0`, :math:`C(\text{dust}, i) = c_d` with :math:`c_d` the
   largest cost among the support's tokens (``dust_cost="max"``) or a given number.
   A non-neighbour pair costs :math:`2 c_d`, the price of the path :math:`i \to \text{dust} \to j`: the
   paper's :math:`+\infty` makes the truncated problem infeasible whenever the policy moves more mass
   between non-neighbours than the dust holds (its Sinkhorn then never converges and the potentials grow
   with the iteration count), which docs/design.md ("WPR penalty", 3) rules out. With finite costs every problem is
   feasible.
4. **Entropic OT** with :math:`\varepsilon = 1/\lambda` by :func:`otalign.ot.sinkhorn` (stabilised,
   with eps-scaling, stopping on the marginal error), all positions of a chunk in one batched call.
   The difference transport (:func:`otalign.ot.difference_transport`; ``transport="difference"``, and the solve
   under the default ``transport="smooth"``) moves only the mass the two distributions do not share: the policy's
   excess :math:`(a-b)_+` onto its deficit :math:`(b-a)_+` (Sinkhorn on the excess x deficit block only; an
   atom with neither, :math:`a_i = b_i > 0`, gets the soft c-transforms of that block's potentials),
   :math:`W = m\cdot\min \langle P,C\rangle + \varepsilon\,\mathrm{KL}(P\|\alpha\beta^\top)` with
   :math:`m` the total variation and :math:`\alpha,\beta` the normalised excess and deficit. For the
   metric costs used here the unregularised optimum leaves the shared mass in place, so both forms tend
   to :math:`W_1(a, b)` as :math:`\lambda\to\infty`; the difference form is 0 at :math:`a = b` and is
   solvable to tolerance at the paper's :math:`\lambda = 100`, where the full form is not (its plan is
   nearly diagonal, Sinkhorn needs tens of thousands of iterations and its potentials swing by whole
   cost units until then — measured on SmolLM2 embeddings, see ``benchmarks/penalty.py``).
   ``transport="full"`` (:func:`.solve._solve_full`) keeps the paper's
   :math:`\mathrm{OT}_\varepsilon(a,b) = \min_{P1=a, P^\top 1=b} \langle P,C\rangle + \varepsilon\sum P(\log P-1)`.
5. **Penalty.** The gradient of the value with respect to the policy's masses along the simplex (the
   sign of docs/design.md ("WPR penalty", 5): large where the policy puts mass the reference lacks): difference form
   :math:`\phi_i = u_i` on excess atoms, :math:`-v_i` on deficit atoms (product-reference potentials,
   :func:`otalign.ot.difference_transport`); full form :math:`\phi = f`
   (:math:`P = e^{(f_i + g_j - C_{ij})/\varepsilon}`), averaged over the problem and its transpose
   (:func:`.solve._solve_full` says why). Shifted per position by :math:`t` so that
   :math:`\sum_{i \in S \cup \{\text{dust}\}} a_i \phi_i` equals the value (docs/design.md, 6): the
   sampled token's :math:`\phi_y` is then an unbiased one-sample estimate of the distance.
   With ``debias=True`` (full form) the distance is the Sinkhorn divergence
   :math:`\mathrm{OT}_\varepsilon(a,b) - \frac12\mathrm{OT}_\varepsilon(a,a) - \frac12\mathrm{OT}_\varepsilon(b,b)`
   with gradient :math:`\phi = \frac12(f_{ab} + g_{ba}) - \frac12(f_{aa} + g_{aa})`, exactly zero when
   :math:`a = b`.
6. **Smoothing** (``transport="smooth"``, the default; :func:`smooth_distance`). The difference form is
   positively homogeneous in the moved mass, so its penalties stay of the order of the costs however close
   the policy is to the reference: an unbiased but pure-noise reward near the reference. The default
   distance is :math:`D = h_\tau(W)` with :math:`W` the difference-form value and the C1 blend
   :math:`h_\tau(W) = W^2 (2\tau - W)/\tau^2` for :math:`W < \tau`, :math:`W` beyond; its penalty
   :math:`h_\tau'(W)(\phi - W) + D` has a per-token spread that vanishes linearly with the distance
   (:class:`WassersteinRegularizer` gives the argument; ``docs/wpr-penalty.md`` the measurements).

Units: costs, potentials, values and penalties are in the cost's units (embedding distance).
The sampled token's mass is floored at :math:`e^{-80}` (:data:`~otalign.regularizers.base.LOG_PROB_FLOOR`):
a zero-mass atom has potential :math:`-\infty`, and :math:`\phi_y` contains :math:`\varepsilon\log a_y`,
so the floor bounds the penalty of a token the policy gave (numerically) no mass at about
:math:`-80\varepsilon` plus its transport term, instead of :math:`-\infty`.

Modules: :mod:`.problem` (steps 1-3: support, masses, dust, costs), :mod:`.solve` (steps 4-6: the transports on
top of :mod:`otalign.ot`, the shift and the smoothing), :mod:`.regularizer` (:class:`WassersteinRegularizer`: the
penalty and the support gradient from one solve per position, from full logits or from a
:class:`~otalign.regularizers.topk.TopKLogProbs` record).
"""

from __future__ import annotations

from .problem import (
    KNN_RTOL,
    METRICS,
    Support,
    TruncatedProblem,
    build_problem,
    compact,
    select_support,
    support_cost,
    support_masses,
    topk_support,
    truncated_problem,
)
from .regularizer import WassersteinRegularizer
from .solve import (
    SMOOTH_MASS,
    TRANSPORTS,
    WassersteinSolution,
    default_smooth_tau,
    smooth_distance,
    solve_problem,
)

__all__ = [
    "KNN_RTOL",
    "METRICS",
    "SMOOTH_MASS",
    "TRANSPORTS",
    "Support",
    "TruncatedProblem",
    "WassersteinRegularizer",
    "WassersteinSolution",
    "build_problem",
    "compact",
    "default_smooth_tau",
    "select_support",
    "smooth_distance",
    "solve_problem",
    "support_cost",
    "support_masses",
    "topk_support",
    "truncated_problem",
]
