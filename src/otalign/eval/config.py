"""Configs of ``otalign eval`` (candidates, repeats, judge) and the sampling fields it shares with the analyses."""

from __future__ import annotations

from dataclasses import dataclass, field

from otalign.config import MODEL_DTYPES, Config, ConfigError, redefault
from otalign.data.prompts import PROMPT_SETS
from otalign.registry import Registry
from otalign.rewards import REWARD_FUNCTIONS

from .templates import render_judge_prompt

JUDGES = Registry("judge")
"""Every ``judge`` of ``otalign eval``: the factory taking the :class:`EvalConfig`, one-line help."""
JUDGES.add("reward_fn", "otalign.eval.run:reward_fn_judge", help="the higher built-in reward (judge_reward_fn) wins")
JUDGES.add("reward_model", "otalign.eval.run:reward_model_judge", help="the higher reward-model score wins")
JUDGES.add("chat_model", "otalign.eval.run:chat_model_judge", help="a local chat model picks A or B")
JUDGES.add("http", "otalign.eval.run:http_judge", help="an OpenAI-compatible endpoint picks A or B")


@dataclass
class SamplingFields(Config):
    """Prompts and sampling of a run on generations (``otalign eval`` and the analyses); distributions are
    ``softmax(logits / temperature)``."""

    output_dir: str = field(default="reports/analysis", metadata={"path": "output_dir", "help": "where the outputs go"})
    prompts: str = field(
        default="builtin",
        metadata={
            "path": "data",
            "builtins": PROMPT_SETS,
            "help": "'builtin' or a prompt dataset (file or saved folder)",
        },
    )
    prompt_split: str = field(default="test", metadata={"help": "split of the built-in prompts (train or test)"})
    num_prompts: int = field(
        default=20, metadata={"help": "prompts drawn without replacement (seeded)", "check": ">= 1"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "new tokens per answer at most", "check": ">= 1"})
    temperature: float = field(
        default=0.8,
        metadata={
            "help": "sampling temperature (logits / temperature must stay finite in float32)",
            "check": "[1e-3, 1e3]",
        },
    )
    top_k: int = field(default=50, metadata={"help": "sample from the top-k tokens (0: all)", "check": ">= 0"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass", "check": "(0, 1]"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generation batch", "check": ">= 1"})
    scoring_batch_size: int = field(
        default=4,
        metadata={
            "help": "responses per forward when a model scores its generations (memory: this x length x vocab)",
            "check": ">= 1",
        },
    )
    max_prompt_length: int = field(
        default=512, metadata={"help": "longest prompt in tokens (longer is an error)", "check": ">= 1"}
    )
    model_dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": MODEL_DTYPES})
    seed: int = field(default=0, metadata={"help": "prompt subsample and sampling noise", "check": "[0, 4294967295]"})

    def params(self):
        """The :class:`~otalign.generation.SamplingParams` of these fields."""
        from otalign.generation import SamplingParams

        return SamplingParams(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


@dataclass
class EvalConfig(SamplingFields):
    """Settings of a pairwise win-rate evaluation (defaults: the WPR paper's protocol, 50 prompts x 5 repeats).

    Two or more candidates in all (``models`` and ``generation_files``); every pair is compared, ties count half.
    With generation files, their prompts (identical in every file) are the evaluation set. ``output_dir`` gets
    ``winrates.json``, ``table.md``, ``comparisons.jsonl`` and ``samples.jsonl``.
    """

    output_dir: str = redefault(SamplingFields, "output_dir", "reports/eval")
    models: list[str] = field(
        default_factory=list,
        metadata={"path": "model", "help": "model ids or folders ('default': the embedded model) to compare"},
    )
    generation_files: list[str] = field(
        default_factory=list, metadata={"path": "file", "help": "JSONL files of {prompt, response} rows to compare"}
    )
    num_prompts: int = redefault(SamplingFields, "num_prompts", 50)
    num_repeats: int = field(
        default=5, metadata={"help": "repeats, each with its own subsample, noise and answer orders", "check": ">= 1"}
    )
    max_new_tokens: int = redefault(SamplingFields, "max_new_tokens", 128)
    temperature: float = redefault(SamplingFields, "temperature", 0.5)
    judge: str = field(default="reward_fn", metadata={"help": "who decides each comparison", "choices": JUDGES.names})
    judge_reward_fn: str = field(
        default="sentiment",
        metadata={"help": "built-in reward function (judge reward_fn)", "choices": REWARD_FUNCTIONS.names},
    )
    judge_model: str | None = field(
        default=None,
        metadata={"path": "model", "help": "reward model (reward_model) or chat model (chat_model) id or folder"},
    )
    judge_tie_tolerance: float = field(
        default=0.0, metadata={"help": "score difference a reward judge counts as a tie", "check": ">= 0"}
    )
    judge_template: str = field(
        default="helpfulness",
        metadata={"help": "'helpfulness', 'summarization' or a format string (chat and HTTP judges)"},
    )
    judge_max_new_tokens: int = field(
        default=256, metadata={"help": "answer length of a chat or HTTP judge", "check": ">= 1"}
    )
    judge_base_url: str = field(default="https://api.openai.com/v1", metadata={"help": "OpenAI-compatible endpoint"})
    judge_model_name: str = field(default="gpt-4o-2024-05-13", metadata={"help": "model name sent to the endpoint"})
    judge_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "environment variable holding the endpoint's API key"}
    )
    judge_timeout: float = field(default=60.0, metadata={"help": "seconds per HTTP request", "check": "(0, 86400]"})
    judge_max_retries: int = field(default=5, metadata={"help": "HTTP retries per request", "check": ">= 0"})
    judge_backoff: float = field(
        default=1.0, metadata={"help": "first retry delay in seconds (doubles per retry)", "check": ">= 0"}
    )
    judge_requests_per_second: float | None = field(
        default=None, metadata={"help": "HTTP rate limit (none: unlimited; at least one a day)", "check": ">= 1.2e-5"}
    )
    judge_cache: str | None = field(
        default=None,
        metadata={"path": "output_file", "help": "HTTP answer cache (none: <output_dir>/judge_cache.jsonl)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.models) + len(self.generation_files) < 2:
            raise ConfigError("give two or more candidates in all (models and/or generation_files)")
        if self.judge in ("reward_model", "chat_model") and not self.judge_model:
            raise ConfigError(f"judge {self.judge} needs judge_model (a model id or folder)")
        if self.judge in ("chat_model", "http"):
            try:
                render_judge_prompt(self.judge_template, "prompt", "a", "b")
            except (ValueError, KeyError, IndexError) as err:
                raise ConfigError(f"judge_template: {err}") from None
