"""Optimal-transport math on tensors: Sinkhorn solvers, ground costs and k-NN radii.

Pure PyTorch; no transformers import, so other frameworks can call it directly.
"""

from .costs import COST_FUNCTIONS, cosine, euclidean, pairwise_cost, sqeuclidean
from .knn import content_hash, knn_radius
from .sinkhorn import SinkhornResult, sinkhorn
from .unbalanced import UnbalancedResult, unbalanced_sinkhorn

__all__ = [
    "COST_FUNCTIONS",
    "SinkhornResult",
    "UnbalancedResult",
    "content_hash",
    "cosine",
    "euclidean",
    "knn_radius",
    "pairwise_cost",
    "sinkhorn",
    "sqeuclidean",
    "unbalanced_sinkhorn",
]
