"""Rewards for RL: a Hugging Face reward model, a built-in reward function by name, or any Python callable."""

from __future__ import annotations

import os

from otalign.registry import Registry

from .arithmetic import arithmetic_reward
from .base import FunctionReward, Reward, RewardFn, check_scores
from .code import ExecutionReward, apps_execution_reward, score_program, score_programs
from .model import ModelReward, same_tokenizer
from .sentiment import sentiment_reward

REWARD_FUNCTIONS = Registry("reward function")
"""Built-in reward functions ``fn(prompts, responses, **columns) -> scores``, selectable by name (``reward_fn``)."""
REWARD_FUNCTIONS.add("sentiment", sentiment_reward, help="VADER compound sentiment of the response, in [-1, 1]")
REWARD_FUNCTIONS.add(
    "apps_execution",
    apps_execution_reward,
    help="run the program against the row's tests in the sandbox: the WPR paper's APPS reward in [-1, 1]",
)
REWARD_FUNCTIONS.add(
    "arithmetic",
    arithmetic_reward,
    help="1 if the response's last number equals the row's answer column, else 0 (the arithmetic prompts)",
)


def reward_choices() -> str:
    """The rewards a command can be given, for a message: each registered reward function with the prompt
    columns it reads (its keyword parameters), then the reward-model option."""
    names = []
    for name in REWARD_FUNCTIONS:
        reads = list(FunctionReward(REWARD_FUNCTIONS[name]).keywords)
        names.append(f"{name} (reads column {', '.join(reads)})" if reads else f"{name} (needs no column)")
    return f"--reward_fn {', '.join(names)}; or --reward_model_name_or_path with --reward_fn none"


def build_reward(
    reward_fn: str | RewardFn | None = None,
    reward_model: str | os.PathLike | None = None,
    *,
    policy_tokenizer=None,
    retokenize: bool = False,
    dtype: str = "float32",
) -> Reward:
    """The reward a config names: exactly one of ``reward_fn`` (a built-in name or a callable) and
    ``reward_model`` (a sequence-classification model id or folder, checked against ``policy_tokenizer``).

    Raises:
        ValueError: both or neither given, or an unknown reward function name.
    """
    if (reward_fn is None) == (reward_model is None):
        raise ValueError("give exactly one of reward_fn (a function name or callable) and reward_model (a model path)")
    if reward_model is not None:
        return ModelReward.from_pretrained(reward_model, policy_tokenizer, retokenize=retokenize, dtype=dtype)
    if callable(reward_fn):
        return FunctionReward(reward_fn)
    if reward_fn not in REWARD_FUNCTIONS:
        raise ValueError(f"unknown reward function {reward_fn!r}; choose one of {sorted(REWARD_FUNCTIONS)}")
    return FunctionReward(REWARD_FUNCTIONS[reward_fn], name=reward_fn, choices=reward_choices)


__all__ = [
    "REWARD_FUNCTIONS",
    "ExecutionReward",
    "FunctionReward",
    "ModelReward",
    "Reward",
    "RewardFn",
    "apps_execution_reward",
    "arithmetic_reward",
    "build_reward",
    "reward_choices",
    "check_scores",
    "same_tokenizer",
    "score_program",
    "score_programs",
    "sentiment_reward",
]
