"""RewardTrainer on tiny random models: learns a toy preference to high held-out accuracy, saves a standard
sequence-classification checkpoint that PPO uses as its reward, resume, LoRA, the CLI, bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from otalign.cli import main
from otalign.data.preference import PreferencePair
from otalign.models.tiny import save_tiny_model, tiny_causal_lm, tiny_tokenizer
from otalign.trainers import ConfigError, PPOConfig, PPOTrainer, read_metrics
from otalign.trainers.reward import RewardConfig, RewardTrainer, held_out

pytestmark = pytest.mark.usefixtures("torch_single_thread")

FIXTURES = Path(__file__).parent / "fixtures"
NOUNS = ("cat", "dog", "house", "tree", "city", "rain", "sun", "food", "book", "friend", "work", "morning")
GOOD = ("good", "great", "happy", "wonderful", "nice")
BAD = ("bad", "awful", "sad", "terrible", "poor")


def toy_pairs() -> list[PreferencePair]:
    """60 pairs: a positive adjective is preferred to a negative one about the same thing."""
    combos = itertools.product(NOUNS, zip(GOOD, BAD, strict=True))
    return [
        PreferencePair(f"tell about the {noun} .", f"the {noun} is {good} .", f"the {noun} is {bad} .")
        for noun, (good, bad) in combos
    ]


@pytest.fixture
def make_trainer(trainer_factory):
    """``make_trainer(output_dir, **overrides)``: 30 steps of 8 toy pairs (a quarter held out) at learning rate 3e-3,
    tiny model."""
    return trainer_factory(
        RewardTrainer,
        RewardConfig,
        inputs={"train_data": toy_pairs()},
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        eval_split_size=0.25,
    )


def test_reward_model_learns_the_toy_preference_and_drives_ppo(tmp_path, make_trainer):
    from transformers import AutoModelForSequenceClassification

    trainer = make_trainer(tmp_path / "rm", save_model=True)
    assert len(trainer.train_pairs) == 45 and len(trainer.eval_pairs) == 15
    before = trainer.evaluate()
    history = trainer.train()
    final = history[-1]
    assert before["eval_accuracy"] < 0.9
    assert final["eval_accuracy"] >= 0.9 and final["eval_rewards/margins"] > 0
    assert final["eval_loss"] < before["eval_loss"]
    assert {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(history[0])
    assert "eval_accuracy" in read_metrics(tmp_path / "rm")[-1]

    path = tmp_path / "rm" / "model"
    loaded = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert loaded.config.num_labels == 1
    ids = torch.tensor([trainer.tokenizer("tell about the cat . the cat is good .")["input_ids"]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = trainer.accelerator.unwrap_model(trainer.policy).eval()(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(loaded(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)

    tokenizer = tiny_tokenizer()
    ppo = PPOTrainer(
        PPOConfig(
            output_dir=str(tmp_path / "ppo"),
            max_steps=1,
            per_device_train_batch_size=2,
            response_length=4,
            reward_fn=None,
            reward_model_name_or_path=str(path),
            progress_bar=False,
            save_model=False,
        ),
        policy=tiny_causal_lm(tokenizer, seed=1),
        tokenizer=tokenizer,
        prompts=["tell about the cat .", "tell about the dog ."],
    )
    assert type(ppo.reward).__name__ == "ModelReward"
    metrics = ppo.train()[-1]
    assert torch.isfinite(torch.tensor(metrics["reward/mean"]))


def test_resume_continues_exactly(tmp_path, make_trainer):
    full = make_trainer(tmp_path / "full", max_steps=4, eval_split_size=0.0).train()
    make_trainer(tmp_path / "cut", max_steps=4, eval_split_size=0.0, save_steps=2, save_total_limit=None).train()
    checkpoint = str(tmp_path / "cut/checkpoints/checkpoint-2")
    resumed = make_trainer(
        tmp_path / "cut", max_steps=4, eval_split_size=0.0, resume_from_checkpoint=checkpoint
    ).train()
    assert len(resumed) == 2
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)


def test_lora_reward_model_saves_merged_standard_checkpoint(tmp_path, make_trainer):
    from transformers import AutoModelForSequenceClassification

    trainer = make_trainer(tmp_path, use_peft=True, lora_r=4, max_steps=2, save_model=True)
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    trainer.train()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert loaded.config.num_labels == 1
    assert not any("lora" in n for n, _ in loaded.named_parameters())


def test_reward_command_from_a_causal_lm_folder(tmp_path):
    model_dir = save_tiny_model(tmp_path / "sft")
    out = tmp_path / "run"
    pairs = str(FIXTURES / "preference_pairs.jsonl")
    argv = ["reward", "--model_name_or_path", model_dir, "--dataset_name", pairs, "--eval_dataset_name", pairs]
    assert main([*argv, "--output_dir", str(out), "--max_steps", "1", "--progress_bar", "false"]) == 0
    assert "eval_accuracy" in read_metrics(out)[-1]
    assert (out / "model" / "config.json").is_file()


def test_held_out_split_is_seeded_and_disjoint():
    train, held = held_out(10, 0.3, seed=1)
    assert len(held) == 3 and sorted(train + held) == list(range(10))
    assert held_out(10, 0.3, seed=1) == (train, held) != held_out(10, 0.3, seed=2)


def test_bad_input_is_rejected_before_training(tmp_path, make_trainer):
    with pytest.raises(ConfigError, match="eval_split_size"):
        RewardConfig(eval_split_size=1.0)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ValueError, match=f"{path}, row 2: missing field 'rejected'"):
        RewardTrainer(RewardConfig(dataset_name=str(path), output_dir=str(tmp_path)), tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match=r"row 1, field 'chosen': \d+ tokens, more than max_length=3"):
        make_trainer(tmp_path, max_length=3)


@pytest.mark.multiprocess
def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, two_process_cli):
    """``otalign reward`` under a 2-process CPU launch (gloo) logs the metrics of one process with twice the batch."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    pairs = str(FIXTURES / "preference_pairs.jsonl")
    settings = dict(max_steps=3, learning_rate=3e-3, dataset_name=pairs)
    one_process = dict(output_dir=str(tmp_path / "one"), per_device_train_batch_size=4, save_model=False)
    RewardTrainer(RewardConfig(model_name_or_path=model_dir, progress_bar=False, **one_process, **settings)).train()
    command = ["reward", f"--model_name_or_path={model_dir}", f"--output_dir={tmp_path / 'two'}"]
    command += ["--per_device_train_batch_size=2", "--progress_bar=false", "--save_model=false"]
    command += [f"--{k}={v}" for k, v in settings.items()]
    two_process_cli(command)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for row_one, row_two in zip(one, two, strict=True):
        for key in ("loss", "accuracy", "rewards/chosen", "rewards/margins", "learning_rate"):
            assert row_two[key] == pytest.approx(row_one[key], rel=1e-4, abs=1e-6), key


def test_rows_longer_than_the_model_context_are_rejected(tmp_path):
    tokenizer = tiny_tokenizer()
    long = PreferencePair("the " * 130, "good .", "bad .")
    with pytest.raises(ValueError, match="more than the model's context of 128"):
        RewardTrainer(
            RewardConfig(output_dir=str(tmp_path), max_length=1000),
            model=tiny_causal_lm(tokenizer),
            tokenizer=tokenizer,
            train_data=[long],
        )
