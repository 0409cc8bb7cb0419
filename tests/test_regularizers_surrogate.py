"""``support_gradient``: the surrogate sum_i pi_theta(i) phi_i (phi detached) has the gradient of the distance itself.

Oracle: central finite differences of the converged distance (float64, tiny vocabularies, tight Sinkhorn
tolerance) with respect to the policy logits, against autograd through the surrogate, for every transport form
(the default ``smooth`` included) and every f-divergence. Only the public API is
used, so the tests hold for any transport form or penalty formula whose potentials are the distance's gradient.
"""

from __future__ import annotations

import pytest
import torch

from otalign.regularizers import F_DIVERGENCES, build_regularizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

V, T = 10, 3


def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    policy = 1.5 * torch.randn(1, T, V, generator=gen, dtype=torch.float64)
    ref = 1.5 * torch.randn(1, T, V, generator=gen, dtype=torch.float64)
    actions = torch.randint(0, V, (1, T), generator=gen)
    embeddings = torch.randn(V, 3, generator=gen, dtype=torch.float64)
    return policy, ref, actions, embeddings


def check_surrogate_gradient(regularizer, policy, ref, actions, *, h=1e-5, rtol=1e-5, atol=1e-7):
    grad_out = regularizer.support_gradient(policy, ref, actions)
    logits = policy[0].clone().requires_grad_(True)
    surrogate = grad_out.surrogate(torch.log_softmax(logits, -1)).sum()
    (autograd,) = torch.autograd.grad(surrogate, logits)
    numeric = torch.empty_like(autograd)
    for j in range(V):
        step = torch.zeros_like(policy)
        step[..., j] = h
        up = regularizer.support_gradient(policy + step, ref, actions).value
        down = regularizer.support_gradient(policy - step, ref, actions).value
        numeric[:, j] = (up - down) / (2 * h)
    torch.testing.assert_close(autograd, numeric, rtol=rtol, atol=atol)
    assert autograd.abs().max() > 1e-3  # a real gradient, not two zeros
    # phi is shifted so that the surrogate's value is the distance itself
    value = grad_out.surrogate(torch.log_softmax(policy[0], -1))
    torch.testing.assert_close(value, grad_out.value, rtol=1e-8, atol=1e-9)
    return grad_out


@pytest.mark.parametrize(("transport", "debias"), [("difference", False), ("full", False), ("full", True)])
@pytest.mark.parametrize("top_k", [3, V])
def test_wasserstein_surrogate_gradient_matches_finite_differences(transport, debias, top_k):
    policy, ref, actions, embeddings = problem(1)
    settings = dict(embeddings=embeddings, lam=10.0 if transport == "difference" else 2.0, top_k=top_k)
    settings.update(transport=transport, debias=debias, max_iter=100_000)
    regularizer = build_regularizer("wasserstein", tol=1e-12, **settings)
    out = check_surrogate_gradient(regularizer, policy, ref, actions)
    # slot 0 is the sampled token, and its phi is the per-token penalty the regularizer uses in the reward
    assert torch.equal(out.tokens[:, 0], actions[0])
    float32 = build_regularizer("wasserstein", **{**settings, "max_iter": 5000}, tol=1e-5)  # penalty() is float32
    penalty = float32.penalty(policy, ref, actions).per_token[0].double()
    torch.testing.assert_close(out.phi[:, 0], penalty, rtol=1e-3, atol=1e-4)
    if top_k < V:
        assert bool((out.distinct.sum(1) < V).all())  # a dust atom with mass: its phi matters


@pytest.mark.parametrize("top_k", [3, V])
@pytest.mark.parametrize(
    ("drift", "tau"),
    [(0.05, None), (None, None), (None, 5.0)],
    ids=["near-reference-default-tau", "beyond-tau", "inside-the-blend"],
)
def test_smooth_surrogate_gradient_matches_finite_differences(drift, tau, top_k):
    """The default transport (GRPO's ``penalty_in: loss``): the surrogate's autograd gradient is the central finite
    difference of the smoothed distance h_tau(W), near the reference (W < tau, the blend's quadratic zone, the
    default tau), far from it (W > tau: h is the identity) and with every position inside the blend (tau = 5)."""
    policy, ref, actions, embeddings = problem(1)
    if drift is not None:
        policy = ref + drift * torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=ref.dtype)
    settings = dict(embeddings=embeddings, lam=10.0, top_k=top_k, transport="smooth", smooth_tau=tau)
    regularizer = build_regularizer("wasserstein", max_iter=100_000, tol=1e-12, **settings)
    out = check_surrogate_gradient(regularizer, policy, ref, actions)
    inside = out.value < regularizer.tau
    if drift is not None or tau is not None:
        assert bool(inside.all())  # h_tau is the blend, not the identity, at every position
    else:
        assert not bool(inside.any())
    if top_k < V:
        assert bool((out.distinct.sum(1) < V).all())  # a dust atom with mass: its phi matters


@pytest.mark.parametrize("kind", F_DIVERGENCES)
def test_f_divergence_surrogate_gradient_is_exact(kind):
    policy, ref, actions, _ = problem(2)
    regularizer = build_regularizer(kind, alpha=0.3) if kind == "alpha" else build_regularizer(kind)
    out = check_surrogate_gradient(regularizer, policy, ref, actions, rtol=1e-6, atol=1e-8)
    exact = regularizer.penalty(policy, ref, actions).stats[f"{kind}/exact"]
    assert float(out.value.mean()) == pytest.approx(exact, rel=1e-5)


def test_support_gradient_needs_an_implementation():
    from otalign.regularizers import Regularizer

    class Constant(Regularizer):
        def _penalize(self, positions):
            raise AssertionError

    policy, ref, actions, _ = problem()
    with pytest.raises(NotImplementedError, match="Constant has no support_gradient"):
        Constant().support_gradient(policy, ref, actions)
