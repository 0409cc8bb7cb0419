"""SFTTrainer on tiny random models: response-only labels (plain and chat rows), the loss falls, packing,
resume, LoRA, the ``otalign sft`` command with eval loss/perplexity, and bad rows rejected up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otalign.cli import main
from otalign.data.sft import IGNORE_INDEX, SFTExample, encode_sft, load_sft_data
from otalign.models.tiny import save_tiny_model, tiny_tokenizer
from otalign.trainers import ConfigError, read_metrics
from otalign.trainers.sft import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FIXTURES = Path(__file__).parent / "fixtures"
PAIRS = str(FIXTURES / "sft_pairs.jsonl")
CHAT = str(FIXTURES / "sft_chat.jsonl")
ASSISTANT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}answer : {{ m['content'] }} <eos> "
    "{% else %}{{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}answer : {% endif %}"
)
"""A chat template whose conversation prefixes (with generation prompt) are prefixes of longer ones, like real ones."""


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ASSISTANT_TEMPLATE
    return tokenizer


@pytest.fixture
def make_trainer(trainer_factory):
    """``make_trainer(output_dir, **overrides)``: 15 steps of 4 fixture examples at learning rate 3e-3, tiny model."""
    return trainer_factory(
        SFTTrainer, SFTConfig, dataset_name=PAIRS, max_steps=15, per_device_train_batch_size=4, learning_rate=3e-3
    )


def test_prompt_tokens_are_left_out_of_the_labels():
    tokenizer = tiny_tokenizer()
    ids, labels = encode_sft(tokenizer, SFTExample("write about the cat .", "the cat is good ."), "row 1")
    prompt = tokenizer("write about the cat .")["input_ids"]
    completion = tokenizer("the cat is good .", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt + completion
    assert labels == [IGNORE_INDEX] * len(prompt) + completion


def test_conversation_trains_on_every_assistant_turn_only():
    tokenizer = chat_tokenizer()
    example = load_sft_data(CHAT)[0]
    ids, labels = encode_sft(tokenizer, example, "row 1")
    whole = tokenizer.apply_chat_template(example.messages, tokenize=False)
    assert tokenizer.decode(ids) == whole.strip()
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "the cat is good . <eos> the dog is great . <eos>"
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels, strict=True))


def test_sft_lowers_the_response_loss(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path, learning_rate=1e-2, lr_scheduler_type="constant")
    before = trainer.evaluate(trainer.train_rows)["eval_loss"]
    history = trainer.train()
    after = trainer.evaluate(trainer.train_rows)["eval_loss"]
    assert after < 0.5 * before
    assert history[-1]["loss"] < history[0]["loss"]
    assert {"loss", "num_tokens", "mean_token_accuracy", "entropy", "learning_rate", "time/step"} <= set(history[0])


def test_packing_makes_full_rows_and_trains(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path, packing=True, max_length=16, max_steps=3)
    assert all(len(ids) == len(labels) == 16 for ids, labels in trainer.train_rows)
    history = trainer.train()
    assert len(history) == 3


def test_resume_continues_exactly(tmp_path, make_trainer):
    full = make_trainer(tmp_path / "full", max_steps=4).train()
    make_trainer(tmp_path / "cut", max_steps=4, save_steps=2, save_total_limit=None).train()
    resumed = make_trainer(
        tmp_path / "cut", max_steps=4, resume_from_checkpoint=str(tmp_path / "cut/checkpoints/checkpoint-2")
    ).train()
    assert len(resumed) == 2
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)
    assert resumed[-1]["num_tokens"] == full[-1]["num_tokens"]  # the running count survives the resume
    assert [row["step"] for row in read_metrics(tmp_path / "cut")] == [1, 2, 3, 4]


def test_lora_trains_only_adapters_and_saves_a_merged_model(tmp_path, make_trainer):
    from transformers import AutoModelForCausalLM

    trainer = make_trainer(tmp_path, use_peft=True, lora_r=4, max_steps=2, save_model=True)
    names = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    trainer.train()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not any("lora" in n for n, _ in loaded.named_parameters())


def test_sft_command_on_chat_rows_logs_eval_loss_and_perplexity(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny", chat_tokenizer())
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {model_dir}\ndataset_name: {CHAT}\neval_dataset_name: {CHAT}\n")
    out = tmp_path / "run"
    argv = ["sft", "--config", str(config), "--output_dir", str(out), "--max_steps", "2"]
    assert main([*argv, "--per_device_train_batch_size", "2", "--progress_bar", "false", "--eval_steps", "1"]) == 0
    rows = read_metrics(out)
    assert "eval_loss" in rows[0] and rows[0]["step"] == 1  # intermediate evaluation every eval_steps
    assert rows[-1]["eval_perplexity"] == pytest.approx(2.718281828 ** rows[-1]["eval_loss"], rel=1e-6)
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["dataset_name"] == CHAT


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "the cat"}, "row 2: missing field 'completion'"),
        ({"prompt": "the cat", "completion": " "}, "row 2, field 'completion': empty text"),
        ({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}, "row 2, field 'completion': mixes"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=f"{path}, {message}"):
        load_sft_data(str(path))


def test_conversation_without_assistant_turn_is_rejected(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match="row 1, field 'messages': no assistant turn"):
        load_sft_data(str(path))


def test_too_long_example_is_an_error_in_error_mode(tmp_path, make_trainer):
    with pytest.raises(ValueError, match="row 1: .* tokens, more than max_length=4"):
        make_trainer(tmp_path, max_length=4, truncation_mode="error")


@pytest.mark.multiprocess
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, two_process_cli, make_trainer):
    """``otalign sft`` under a 2-process CPU launch (gloo) logs the metrics of one process with twice the batch:
    the data order follows the global sample index and the loss is the token mean over both processes."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    settings = dict(max_steps=3, learning_rate=1e-2)
    make_trainer(tmp_path / "one", per_device_train_batch_size=4, **settings).train()
    command = ["sft", f"--model_name_or_path={model_dir}", f"--dataset_name={PAIRS}"]
    command += [f"--output_dir={tmp_path / 'two'}", "--per_device_train_batch_size=2", "--progress_bar=false"]
    command += ["--save_model=false", *[f"--{k}={v}" for k, v in settings.items()]]
    two_process_cli(command)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for row_one, row_two in zip(one, two, strict=True):
        for key in ("loss", "num_tokens", "learning_rate"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4), key


def test_num_train_epochs_sets_the_steps_and_epoch_counts_passes_over_the_rows(tmp_path, make_trainer):
    # 8 rows, 3 per step: 2 epochs are ceil(16 / 3) = 6 steps, whatever max_steps says
    trainer = make_trainer(tmp_path, num_train_epochs=2, max_steps=100, per_device_train_batch_size=3)
    assert trainer.num_examples == 8 and trainer.config.max_steps == 6
    history = trainer.train()
    assert [row["epoch"] for row in history] == pytest.approx([3 * k / 8 for k in range(1, 7)])
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 6  # recorded for a resume
    with pytest.raises(ConfigError, match="num_train_epochs must be > 0"):
        SFTConfig(num_train_epochs=0)


def test_dataset_config_goes_with_both_splits_of_a_hub_dataset(tmp_path, monkeypatch, make_trainer):
    datasets = pytest.importorskip("datasets")
    calls = []
    rows = [json.loads(line) for line in Path(PAIRS).read_text().splitlines() if line.strip()]

    def load_dataset(path, name=None, *, split=None):  # stands in for the hub: tests never go online
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr("otalign.paths.hub_unreachable", lambda endpoint: None)  # the stand-in hub is reachable
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    trainer = make_trainer(tmp_path, dataset_name="someone/sft", eval_dataset_name="someone/sft", dataset_config="en")
    assert calls == [("someone/sft", "en", "train"), ("someone/sft", "en", "test")]
    assert len(trainer.train_rows) == len(rows)


def test_supervised_config_is_a_deprecated_name_of_dataset_config():
    from otalign.trainers import supervised
    from otalign.trainers.dataset import DatasetConfig

    with pytest.warns(DeprecationWarning, match="use otalign.trainers.dataset.DatasetConfig"):
        assert supervised.SupervisedConfig is DatasetConfig


def test_text_rows_through_the_sft_command_with_dataset_text_field(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"body": f"the {w} is good ."}) + "\n" for w in ("cat", "dog")))
    out = tmp_path / "run"
    argv = ["sft", "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", str(out)]
    argv += ["--dataset_text_field", "body", "--per_device_train_batch_size", "2", "--max_steps", "1"]
    assert main([*argv, "--progress_bar", "false"]) == 0
    (row,) = read_metrics(out)
    assert row["num_tokens"] == 2 * 6  # five words and the EOS token per row
    assert json.loads((out / "config.json").read_text())["dataset_text_field"] == "body"
