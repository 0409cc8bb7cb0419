"""otalign's PreferenceTrainer against TRL 1.16's DPOTrainer on the same pairs in the same micro-batches: for every
loss type both offer, with ``label_smoothing`` where the loss reads it, with and without gradient accumulation,
the micro-batch losses, the gradients and learning rates of every optimizer step and the weights at the end equal
to 1e-5 relative (tokenization included: both sides tokenize the raw rows themselves)."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cases import DPO_CASES  # noqa: E402
from parity import (  # noqa: E402
    LOSS_ATOL,
    Recorder,
    assert_close,
    assert_same_metrics,
    assert_same_steps,
    model_from,
    params,
    record_otalign,
    record_trl,
    tiny_models,
    trl_metrics,
)

ROWS = [
    {"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran"},
    {"prompt": "a dog is", "chosen": " here", "rejected": " was not there at all"},
    {"prompt": "the big", "chosen": " red book", "rejected": " sun"},
    {"prompt": "we are", "chosen": " happy friends", "rejected": " sad"},
    {"prompt": "i think", "chosen": " it is fine", "rejected": " you hate it"},
    {"prompt": "the rain", "chosen": " was nice", "rejected": " is awful and bad"},
    {"prompt": "my friend", "chosen": " is great", "rejected": " was poor"},
    {"prompt": "this day", "chosen": " is wonderful", "rejected": " is terrible"},
]
STEPS = 2
DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "learning_rate",
    "grad_norm",
)
"""TRL's DPO metric keys compared in each logged row (one micro-batch per step)."""
BATCH = 4
"""Pairs per optimizer step: the two steps see different pairs."""


def run_otalign(folder, settings: dict):
    """otalign's run and the rows of each micro-batch, in order."""
    from otalign.data.preference import parse_pair
    from otalign.trainers import PreferenceConfig, PreferenceTrainer

    tokenizer, policy, ref, _ = tiny_models(folder)
    accumulation = settings["gradient_accumulation_steps"]
    config = PreferenceConfig(
        output_dir=str(folder / "otalign"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH // accumulation,
        learning_rate=3e-3,
        adam_epsilon=1e-3,  # see critic_free.Settings
        beta=0.1,
        progress_bar=False,
        save_model=False,
        **settings,
    )
    trainer = PreferenceTrainer(
        config,
        policy=model_from(tokenizer, policy),
        ref_model=model_from(tokenizer, ref),
        tokenizer=tokenizer,
        train_data=[parse_pair(row, f"row {i}") for i, row in enumerate(ROWS)],
    )
    recorder, micro_batches = Recorder(), []
    record_otalign(trainer, recorder)
    micro_step = trainer.micro_step

    def recording(keys, labels, pairs, timer):
        out = micro_step(keys, labels, pairs, timer)
        micro_batches.append([index for _, index, _ in keys[:pairs]])
        recorder.losses.append(float(out[0].detach()))
        return out

    trainer.micro_step = recording
    recorder.metrics = trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.policy).named_parameters()}
    return recorder, weights, micro_batches


def run_trl(folder, settings: dict, micro_batches):
    """TRL's run on the rows in otalign's order (a sequential sampler over them)."""
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer, _, ref, path = tiny_models(folder)
    accumulation = settings["gradient_accumulation_steps"]
    config = DPOConfig(
        output_dir=str(folder / "trl"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH // accumulation,
        learning_rate=3e-3,
        adam_epsilon=1e-3,
        beta=0.1,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        **settings,
    )
    ordered = [ROWS[i] for rows in micro_batches for i in rows]
    trainer = DPOTrainer(
        AutoModelForCausalLM.from_pretrained(path),
        model_from(tokenizer, ref),
        args=config,
        train_dataset=datasets.Dataset.from_list(ordered),
        processing_class=tokenizer,
    )
    trainer._get_train_sampler = lambda dataset=None: SequentialSampler(dataset or trainer.train_dataset)
    recorder = Recorder()
    record_trl(trainer, recorder)
    trainer.train()
    recorder.metrics = trl_metrics(trainer)
    return recorder, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("case", params(DPO_CASES))
def test_dpo_equals_trl(tmp_path, case):
    ours, weights, micro_batches = run_otalign(tmp_path / "ours", case.settings)
    theirs, trl_weights = run_trl(tmp_path / "theirs", case.settings, micro_batches)
    assert_close(ours.losses, theirs.losses, "micro-batch losses", atol=LOSS_ATOL)
    assert_same_steps(ours, theirs)
    if case.settings["gradient_accumulation_steps"] == 1:  # with several micro-batches TRL averages their metrics
        assert_same_metrics(ours, theirs, DPO_METRICS)
    for name, value in trl_weights.items():
        assert_close(weights[name], value, f"final weights {name}")


def test_the_comparison_sees_label_smoothing(tmp_path):
    """The harness can fail: otalign's ``robust`` loss with label smoothing 0.1 against TRL's with none is caught."""
    settings = dict(loss_type="robust", label_smoothing=0.1, gradient_accumulation_steps=1)
    ours, _, micro_batches = run_otalign(tmp_path / "ours", settings)
    theirs, _ = run_trl(tmp_path / "theirs", {**settings, "label_smoothing": 0.0}, micro_batches)
    with pytest.raises(AssertionError, match="losses"):
        assert_close(ours.losses, theirs.losses, "micro-batch losses", atol=LOSS_ATOL)


def test_every_loss_type_both_offer_has_a_case():
    """The DPO cases cover every loss TRL 1.16's ``DPOTrainer`` and otalign both offer (read from TRL's source)."""
    import inspect
    import re

    from trl import DPOTrainer

    from otalign.losses import PREFERENCE_LOSSES

    trl = set(re.findall(r'loss_type == "(\w+)"', inspect.getsource(DPOTrainer._compute_loss)))
    ours = set(PREFERENCE_LOSSES.names()) - set(PREFERENCE_LOSSES.aliases)
    assert (
        {case.settings["loss_type"] for case in DPO_CASES}
        == trl & ours
        == {
            "sigmoid",
            "ipo",
            "hinge",
            "robust",
            "aot",
            "aot_unpaired",
        }
    )
