"""PreferenceTrainer on tiny random models (about a second each): every loss learns, OTPO, reference modes,
resume, chat rows, LoRA, the ``otalign dpo`` command, and errors raised before training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from otalign.data.preference import load_preference_data
from otalign.models.tiny import save_tiny_model, tiny_causal_lm, tiny_tokenizer
from otalign.trainers import ConfigError, PreferenceConfig, PreferenceTrainer, parse_config, read_metrics

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FIXTURES = Path(__file__).parent / "fixtures"
PAIRS = str(FIXTURES / "preference_pairs.jsonl")
UNPAIRED = str(FIXTURES / "preference_unpaired.jsonl")
CHAT = str(FIXTURES / "preference_chat.jsonl")
EXPECTED = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "learning_rate",
    "grad_norm",
    "time/forward",
    "time/backward",
    "time/update",
    "time/step",
]
OTPO_METRICS = ["otpo/weight_mean", "otpo/weight_min", "otpo/weight_max", "otpo/shorter_share", "time/otpo"]


@pytest.fixture
def make_trainer(trainer_factory):
    """``make_trainer(output_dir, **overrides)``: 12 steps of 4 fixture pairs at learning rate 3e-3, on tiny models."""
    return trainer_factory(
        PreferenceTrainer,
        PreferenceConfig,
        dataset_name=PAIRS,
        max_steps=12,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
    )


@pytest.mark.parametrize(
    ("loss_type", "token_weighting", "data"),
    [
        ("sigmoid", "none", PAIRS),
        ("ipo", "none", PAIRS),
        ("hinge", "none", PAIRS),
        ("aot_paired", "none", PAIRS),
        ("aot_unpaired", "none", PAIRS),
        ("kto", "none", PAIRS),
        ("sigmoid", "otpo", PAIRS),
        ("aot_paired", "otpo", PAIRS),
        ("aot_unpaired", "none", UNPAIRED),
        ("kto", "none", UNPAIRED),
    ],
)
def test_training_raises_preference_accuracy(tmp_path, loss_type, token_weighting, data, make_trainer):
    trainer = make_trainer(
        tmp_path, loss_type=loss_type, token_weighting=token_weighting, dataset_name=data, eval_dataset_name=PAIRS
    )
    before = trainer.evaluate()
    assert before["eval_rewards/accuracies"] == 0.0  # policy == reference: every margin is zero
    history = trainer.train()
    after = trainer.evaluate()
    assert after["eval_rewards/accuracies"] >= 0.9, after
    assert after["eval_rewards/margins"] > 0.1 and after["eval_rewards/chosen"] > after["eval_rewards/rejected"]

    expected = EXPECTED + (["rewards/accuracies"] if data == PAIRS else []) + (["kto/z0"] if loss_type == "kto" else [])
    expected += OTPO_METRICS if token_weighting == "otpo" else []
    for key in expected:
        assert key in history[-1], key
    if data == PAIRS:
        assert history[-1]["rewards/accuracies"] > history[0]["rewards/accuracies"] == 0.0
    if token_weighting == "otpo":
        # each side's weights sum to min(|y_c|, |y_r|), so the shorter response gets exactly half the weight
        assert history[-1]["otpo/shorter_share"] == pytest.approx(0.5, abs=1e-4)
        assert 0 < history[-1]["otpo/weight_min"] < history[-1]["otpo/weight_mean"] < history[-1]["otpo/weight_max"]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [*range(1, 13), 12]  # one row per step, then the evaluation
    assert rows[-1]["eval_rewards/accuracies"] == after["eval_rewards/accuracies"]


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, assert_resume_matches, make_trainer):
    settings = dict(max_steps=4, save_steps=2, token_weighting="otpo", gradient_accumulation_steps=2)
    make_trainer(tmp_path / "full", save_total_limit=None, **settings).train()
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-2"
    # different initial policy weights: only the checkpoint can make the resumed run match
    resumed = make_trainer(tmp_path / "resumed", model_seed=5, resume_from_checkpoint=str(checkpoint), **settings)
    resumed.train()
    assert_resume_matches(tmp_path / "full", tmp_path / "resumed", [3, 4])


def test_precomputed_and_dataset_reference_log_probs_match_the_reference_model(tmp_path, make_trainer):
    def losses(trainer):
        return [h["loss"] for h in trainer.train()] + [trainer.evaluate()["eval_rewards/margins"]]

    baseline = losses(make_trainer(tmp_path / "model", max_steps=3))
    precomputed = make_trainer(tmp_path / "pre", max_steps=3, precompute_ref_log_probs=True)
    assert precomputed.ref_model is None  # freed after the one pass
    tokens = precomputed.ref_tokens
    assert losses(precomputed) == pytest.approx(baseline, rel=1e-5, abs=1e-6)

    rows = [
        dataclasses.replace(
            pair,
            ref_chosen_logps=float(tokens[("train", i, "chosen")].sum()),
            ref_rejected_logps=float(tokens[("train", i, "rejected")].sum()),
        )
        for i, pair in enumerate(load_preference_data(PAIRS))
    ]
    from_columns = make_trainer(tmp_path / "columns", max_steps=3, train_data=rows)
    assert from_columns.ref_model is None
    assert losses(from_columns) == pytest.approx(baseline, rel=1e-5, abs=1e-6)

    with pytest.raises(ValueError, match="OTPO needs per-token values"):
        make_trainer(tmp_path / "bad", train_data=rows, token_weighting="otpo")


def test_chat_rows_are_rendered_with_the_template(tmp_path, make_trainer):
    from test_preference_data import NOT_PREFIX_TEMPLATE

    tokenizer = tiny_tokenizer()  # its chat template is prefix-preserving
    trainer = make_trainer(tmp_path, tokenizer=tokenizer, dataset_name=CHAT, max_steps=1)
    prompt_ids, completion_ids = trainer.sequences[("train", 0, "chosen")]
    assert (
        tokenizer.decode(prompt_ids + completion_ids)
        == "write about the cat . answer : the cat is good and happy . <eos>"
    )
    (metrics,) = trainer.train()
    assert metrics["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2 at the start: policy == reference
    tokenizer.chat_template = NOT_PREFIX_TEMPLATE
    with pytest.raises(ValueError, match=r"preference_chat.jsonl, row 1: the chat template does not render"):
        make_trainer(tmp_path / "again", tokenizer=tokenizer, dataset_name=CHAT)


def test_lora_trains_only_the_adapters(tmp_path, make_trainer):
    pytest.importorskip("peft")
    trainer = make_trainer(tmp_path, use_peft=True, lora_r=4, lora_target_modules=["q_proj", "v_proj"], max_steps=2)
    names = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    before = [p.detach().clone() for p in trainer.params]
    history = trainer.train()
    assert history[-1]["rewards/margins"] != 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_otalign_dpo_command_runs_from_a_yaml_file(tmp_path):
    from otalign.cli import main

    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    config = tmp_path / "dpo.yaml"
    config.write_text(
        f"model_name_or_path: {tmp_path / 'tiny'}\ndataset_name: {PAIRS}\noutput_dir: {tmp_path / 'run'}\n"
        "loss_type: aot_paired\ntoken_weighting: otpo\nper_device_train_batch_size: 4\nprogress_bar: false\n"
    )
    assert main(["dpo", "--config", str(config), "--max_steps", "2", "--learning_rate", "1e-3"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_bad_input_fails_before_training(tmp_path, make_trainer):
    with pytest.raises(ValueError, match="loss_type 'sigmoid' needs paired prompt/chosen/rejected data"):
        make_trainer(tmp_path, dataset_name=UNPAIRED)
    with pytest.raises(ValueError, match=r"preference_pairs.jsonl, row 1, field 'chosen': \d+ tokens, more than"):
        make_trainer(tmp_path, max_length=8, truncation_mode="error")
    with pytest.raises(ValueError, match="too few for 4 micro-batches with both"):
        make_trainer(
            tmp_path,
            dataset_name=UNPAIRED,
            loss_type="kto",
            per_device_train_batch_size=1,
            gradient_accumulation_steps=4,
        )
    with pytest.raises(ConfigError, match="set dataset_name"):
        make_trainer(tmp_path, dataset_name=None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss_type", "orpo"], "unknown loss_type 'orpo'"),
        (["--token_weighting", "otpo", "--loss_type", "kto"], "token_weighting otpo needs a pairwise loss_type"),
        (["--beta", "0"], "beta must be > 0"),
    ],
)
def test_bad_config_values_raise_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(PreferenceConfig, None, argv)


def test_dataset_options_are_declared_once():
    """dpo, sft and reward take their dataset options from one declaration (DatasetConfig): same names, help,
    checks; only the defaults given again (truncation_mode) differ."""
    from otalign.trainers import RewardConfig, SFTConfig
    from otalign.trainers.dataset import DatasetConfig

    shared = {f.name: f for f in dataclasses.fields(DatasetConfig)}
    assert {"dataset_name", "eval_dataset_name", "max_length", "truncation_mode", "save_model"} <= set(shared)
    for config in (PreferenceConfig, SFTConfig, RewardConfig):
        fields = {f.name: f for f in dataclasses.fields(config)}
        for name, field in shared.items():
            assert fields[name].metadata == field.metadata, (config.__name__, name)
    assert [PreferenceConfig().truncation_mode, SFTConfig().truncation_mode] == ["keep_end", "keep_start"]


@pytest.mark.multiprocess
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, two_process_cli, make_trainer):
    """``otalign dpo`` under a 2-process CPU launch (gloo) logs the metrics of one process with twice the batch:
    the data order follows the global sample index and the AOT sort spans both processes."""
    save_tiny_model(tmp_path / "tiny")
    settings = dict(loss_type="aot_paired", token_weighting="otpo", max_steps=3, learning_rate=3e-3)
    make_trainer(tmp_path / "one", per_device_train_batch_size=4, **settings).train()
    argv = [f"--{k}={v}" for k, v in settings.items()]
    command = ["dpo", f"--model_name_or_path={tmp_path / 'tiny'}", f"--dataset_name={PAIRS}"]
    command += [
        f"--output_dir={tmp_path / 'two'}",
        "--per_device_train_batch_size=2",
        "--progress_bar=false",
        "--save_model=false",
        *argv,
    ]
    two_process_cli(command)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for row_one, row_two in zip(one, two, strict=True):
        for key in row_one:
            if not key.startswith("time/"):
                assert row_two[key] == pytest.approx(row_one[key], rel=1e-4, abs=1e-6), key
