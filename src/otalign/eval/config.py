"""Configs of ``otalign eval`` (candidates, repeats, judge) and the sampling fields it shares with the analyses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from otalign.trainers.config import ConfigError

from .templates import render_judge_prompt

JUDGES = ("reward_fn", "reward_model", "chat_model", "http")


@dataclass
class SamplingFields:
    """Prompts and sampling of a run on generations (``otalign eval`` and the analyses).

    Attributes:
        output_dir: where the outputs go.
        prompts, prompt_split: ``builtin`` (train/test split) or a .jsonl/.json/.txt prompt file.
        num_prompts: prompts drawn without replacement (seeded).
        max_new_tokens, temperature, top_k, top_p: sampling; distributions are ``softmax(logits / temperature)``.
        batch_size, max_prompt_length, model_dtype: batching, prompt limit (tokens), weights dtype.
        seed: prompt subsample and sampling noise.
    """

    output_dir: str = "reports/analysis"
    prompts: str = "builtin"
    prompt_split: str = "test"
    num_prompts: int = 20
    max_new_tokens: int = 32
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    batch_size: int = 8
    max_prompt_length: int = 512
    model_dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")

    def params(self):
        """The :class:`~otalign.trainers.rollout.SamplingParams` of these fields."""
        from otalign.trainers.rollout import SamplingParams

        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


@dataclass
class EvalConfig(SamplingFields):
    """Settings of a pairwise win-rate evaluation (defaults: the WPR paper's protocol, 50 prompts x 5 repeats).

    Candidates (two or more in all; every pair is compared):
        models: model ids or folders (``default``: the embedded model); each generates its answers.
        generation_files: JSONL files of ``{"prompt", "response"}`` rows; with files, their prompts (identical
            in every file) are the evaluation set.
    Prompts and repeats:
        prompts, prompt_split: the prompt set models answer when no generation file is given (``builtin`` or
            a .jsonl/.json/.txt file; the split picks the built-in train/test set).
        num_prompts: prompts drawn (without replacement) per repeat.
        num_repeats: repeats, each with its own subsample, sampling noise and answer orders.
        seed: seeds all of them.
    Generation:
        max_new_tokens, temperature, top_k, top_p: sampling (the paper evaluates at temperature 0.5).
        batch_size, max_prompt_length, model_dtype: batching (also of a chat judge), prompt limit, weights dtype.
    Judge:
        judge: ``reward_fn`` | ``reward_model`` | ``chat_model`` | ``http``.
        judge_reward_fn: built-in reward function name (``reward_fn``).
        judge_model: reward model (``reward_model``) or chat model (``chat_model``) id or folder.
        judge_tie_tolerance: score difference a reward judge counts as a tie.
        judge_template: ``helpfulness`` | ``summarization`` | a format string (chat and HTTP judges).
        judge_max_new_tokens: answer length of a chat or HTTP judge.
        judge_base_url, judge_model_name, judge_api_key_env: the OpenAI-compatible endpoint, model and the
            environment variable holding the API key.
        judge_timeout, judge_max_retries, judge_backoff, judge_requests_per_second: HTTP robustness settings.
        judge_cache: HTTP answer cache (None: ``<output_dir>/judge_cache.jsonl``).
    Output:
        output_dir: ``winrates.json``, ``table.md``, ``comparisons.jsonl``, ``samples.jsonl``.
    """

    output_dir: str = "reports/eval"
    models: list[str] = field(default_factory=list)
    generation_files: list[str] = field(default_factory=list)
    num_prompts: int = 50
    num_repeats: int = 5
    max_new_tokens: int = 128
    temperature: float = 0.5
    judge: str = "reward_fn"
    judge_reward_fn: str = "sentiment"
    judge_model: str | None = None
    judge_tie_tolerance: float = 0.0
    judge_template: str = "helpfulness"
    judge_max_new_tokens: int = 256
    judge_base_url: str = "https://api.openai.com/v1"
    judge_model_name: str = "gpt-4o-2024-05-13"
    judge_api_key_env: str = "OPENAI_API_KEY"
    judge_timeout: float = 60.0
    judge_max_retries: int = 5
    judge_backoff: float = 1.0
    judge_requests_per_second: float | None = None
    judge_cache: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.models) + len(self.generation_files) < 2:
            raise ConfigError("give two or more candidates in all (models and/or generation_files)")
        for name in ("num_repeats", "judge_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.judge not in JUDGES:
            raise ConfigError(f"judge must be one of {JUDGES}, got {self.judge!r}")
        if self.judge in ("reward_model", "chat_model") and not self.judge_model:
            raise ConfigError(f"judge {self.judge} needs judge_model (a model id or folder)")
        if self.judge in ("chat_model", "http"):
            try:
                render_judge_prompt(self.judge_template, "prompt", "a", "b")
            except (ValueError, KeyError, IndexError) as err:
                raise ConfigError(f"judge_template: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
