"""verl plug-in: the ``wasserstein_topk`` distillation loss (WPR's Wasserstein penalty against a top-k teacher).

verl imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` whenever ``verl`` is imported, in the driver and
in every Ray worker; this one then

1. registers ``wasserstein_topk`` with verl's distillation-loss registry (``register_distillation_loss``, top-k
   inputs), so that ``distillation.distillation_loss.loss_mode=wasserstein_topk`` is accepted and verl asks its
   teacher server for top-k log-probabilities;
2. routes that loss mode in verl's FSDP/VeOmni top-k logits processor (``fsdp.losses.compute_forward_kl_topk``,
   the function verl's ``compute_topk_loss`` calls for every top-k loss) to
   :func:`otalign.integrations.verl.wasserstein_topk_outputs`; every other loss mode goes to verl's own function.

The Wasserstein costs are distances between the token embeddings of ``OTALIGN_WPR_EMBEDDINGS`` (a model path,
default: the teacher's, i.e. the reference's); ``OTALIGN_WPR_LAMBDA`` (default 100) is the entropic strength.
See README.md in this folder for the command line.
"""

from __future__ import annotations

import functools
import os

import verl.trainer.distillation.fsdp.losses as fsdp_losses
from verl.trainer.distillation.losses import (
    DistillationLossSettings,
    compute_forward_kl_topk,
    register_distillation_loss,
)
from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor
from verl.workers.utils.padding import no_padding_2_padding

from otalign.integrations.verl import wasserstein_topk_outputs
from otalign.regularizers import build_regularizer, load_embedding_matrix

LOSS_MODE = "wasserstein_topk"


@functools.cache
def regularizer(vocab: int, top_k: int):
    """The Wasserstein regularizer over the embeddings of ``OTALIGN_WPR_EMBEDDINGS`` (built once per worker)."""
    embeddings = load_embedding_matrix(os.environ["OTALIGN_WPR_EMBEDDINGS"], vocab_size=vocab).float()
    return build_regularizer(
        "wasserstein", embeddings=embeddings, top_k=top_k, lam=float(os.environ.get("OTALIGN_WPR_LAMBDA", 100.0))
    )


_verl_topk = fsdp_losses.compute_forward_kl_topk


def topk_logits_processor(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format):
    """verl's top-k logits-processor call: otalign's outputs for ``wasserstein_topk``, verl's own otherwise."""
    if config.distillation_loss.loss_mode != LOSS_MODE:
        return _verl_topk(student_logits, teacher_topk_log_probs, teacher_topk_ids, config, data_format)
    # the teacher's nested (per-sequence) top-k, in the student's packed layout, split as verl splits it
    teacher_topk_log_probs = teacher_topk_log_probs.values().unsqueeze(0)
    teacher_topk_ids = teacher_topk_ids.values().unsqueeze(0)
    if get_ulysses_sequence_parallel_world_size() > 1:
        teacher_topk_log_probs = slice_input_tensor(teacher_topk_log_probs, dim=1)
        teacher_topk_ids = slice_input_tensor(teacher_topk_ids, dim=1)
    reg = regularizer(student_logits.shape[-1], teacher_topk_ids.shape[-1])
    scored = (teacher_topk_log_probs < 0).any(-1)  # the teacher server pads rows with log-probabilities 0
    out = wasserstein_topk_outputs(
        reg, student_logits, teacher_topk_log_probs, teacher_topk_ids.long(), scored, check=False
    )
    out.pop("wasserstein_distance")  # verl reads its own keys only
    return out


fsdp_losses.compute_forward_kl_topk = topk_logits_processor


@register_distillation_loss(DistillationLossSettings(names=[LOSS_MODE], use_topk=True))
def compute_wasserstein_topk(config, distillation_config, model_output, data):
    """The registered loss: the per-token surrogates of the logits processor, (bsz, resp_len), unclamped, with
    verl's top-k mass metrics (its ``forward_kl_topk`` reads the same keys)."""
    _, metrics = compute_forward_kl_topk(config, distillation_config, model_output, data)
    return no_padding_2_padding(model_output["distillation_losses"], data), metrics
