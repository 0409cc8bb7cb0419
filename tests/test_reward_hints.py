"""Which reward to pass: a command with no reward, or a reward whose columns the prompt rows lack, lists the
registered reward functions and the reward-model option."""

from __future__ import annotations

import pytest

from otalign.cli import main
from otalign.rewards import REWARD_FUNCTIONS, build_reward, reward_choices


def test_the_choices_name_every_registered_reward_and_the_columns_it_reads():
    text = reward_choices()
    assert all(name in text for name in REWARD_FUNCTIONS)
    assert "arithmetic (reads column answer)" in text and "sentiment (needs no column)" in text
    assert text.endswith("or --reward_model_name_or_path with --reward_fn none")


def test_a_missing_column_names_the_rewards_that_could_be_passed_instead():
    reward = build_reward("arithmetic")
    with pytest.raises(ValueError) as caught:
        reward.keyword_columns({"topic": ["x"]})
    message = str(caught.value)
    assert message.startswith("reward function 'arithmetic' needs column(s) ['answer']")
    assert message.endswith(reward_choices())


@pytest.mark.parametrize("command", ["grpo", "rloo", "ppo"])
def test_no_reward_at_all_is_one_line_listing_the_rewards(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--reward_fn", "none", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0] == f"otalign {command}: error: --reward_fn: no reward given; choose one: {reward_choices()}"


def test_a_reward_needing_a_column_the_prompts_lack_stops_before_any_sampling(tmp_path):
    """GRPO with the arithmetic reward on prompts without an ``answer`` column: the trainer refuses at construction,
    naming the reward, the column and the alternatives, instead of after the first rollout is sampled."""
    from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
    from otalign.trainers import GRPOConfig, GRPOTrainer

    tokenizer = tiny_tokenizer()
    config = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        response_length=4,
        progress_bar=False,
        save_model=False,
        reward_fn=["arithmetic"],
    )
    with pytest.raises(ValueError, match=r"^reward function 'arithmetic' needs column\(s\) \['answer'\]"):
        GRPOTrainer(
            config,
            policy=tiny_causal_lm(tokenizer, seed=0),
            ref_model=tiny_causal_lm(tokenizer, seed=0),
            tokenizer=tokenizer,
            prompts=["what is the cat ?", "tell me about my day ."],
        )
