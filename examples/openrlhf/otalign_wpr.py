"""OpenRLHF recipe (written against OpenRLHF 0.11.2; not run here): WPR's Wasserstein penalty as the actor-loss KL
term (``--algo.kl.use_loss``), the reference actor returning top-k fields.

OpenRLHF has no loss registry and no hook on the reference pass, so the plug-in is two method bodies in a copy of
``openrlhf/cli/train_ppo_ray.py`` (or a fork): the reference actor's ``forward`` returns
:func:`reference_forward` (its top-k fields packed in the tensor OpenRLHF carries as ``base_action_log_probs``), and
the policy actor's ``training_step`` computes its KL term with :func:`kl_term` instead of ``compute_approx_kl``.
"""

from __future__ import annotations

import torch

from otalign.integrations.openrlhf import (
    REF_ACTION_LOGPROBS,
    action_logits,
    pack_reference,
    reference_topk,
    topk_surrogate_loss_term,
    unpack_reference,
)
from otalign.integrations.topk import gathered_log_probs

TOP_K = 32


@torch.no_grad()
def reference_forward(model, sequences, action_mask, attention_mask, top_k: int = TOP_K) -> torch.Tensor:
    """Body of ``ReferenceModelActor.forward``: the (B, A, 1 + 2k) packed fields (:func:`pack_reference`), on CPU.

    ``model`` is the reference ``Actor`` (its ``temperature`` is the rollout's; with ``action_mask=None`` and
    ``return_output=True`` it returns the model output, whose logits it has already divided by the temperature).
    """
    device = torch.cuda.current_device()
    sequences, action_mask = sequences.to(device), action_mask.to(device)
    output = model(sequences, attention_mask=attention_mask.to(device), return_output=True)
    return pack_reference(reference_topk(output["logits"], sequences, action_mask, top_k)).to("cpu")


def kl_term(regularizer, output, experience) -> tuple[torch.Tensor, torch.Tensor]:
    """In ``PolicyModelActor.training_step``, in place of ``kl = compute_approx_kl(...)`` and the ``logprobs_diff``
    line: ``(kl, logprobs_diff)``, both (B, A). ``output`` is the actor's training forward (``return_output=True``:
    tempered logits, differentiable); ``kl`` is the Wasserstein surrogate (value: the distance, gradient: the
    distance's), which OpenRLHF then aggregates and scales by ``kl_ctl`` as it does its KL term."""
    reference = unpack_reference(experience.base_action_log_probs.to(output["logits"].device))
    kl = topk_surrogate_loss_term(
        regularizer, output["logits"], experience.sequences, experience.action_mask, reference, temperature=1.0
    )
    with torch.no_grad():  # OpenRLHF's logprobs_diff metric: log pi(y) - log pi_ref(y), no V-sized copy
        logits, actions = action_logits(output["logits"], experience.sequences, experience.action_mask)
        flat = gathered_log_probs(logits.reshape(-1, logits.shape[-1]), actions.reshape(-1, 1))
    return kl, flat.view(actions.shape) - reference[REF_ACTION_LOGPROBS]
