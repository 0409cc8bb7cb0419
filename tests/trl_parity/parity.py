"""Running TRL 1.16 and otalign side by side on the same completions: the shared machinery of the parity suite.

A parity case trains otalign's trainer first, recording per rollout its completions, advantages and the rows of each
micro-batch, per micro-batch its loss, and per optimizer step the clipped gradients and the learning rate. TRL's own
trainer then runs ``Trainer.train()`` from the same weights with those completions injected in place of its sampler
(:func:`inject_completions`) and the rows in the same micro-batches (:func:`follow_row_order`), recording the same
quantities (:class:`Recorder`). What a case proves equal it declares as the TRL fields and behaviours it covers
(:class:`Case.proves`), which ``test_trl_differences.py`` checks against the README's differences table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer

RTOL = 1e-5
"""Relative tolerance of every comparison (advantages, losses, gradients, learning rates)."""
ATOL = 1e-7
"""Absolute floor for entries that are 0 in exact arithmetic (float32 rounding)."""
LOSS_ATOL = 1e-6
"""Absolute floor for losses: at ratio 1 a policy loss is a sum of O(1) advantages that cancel exactly."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity case.

    Attributes:
        id: the pytest id.
        settings: fields set on both sides (each side maps them to its own config, see the test module).
        proves: the TRL fields/behaviours this case shows equal (``Config.field`` or ``Config.field=value``).
        differs: when TRL and otalign are known to differ here: the measured difference (the case is an
            ``xfail(strict=True)``, and the README's differences table must list its ``proves`` keys with a reason).
    """

    id: str
    settings: dict
    proves: tuple[str, ...]
    differs: str | None = None


def params(cases: list[Case]) -> list:
    """``cases`` as pytest parameters (id: the case's), a case that ``differs`` an ``xfail(strict=True)`` naming
    the measured difference."""
    import pytest

    return [
        pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.differs)] if c.differs else [])
        for c in cases
    ]


def tiny_models(folder: Path, *, policy_seed: int = 0, ref_seed: int = 1, shift: float = 0.1):
    """``(tokenizer, policy_state, ref_state, policy_path)``: a tiny random Llama moved ``shift`` away from its
    initialisation (so the policy is not its reference), saved to ``folder/policy`` for TRL, which builds its
    reference model from the policy's path; states to load into both sides' models."""
    tokenizer = tiny_tokenizer()
    policy = tiny_causal_lm(tokenizer, seed=policy_seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for p in policy.parameters():
            p.add_(shift * torch.randn(p.shape, generator=generator))
    path = folder / "policy"
    policy.save_pretrained(path)
    tokenizer.save_pretrained(path)
    ref = tiny_causal_lm(tokenizer, seed=ref_seed)
    return tokenizer, policy.state_dict(), ref.state_dict(), path


def model_from(tokenizer, state: dict):
    """A tiny Llama holding ``state``."""
    model = tiny_causal_lm(tokenizer)
    model.load_state_dict(state)
    return model


class Recorder:
    """Per optimizer step the clipped gradients (by parameter name) and learning rate; per micro-batch the loss; the
    logged metric rows (otalign's per step, TRL's per optimizer step: ``logging_steps`` 1)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.learning_rates: list[float] = []
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def optimizer_step(self, model, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        self.learning_rates.append(float(optimizer.param_groups[0]["lr"]))


def record_otalign(trainer, recorder: Recorder) -> None:
    """Record ``trainer``'s (an otalign trainer) optimizer steps through its optimizer's ``step``."""
    optimizer, step = trainer.optimizer, trainer.optimizer.step
    model = trainer.accelerator.unwrap_model(trainer.policy)

    def recording_step(*args, **kwargs):
        recorder.optimizer_step(model, optimizer)
        return step(*args, **kwargs)

    optimizer.step = recording_step


def record_trl(trainer, recorder: Recorder) -> None:
    """Record a TRL trainer's optimizer steps (after clipping, before the step: transformers'
    ``on_pre_optimizer_step``) and the loss each micro-batch's ``compute_loss`` returns."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            recorder.optimizer_step(trainer.model, trainer.optimizer)

    trainer.add_callback(Callback())
    compute_loss = trainer.compute_loss

    def recording_loss(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        recorder.losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording_loss


def inject_completions(trainer, rollouts: list[tuple[list[list[int]], list[list[int]]]], *, logprobs: bool) -> None:
    """Replace a TRL trainer's sampler (``_generate_single_turn``) by the given completions: rollout ``k`` is
    ``(prompt_ids, completion_ids)``, one entry per row; TRL's own tokenization of its prompts must give
    ``prompt_ids``. ``logprobs``: the GRPO signature (which also returns sampling log-probs, here none)."""
    queue = list(rollouts)

    def generate(prompt_ids, *args, **kwargs):
        expected, completions = queue.pop(0)
        assert [list(p) for p in prompt_ids] == expected, "TRL tokenized the prompts differently"
        return (completions, None) if logprobs else completions

    trainer._generate_single_turn = generate


def take_rows(batch: dict, rows: list[int]) -> dict:
    """The rows ``rows`` of a TRL generation batch (tensors and lists with one entry per row; scalars kept)."""
    size = len(batch["completion_ids"])

    def take(value):
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == size:
            return value[rows]
        if isinstance(value, list) and len(value) == size:
            return [value[i] for i in rows]
        return value

    return {key: take(value) for key, value in batch.items()}


def follow_row_order(trainer, micro_batches: list[list[int]]) -> None:
    """TRL's ``_prepare_inputs`` with otalign's row order: a generation batch is generated and scored by TRL
    (``_generate_and_score_completions``) every ``steps_per_generation x num_iterations`` micro-steps, as TRL does,
    and micro-step ``k`` takes the rows of otalign's ``k``-th micro-batch instead of TRL's random split (TRL shuffles
    a generation batch once; otalign reshuffles it every pass)."""
    queue = list(micro_batches)
    every = trainer.args.steps_per_generation * trainer.num_iterations
    state = {}

    def prepare(generation_batch):
        if trainer._step % every == 0:
            state["batch"] = trainer._generate_and_score_completions(generation_batch)
        return take_rows(state["batch"], queue.pop(0))

    trainer._prepare_inputs = prepare


def assert_close(got, want, what: str, *, atol: float = ATOL) -> None:
    """``got`` equals ``want`` to :data:`RTOL` relative to the largest entry of ``want``: each entry within
    ``RTOL x max|want|`` (at least ``atol``) of its own. Entry by entry, a gradient's small entries are sums of terms
    that cancel, whose float32 rounding is relative to the terms, not to the sum."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    floor = max(atol, RTOL * float(want.abs().max())) if want.numel() else atol
    torch.testing.assert_close(got, want, rtol=RTOL, atol=floor, msg=lambda m: f"{what}: {m}")


def trl_metrics(trainer) -> list[dict[str, float]]:
    """The rows a TRL trainer logged for its optimizer steps (not the end-of-training summary)."""
    return [row for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]


def assert_same_metrics(ours: Recorder, theirs: Recorder, keys: tuple[str, ...]) -> None:
    """The metrics ``keys`` equal in every logged row (none: nothing to check)."""
    if not keys:
        return
    assert len(ours.metrics) == len(theirs.metrics) > 0
    for row, (mine, trl) in enumerate(zip(ours.metrics, theirs.metrics, strict=True)):
        for key in keys:
            assert_close(mine[key], trl[key], f"logged row {row}: {key}")


def assert_same_steps(ours: Recorder, theirs: Recorder) -> None:
    """Equal learning rates and gradients at every optimizer step."""
    assert len(ours.grads) == len(theirs.grads) > 0
    assert_close(ours.learning_rates, theirs.learning_rates, "learning rates")
    for k, (mine, trl) in enumerate(zip(ours.grads, theirs.grads, strict=True)):
        assert mine.keys() == trl.keys()
        for name in trl:
            assert_close(mine[name], trl[name], f"optimizer step {k}, gradient of {name}")


def max_relative_difference(ours: Recorder, theirs: Recorder) -> float:
    """The largest relative gradient difference over all steps and parameters (for reporting a known difference)."""
    worst = 0.0
    for mine, trl in zip(ours.grads, theirs.grads, strict=True):
        for name in trl:
            scale = float(trl[name].abs().max())
            worst = max(worst, float((mine[name] - trl[name]).abs().max()) / max(scale, 1e-12))
    return worst
