"""``otalign data synth``: a synthetic preference set from a model and a reward function, nothing downloaded.

For every prompt the model samples ``num_samples`` responses (seeded per prompt and sample, so the set
does not depend on batching); the highest-scored response is ``chosen`` and the lowest-scored ``rejected``.
Prompts whose best and worst scores tie (within ``min_margin``) or whose responses are empty are skipped
and counted. With a chat-template tokenizer the rows are conversational (a user turn, an assistant turn),
else plain text; both forms are what :mod:`otalign.data.preference` reads.

Default: the embedded model answering the built-in training prompts, scored by the built-in sentiment reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from otalign.data.conversion import Converted, write_jsonl
from otalign.data.prompts import Prompt, load_prompts
from otalign.eval.generations import prompt_text, sample_responses
from otalign.trainers.config import ConfigError
from otalign.trainers.rollout import SamplingParams, sample_seeds


@dataclass
class SynthConfig:
    """Settings of ``otalign data synth``.

    output: the JSONL file written. model_name_or_path, model_dtype: the sampling model.
    prompts, prompts_split: the prompt set (``builtin`` or a file, see :func:`otalign.data.load_prompts`).
    reward_fn: built-in reward function name scoring the responses. num_samples: responses per prompt (>= 2).
    max_new_tokens, temperature, top_k, top_p: sampling. batch_size: prompts per generation batch.
    min_margin: smallest best-minus-worst score difference kept. seed: sampling seed.
    """

    output: str = "data/synth_preferences.jsonl"
    model_name_or_path: str = "default"
    model_dtype: str = "float32"
    prompts: str = "builtin"
    prompts_split: str = "train"
    reward_fn: str = "sentiment"
    num_samples: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    batch_size: int = 16
    max_prompt_length: int = 256
    min_margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ConfigError(f"num_samples must be >= 2, got {self.num_samples}")
        if self.min_margin < 0:
            raise ConfigError(f"min_margin must be >= 0, got {self.min_margin}")


def synthesize(model, tokenizer, prompts: list[Prompt], reward_fn, config: SynthConfig) -> Converted:
    """Preference rows from ``num_samples`` sampled responses per prompt scored by ``reward_fn(prompts, responses)``.

    Returns a :class:`~otalign.data.conversion.Converted` whose ``skipped`` counts ``tie`` and ``empty response``
    prompts (1-based prompt numbers).
    """
    params = SamplingParams(
        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p
    )
    indices = list(range(len(prompts)))
    samples = [
        sample_responses(
            model,
            tokenizer,
            prompts,
            sample_seeds(config.seed * 1009 + j, indices),
            params,
            batch_size=config.batch_size,
            max_prompt_length=config.max_prompt_length,
        )
        for j in range(config.num_samples)
    ]
    texts = [prompt_text(p) for p in prompts]
    scores = [list(map(float, reward_fn(texts, responses))) for responses in samples]
    chat = bool(getattr(tokenizer, "chat_template", None))
    result = Converted(rows=[], total=len(prompts))
    for i, prompt in enumerate(prompts):
        ranked = sorted(range(config.num_samples), key=lambda j: scores[j][i])
        worst, best = ranked[0], ranked[-1]
        chosen, rejected = samples[best][i].strip(), samples[worst][i].strip()
        if not chosen or not rejected:
            result.skipped.setdefault("empty response", []).append(i + 1)
        elif scores[best][i] - scores[worst][i] <= config.min_margin or chosen == rejected:
            result.skipped.setdefault("tie", []).append(i + 1)
        elif chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            reply = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
            result.rows.append({"prompt": messages, "chosen": reply[0], "rejected": reply[1]})
        else:
            result.rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return result


def run(config: SynthConfig) -> Path:
    """Load the model, prompts and reward of ``config``, synthesize, write ``config.output``; prints a summary."""
    from otalign.models import load_causal_lm, load_tokenizer
    from otalign.rewards import REWARD_FUNCTIONS

    if config.reward_fn not in REWARD_FUNCTIONS:
        raise ValueError(f"unknown reward_fn {config.reward_fn!r}; choose one of {sorted(REWARD_FUNCTIONS)}")
    model = load_causal_lm(config.model_name_or_path, dtype=config.model_dtype).eval()
    tokenizer = load_tokenizer(config.model_name_or_path)
    prompts = load_prompts(config.prompts, config.prompts_split)
    result = synthesize(model, tokenizer, prompts, REWARD_FUNCTIONS[config.reward_fn], config)
    if not result.rows:
        raise ValueError(f"{result.summary('synth')}: no usable pair; raise num_samples or temperature")
    path = write_jsonl(result.rows, config.output)
    print(f"[otalign] {result.summary(str(path))}", flush=True)
    return path
