"""``otalign data synth``: a synthetic preference set from a model and a reward function, nothing downloaded.

For every prompt the model samples ``num_samples`` responses (seeded per prompt and sample, so the set
does not depend on batching); the highest-scored response is ``chosen`` and the lowest-scored ``rejected``.
Prompts whose best and worst scores tie (within ``min_margin``) or whose responses are empty are skipped
and counted. With a chat-template tokenizer the rows are conversational (a user turn, an assistant turn),
else plain text; both forms are what :mod:`otalign.data.preference` reads.

Default: the embedded model answering the built-in training prompts, scored by the built-in sentiment reward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from otalign.config import MODEL_DTYPES, Config
from otalign.data.conversion import Converted, write_jsonl
from otalign.data.prompts import PROMPT_SETS, Prompt, load_prompt_rows, prompt_columns
from otalign.eval.generations import prompt_text, sample_responses
from otalign.generation import SamplingParams, sample_seeds
from otalign.rewards import REWARD_FUNCTIONS, build_reward


@dataclass
class SynthConfig(Config):
    """Settings of ``otalign data synth``."""

    output: str = field(
        default="data/synth_preferences.jsonl", metadata={"path": "output_file", "help": "the JSONL file written"}
    )
    model_name_or_path: str = field(default="default", metadata={"path": "model", "help": "the sampling model"})
    model_dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": MODEL_DTYPES})
    prompts: str = field(
        default="builtin",
        metadata={
            "path": "data",
            "builtins": PROMPT_SETS,
            "help": "'builtin' or a prompt dataset (file or saved folder)",
        },
    )
    prompts_split: str = field(default="train", metadata={"help": "split of the built-in prompts"})
    reward_fn: str = field(
        default="sentiment",
        metadata={"help": "reward function scoring the responses", "choices": REWARD_FUNCTIONS.names},
    )
    num_samples: int = field(default=4, metadata={"help": "responses sampled per prompt", "check": ">= 2"})
    max_new_tokens: int = field(default=32, metadata={"help": "new tokens per response at most", "check": ">= 1"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "check": "> 0"})
    top_k: int = field(default=50, metadata={"help": "sample from the top-k tokens (0: all)", "check": ">= 0"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass", "check": "(0, 1]"})
    batch_size: int = field(default=16, metadata={"help": "prompts per generation batch", "check": ">= 1"})
    max_prompt_length: int = field(default=256, metadata={"help": "longest prompt in tokens", "check": ">= 1"})
    min_margin: float = field(
        default=0.0, metadata={"help": "smallest best-minus-worst score difference kept", "check": ">= 0"}
    )
    seed: int = field(default=0, metadata={"help": "sampling seed", "check": "[0, 4294967295]"})


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
    """Load the prompts and reward of ``config`` (the reward gets the prompt rows' columns it names, e.g. the
    ``arithmetic`` prompts' ``answer``; a missing one stops before the model loads), then the model; synthesize,
    write ``config.output``; prints a summary."""
    from otalign.models import load_causal_lm, load_tokenizer

    rows = load_prompt_rows(config.prompts, config.prompts_split)
    columns = {name: [row[name] for row in rows] for name in prompt_columns(rows, str(config.prompts))}
    reward = build_reward(config.reward_fn)
    reward_fn = functools.partial(reward.fn, **reward.keyword_columns(columns))
    model = load_causal_lm(config.model_name_or_path, dtype=config.model_dtype).eval()
    tokenizer = load_tokenizer(config.model_name_or_path)
    result = synthesize(model, tokenizer, [row["prompt"] for row in rows], reward_fn, config)
    if not result.rows:
        raise ValueError(f"{result.summary('synth')}: no usable pair; raise num_samples or temperature")
    path = write_jsonl(result.rows, config.output)
    print(f"[otalign] {result.summary(str(path))}", flush=True)
    return path
