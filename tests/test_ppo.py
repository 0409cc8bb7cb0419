"""PPOTrainer on tiny random models (seconds each): every regularizer, learning, resume, bad input."""

from __future__ import annotations

import pytest
import torch

from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
from otalign.regularizers import REGULARIZER_NAMES
from otalign.trainers import PPOConfig, PPOTrainer, read_metrics

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = [
    "write one sentence about the cat .",
    "tell you about my day .",
    "describe the city in the rain .",
    "what is your friend ?",
    "how was the weekend ?",
    "write about the food .",
]
EXPECTED = [
    "reward/mean",
    "reward/std",
    "reward/total",
    "penalty/mean",
    "kl/exact",
    "kl/exact_seq",
    "policy/entropy",
    "response/length",
    "value/mean",
    "value/explained_variance",
    "loss/policy",
    "loss/value",
    "policy/clipfrac",
    "policy/approx_kl",
    "value/clipfrac",
    "learning_rate",
    "grad_norm",
    "time/generation",
    "time/forward",
    "time/penalty",
    "time/update",
    "time/step",
]


def good_share(prompts: list[str], responses: list[str]) -> list[float]:
    """Trivially learnable reward: the share of the word 'good' among the response's words."""
    return [r.split().count("good") / max(len(r.split()), 1) for r in responses]


def make_trainer(tmp_path, *, policy_seed: int = 0, prompt_list: list[str] | None = PROMPTS, **overrides) -> PPOTrainer:
    tokenizer = tiny_tokenizer()
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        response_length=6,
        learning_rate=1e-3,
        progress_bar=False,
        save_model=False,
        wpr_top_k=8,
    )
    settings.update(overrides)
    config = PPOConfig(**settings)
    ref = tiny_causal_lm(tokenizer, seed=0)
    return PPOTrainer(
        config,
        policy=tiny_causal_lm(tokenizer, seed=policy_seed),
        ref_model=ref,
        tokenizer=tokenizer,
        reward=good_share,
        prompts=prompt_list,
    )


@pytest.mark.parametrize("name", REGULARIZER_NAMES)
def test_one_rollout_and_update_per_regularizer(tmp_path, name):
    trainer = make_trainer(
        tmp_path,
        regularizer=name,
        max_steps=1,
        per_device_train_batch_size=1,
        num_mini_batches=2,
        gradient_accumulation_steps=2,
    )  # a rollout of 1 x 2 x 2 = 4 prompts, as TRL counts
    before = [p.detach().clone() for p in trainer.params]
    (metrics,) = trainer.train()
    for key in EXPECTED:
        assert key in metrics, key
    assert all(v == v for k, v in metrics.items() if k != "value/explained_variance"), metrics  # no NaN
    assert metrics["kl/exact"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first rollout
    assert metrics["policy/approx_kl"] > 0  # the second mini-batch runs after the first update
    if name == "wasserstein":
        for key in ("wasserstein/value", "sinkhorn/iters", "sinkhorn/marginal_err"):
            assert key in metrics
    changed = [not torch.equal(a, b.detach()) for a, b in zip(before, trainer.params, strict=True)]
    assert all(changed)
    assert [row["step"] for row in read_metrics(tmp_path)] == [1]


def test_reward_rises_on_a_learnable_reward(tmp_path):
    trainer = make_trainer(
        tmp_path,
        max_steps=25,
        per_device_train_batch_size=8,
        num_mini_batches=2,
        learning_rate=1e-2,
        beta=0.001,
        response_length=4,
    )
    history = trainer.train()
    rewards = [h["reward/mean"] for h in history]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.1 and last > 0.5, rewards
    assert history[-1]["kl/exact"] > history[0]["kl/exact"]


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, assert_resume_matches):
    full = make_trainer(tmp_path / "full", max_steps=4, save_steps=2, save_total_limit=None, regularizer="wasserstein")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-2"
    # a fresh process state: different initial policy weights, so only the checkpoint can make it match
    resumed = make_trainer(
        tmp_path / "resumed",
        policy_seed=5,
        max_steps=4,
        save_steps=2,
        regularizer="wasserstein",
        resume_from_checkpoint=str(checkpoint),
    )
    resumed.train()
    assert_resume_matches(tmp_path / "full", tmp_path / "resumed", [3, 4])


def test_resume_flag_truncates_metrics_written_after_the_checkpoint(tmp_path):
    make_trainer(tmp_path, max_steps=3, save_steps=2, save_total_limit=None).train()
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "checkpoint-3")  # as if the run died after logging step 3
    again = make_trainer(tmp_path, max_steps=3, save_steps=2, resume=True)
    again.train()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_bad_input_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="prompt set is empty"):
        PPOTrainer(
            PPOConfig(output_dir=str(tmp_path)), policy=None, tokenizer=tiny_tokenizer(), reward=good_share, prompts=[]
        )
    with pytest.raises(ValueError, match=r"prompts, row 1: the prompt has \d+ tokens, more than max_prompt_length=3"):
        make_trainer(tmp_path, max_prompt_length=3)
    with pytest.raises(ValueError, match="more than the model.s context of 128"):
        make_trainer(tmp_path, response_length=125)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: the prompt set is empty"):
        make_trainer(tmp_path, prompts=str(empty), prompt_list=None)


def test_prompt_file_rows_are_validated(tmp_path):
    from otalign.data import load_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl, row 2: missing field 'prompt'"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a"}\n{"prompt": "  "}\n')
    with pytest.raises(ValueError, match=r"row 2, field 'prompt': empty text"):
        load_prompts(str(path))
    assert len(load_prompts("builtin", "train")) == 80 and len(load_prompts("builtin", "test")) == 40
    assert not set(load_prompts("builtin", "train")) & set(load_prompts("builtin", "test"))
