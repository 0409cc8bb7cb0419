r"""The top-k contract: what a per-token penalty needs at each position, in ``O(k)`` numbers, never ``O(V)``.

At a generated position with policy :math:`\pi_\theta`, reference :math:`\pi_{ref}` and sampled token :math:`y`,
:class:`TopKLogProbs` holds the policy's top-k ids and log-probabilities, the reference's top-k ids and
log-probabilities, each side's log-probabilities at the other side's top-k ids, and both sides' at :math:`y`.
Every log-probability is normalised (a log-softmax over the whole vocabulary), so the mass of the tokens it does
not list, the Wasserstein penalty's *dust*, is :math:`1 - \sum` of what the listed distinct ids hold, on each side.

That is all the Wasserstein penalty and its support gradient use
(:meth:`~otalign.regularizers.WassersteinRegularizer.evaluate_topk`, the same support and the same answer as the
full-logits call, which builds this record from one log-softmax per chunk), and the f-divergences' sampled-token
penalties use only the two log-probabilities at :math:`y` (:meth:`TopKLogProbs.sampled_log_ratio`). The *exact*
f-divergences (``kl/exact`` and the like) sum over the whole vocabulary: a top-k record cannot give them, and a
KL in a loss keeps the k3 estimator, which needs only the sampled token.

A framework that never builds ``(B, T, V)`` logits (a chunked or fused LM head, a top-k "teacher" served by an
inference engine) fills the record from its own top-k and gathered log-probabilities:
``logits.gather(-1, ids) - logsumexp(logits)``, with the log-sum-exp over the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .common import LOG_PROB_FLOOR, describe

MASS_ATOL = 1e-4
"""Slack of :meth:`TopKLogProbs.check` on probabilities: the listed mass of a side may exceed 1 by this much, and
two entries of one token may differ by this much (rounding of log-probabilities computed by different kernels)."""


@dataclass(frozen=True)
class TopKLogProbs:
    r"""Per-position top-k log-probabilities of the policy and the reference, over ``N`` positions.

    All log-probabilities are normalised over the whole vocabulary (``-inf`` allowed), in nats, any float dtype
    (the penalties compute in float32 or better). A side's top-k ids must be distinct; the two sides' lists and
    the sampled token may share ids (the penalty counts each token once).

    Attributes:
        actions: (N,) int64 sampled token ids :math:`y`.
        policy_ids: (N, k_p) the policy's top-k token ids.
        policy_logprobs: (N, k_p) :math:`\log\pi_\theta` at ``policy_ids``.
        ref_ids: (N, k_r) the reference's top-k token ids.
        ref_logprobs: (N, k_r) :math:`\log\pi_{ref}` at ``ref_ids``.
        policy_at_ref_ids: (N, k_r) :math:`\log\pi_\theta` at ``ref_ids``.
        ref_at_policy_ids: (N, k_p) :math:`\log\pi_{ref}` at ``policy_ids``.
        policy_at_actions: (N,) :math:`\log\pi_\theta(y)`.
        ref_at_actions: (N,) :math:`\log\pi_{ref}(y)`.

    Raises:
        ValueError: (at construction) on wrong types, shapes or devices, naming the field; :meth:`check` validates
            the values.
    """

    actions: torch.Tensor
    policy_ids: torch.Tensor
    policy_logprobs: torch.Tensor
    ref_ids: torch.Tensor
    ref_logprobs: torch.Tensor
    policy_at_ref_ids: torch.Tensor
    ref_at_policy_ids: torch.Tensor
    policy_at_actions: torch.Tensor
    ref_at_actions: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("actions", "policy_ids", "ref_ids"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
                raise ValueError(f"TopKLogProbs.{name} must be an int64 tensor of token ids, got {describe(value)}")
        if self.actions.dim() != 1:
            raise ValueError(f"TopKLogProbs.actions must be (N,), got shape {tuple(self.actions.shape)}")
        n = self.actions.shape[0]
        for name in ("policy_ids", "ref_ids"):
            if getattr(self, name).dim() != 2 or getattr(self, name).shape[0] != n:
                raise ValueError(
                    f"TopKLogProbs.{name} must be (N, k) with N = {n} positions, got {tuple(getattr(self, name).shape)}"
                )
        k_p, k_r = self.policy_ids.shape[1], self.ref_ids.shape[1]
        expected = {
            "policy_logprobs": (n, k_p),
            "ref_at_policy_ids": (n, k_p),
            "ref_logprobs": (n, k_r),
            "policy_at_ref_ids": (n, k_r),
            "policy_at_actions": (n,),
            "ref_at_actions": (n,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(
                    f"TopKLogProbs.{name} must be a floating-point tensor of log-probabilities, got {describe(value)}"
                )
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"TopKLogProbs.{name} must have shape {shape} (like its ids), got {tuple(value.shape)}"
                )
        if k_p == 0 or k_r == 0:
            raise ValueError(f"TopKLogProbs needs k >= 1 ids per side, got {k_p} policy and {k_r} reference ids")
        devices = {getattr(self, f.name).device for f in fields(self)}
        if len(devices) > 1:
            raise ValueError(f"TopKLogProbs fields must be on one device, got {sorted(map(str, devices))}")

    @classmethod
    def from_log_probs(
        cls, policy_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, actions: torch.Tensor, top_k: int
    ) -> TopKLogProbs:
        """The record of ``N`` positions from their full log-probabilities.

        Args:
            policy_logprobs: (N, V) normalised log-probabilities of the policy (a log-softmax).
            ref_logprobs: (N, V) normalised log-probabilities of the reference.
            actions: (N,) integer sampled token ids in [0, V).
            top_k: k, 1 <= k <= V, ids kept from each side.

        Returns:
            The record with ``k_p = k_r = top_k`` (top-k in no particular order; ties broken by ``torch.topk``).
        """
        if policy_logprobs.dim() != 2 or policy_logprobs.shape != ref_logprobs.shape:
            raise ValueError(
                "policy_logprobs and ref_logprobs must be (N, V) tensors of one shape, got "
                f"{describe(policy_logprobs)} and {describe(ref_logprobs)}"
            )
        vocab = policy_logprobs.shape[1]
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must be an integer in [1, V] = [1, {vocab}], got {top_k!r}")
        actions = actions.long()
        policy_ids = policy_logprobs.topk(top_k, dim=-1, sorted=False).indices
        ref_ids = ref_logprobs.topk(top_k, dim=-1, sorted=False).indices
        sampled = actions[:, None]
        return cls(
            actions=actions,
            policy_ids=policy_ids,
            policy_logprobs=policy_logprobs.gather(1, policy_ids),
            ref_ids=ref_ids,
            ref_logprobs=ref_logprobs.gather(1, ref_ids),
            policy_at_ref_ids=policy_logprobs.gather(1, ref_ids),
            ref_at_policy_ids=ref_logprobs.gather(1, policy_ids),
            policy_at_actions=policy_logprobs.gather(1, sampled)[:, 0],
            ref_at_actions=ref_logprobs.gather(1, sampled)[:, 0],
        )

    @property
    def count(self) -> int:
        """N, the number of positions."""
        return self.actions.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the penalties compute in: the log-probabilities' promoted to at least float32."""
        return torch.promote_types(self.policy_logprobs.dtype, torch.float32)

    def slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The listed tokens in slot order ``[y | policy top-k | reference top-k]`` with both sides' log-probabilities
        there: three (N, 1 + k_p + k_r) tensors (ids int64; log-probabilities in :attr:`dtype`). A token listed
        twice appears in two slots."""
        dtype = self.dtype
        tokens = torch.cat([self.actions[:, None], self.policy_ids, self.ref_ids], dim=1)
        policy = torch.cat([self.policy_at_actions[:, None], self.policy_logprobs, self.policy_at_ref_ids], dim=1)
        ref = torch.cat([self.ref_at_actions[:, None], self.ref_at_policy_ids, self.ref_logprobs], dim=1)
        return tokens, policy.to(dtype), ref.to(dtype)

    def sampled_log_ratio(self) -> torch.Tensor:
        r"""(N,) :math:`\log\pi_\theta(y) - \log\pi_{ref}(y)`, both floored at
        :data:`~otalign.regularizers.base.LOG_PROB_FLOOR`: all an f-divergence's sampled-token penalty
        :math:`f(x)/x` needs (:func:`~otalign.regularizers.f_over_x`)."""
        dtype = self.dtype
        return self.policy_at_actions.to(dtype).clamp_min(LOG_PROB_FLOOR) - self.ref_at_actions.to(dtype).clamp_min(
            LOG_PROB_FLOOR
        )

    def __getitem__(self, rows: slice) -> TopKLogProbs:
        """The record of positions ``rows``."""
        return TopKLogProbs(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def cat(parts: list[TopKLogProbs]) -> TopKLogProbs:
        """Records of the same widths concatenated along the positions."""
        return TopKLogProbs(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TopKLogProbs)})

    def check(self, vocab: int | None = None) -> None:
        """Validate the values (costs host synchronisations: call it on input from outside, not in a hot loop).

        Args:
            vocab: if given, every id must lie in [0, vocab).

        Raises:
            ValueError: naming the field and the first offending position, on ids out of range, a side listing an
                id twice, NaN or positive (unnormalised, beyond rounding) log-probabilities, a listed mass above 1,
                or one token given two different log-probabilities on one side.
        """
        for name in ("actions", "policy_ids", "ref_ids"):
            ids = getattr(self, name)
            bad = (ids < 0) | (ids >= vocab) if vocab is not None else ids < 0
            if bool(bad.any()):
                row = _first_row(bad.reshape(self.count, -1))
                raise ValueError(
                    f"TopKLogProbs.{name} holds ids outside [0, {vocab if vocab is not None else 'V'}) at position "
                    f"{row}: {ids[row].tolist()}"
                )
        for name in ("policy_ids", "ref_ids"):
            ordered = getattr(self, name).sort(dim=1).values
            repeat = ordered[:, 1:] == ordered[:, :-1]
            if bool(repeat.any()):
                row = _first_row(repeat)
                raise ValueError(
                    f"TopKLogProbs.{name} lists an id twice at position {row}: a side's top-k must be distinct"
                )
        for f in fields(self):
            value = getattr(self, f.name)
            if not value.is_floating_point():
                continue
            bad = value.isnan() | (value > MASS_ATOL)
            if bool(bad.any()):
                row = _first_row(bad.reshape(self.count, -1))
                raise ValueError(
                    f"TopKLogProbs.{f.name} must hold normalised log-probabilities (<= 0, not NaN); position {row} "
                    f"has {value[row].tolist()}"
                )
        tokens, policy, ref = self.slots()
        ordered, order = tokens.sort(dim=1, stable=True)
        repeat = torch.zeros_like(ordered, dtype=torch.bool)
        repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        for side, logprobs in (("policy", policy), ("reference", ref)):
            mass = logprobs.exp().gather(1, order)
            clash = repeat.clone()
            clash[:, 1:] &= (mass[:, 1:] - mass[:, :-1]).abs() > MASS_ATOL
            if bool(clash.any()):
                row = _first_row(clash)
                raise ValueError(
                    f"TopKLogProbs gives one token two different {side} log-probabilities at position {row} (its "
                    "top-k, other-side and sampled-token entries must agree)"
                )
            listed = torch.where(repeat, 0.0, mass).sum(1)
            over = listed > 1.0 + MASS_ATOL
            if bool(over.any()):
                row = _first_row(over[:, None])
                raise ValueError(
                    f"TopKLogProbs: the {side}'s listed tokens hold mass {float(listed[row]):.6g} > 1 at position "
                    f"{row}: the log-probabilities are not normalised over the vocabulary"
                )


def _first_row(bad: torch.Tensor) -> int:
    """Index of the first row of the (N, m) bool ``bad`` with a True entry."""
    return int(bad.any(1).nonzero()[0, 0])
