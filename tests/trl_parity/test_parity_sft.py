"""otalign's SFTTrainer against TRL 1.16's SFTTrainer on the same prompt/completion rows in the same micro-batches:
the loss of each step (a token mean over the whole step, accumulation included), the gradients and learning rates
of every optimizer step and the weights at the end equal to 1e-5 relative (each side tokenizes the raw rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from cases import SFT_CASES  # noqa: E402
from parity import (  # noqa: E402
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

SFT_PAIRS = Path(__file__).parents[1] / "fixtures" / "sft_pairs.jsonl"
RAW = [json.loads(line) for line in SFT_PAIRS.read_text(encoding="utf-8").splitlines()]
SPACED = [{**row, "completion": " " + row["completion"]} for row in RAW]
"""The rows with a space before each completion: TRL tokenizes prompt + completion as one text, otalign each
apart, which gives the same tokens when a word boundary separates them."""
STEPS = 2


def run_otalign(folder, settings: dict, rows: list[dict]):
    """otalign's run, its per-step losses and the rows of each micro-batch, in order."""
    from otalign.data.sft import parse_sft_rows
    from otalign.trainers import SFTConfig, SFTTrainer

    tokenizer, policy, _, _ = tiny_models(folder)
    config = SFTConfig(
        output_dir=str(folder / "otalign"),
        max_steps=STEPS,
        learning_rate=3e-3,
        adam_epsilon=1e-3,  # see critic_free.Settings
        progress_bar=False,
        save_model=False,
        **settings,
    )
    trainer = SFTTrainer(
        config,
        model=model_from(tokenizer, policy),
        tokenizer=tokenizer,
        train_data=parse_sft_rows(rows, "rows"),
    )
    recorder, micro_batches = Recorder(), []
    record_otalign(trainer, recorder)
    position = {id(row): i for i, row in enumerate(trainer.train_rows)}
    split = trainer.micro_batches

    def recording(step, items):
        parts = split(step, items)
        micro_batches.extend([position[id(row)] for row in part] for part in parts)
        return parts

    trainer.micro_batches = recording
    recorder.metrics = trainer.train()
    recorder.losses = [row["loss"] for row in recorder.metrics]
    model = trainer.accelerator.unwrap_model(trainer.policy)
    return recorder, {n: p.detach().clone() for n, p in model.named_parameters()}, micro_batches


def run_trl(folder, settings: dict, rows: list[dict], micro_batches):
    """TRL's run on the rows in otalign's order (a sequential sampler over them); its per-step losses."""
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer, _, _, path = tiny_models(folder)
    config = SFTConfig(
        output_dir=str(folder / "trl"),
        max_steps=STEPS,
        learning_rate=3e-3,
        adam_epsilon=1e-3,
        report_to=[],
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        **settings,
    )
    ordered = [rows[i] for micro in micro_batches for i in micro]
    trainer = SFTTrainer(
        AutoModelForCausalLM.from_pretrained(path),
        args=config,
        train_dataset=datasets.Dataset.from_list(ordered),
        processing_class=tokenizer,
    )
    trainer._get_train_sampler = lambda dataset=None: SequentialSampler(dataset or trainer.train_dataset)
    recorder = Recorder()
    record_trl(trainer, recorder)
    trainer.train()
    recorder.metrics = trl_metrics(trainer)
    accumulation = settings["gradient_accumulation_steps"]
    micro = recorder.losses  # each micro-batch's summed loss over the step's token count
    recorder.losses = [sum(micro[k : k + accumulation]) for k in range(0, len(micro), accumulation)]
    return recorder, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("case", params(SFT_CASES))
def test_sft_equals_trl(tmp_path, case):
    settings = dict(case.settings)
    rows = RAW if settings.pop("rows", "spaced") == "raw" else SPACED
    metrics = settings.pop("metrics", ())
    ours, weights, micro_batches = run_otalign(tmp_path / "ours", settings, rows)
    theirs, trl_weights = run_trl(tmp_path / "theirs", settings, rows, micro_batches)
    assert_close(ours.losses, theirs.losses, "step losses")
    assert_same_metrics(ours, theirs, metrics)  # with one micro-batch per step (TRL averages micro-batches)
    assert_same_steps(ours, theirs)
    for name, value in trl_weights.items():
        assert_close(weights[name], value, f"final weights {name}")
