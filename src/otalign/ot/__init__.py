r"""Optimal-transport math on tensors: Sinkhorn solvers, the difference transport, the soft c-transform, ground
costs and k-NN radii.

Pure PyTorch; no transformers import, so other frameworks can call it directly.

Dual potentials — one convention for :class:`SinkhornResult` and :class:`UnbalancedResult`:

- ``u`` (B, n), ``v`` (B, m): the *product-reference* potentials,
  :math:`P_{ij} = a_i b_j \exp((u_i + v_j - C_{ij})/\varepsilon)` (POT's ``eps * log u``); finite on
  zero-mass atoms, where they are the (damped) soft c-transform of the other side.
- ``f`` (B, n), ``g`` (B, m): the same potentials in the *absolute* form,
  :math:`P_{ij} = \exp((f_i + g_j - C_{ij})/\varepsilon)`, i.e. ``f = u + eps log a``,
  ``g = v + eps log b``; ``-inf`` on zero-mass atoms. For the balanced problem ``f`` is the gradient of the
  value with respect to ``a`` (up to a constant on the simplex).

(``UnbalancedResult.f`` and ``.g`` used to hold the product-reference form; that is now ``.u`` and ``.v``.)

Convergence is decided per problem: ``converged`` (B,) bool says which problems met ``tol`` within
``max_iter``, ``iters`` (B,) how many iterations each ran (a converged problem is frozen while the rest
of the batch goes on), ``n_iter`` the largest of them.
"""

from .costs import COST_FUNCTIONS, cosine, euclidean, pairwise_cost, sqeuclidean
from .difference import DifferenceResult, difference_transport
from .knn import content_hash, knn_radius
from .sinkhorn import SinkhornResult, sinkhorn
from .transforms import c_transform
from .unbalanced import UnbalancedResult, unbalanced_sinkhorn

__all__ = [
    "COST_FUNCTIONS",
    "DifferenceResult",
    "SinkhornResult",
    "UnbalancedResult",
    "c_transform",
    "content_hash",
    "cosine",
    "difference_transport",
    "euclidean",
    "knn_radius",
    "pairwise_cost",
    "sinkhorn",
    "sqeuclidean",
    "unbalanced_sinkhorn",
]
