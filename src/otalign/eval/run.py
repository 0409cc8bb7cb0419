"""``otalign eval``: sample or read every candidate's answers, judge every pair, write win rates as JSON and a table.

Protocol (the WPR paper's, Appendix C.4): each repeat draws ``num_prompts`` prompts without replacement, every
model answers them with the repeat's sampling seed (the same noise for every model: common random numbers),
and each pair is judged with the answer order randomised per comparison. A pair's win rate is reported as
mean ± std over the repeats.

Outputs in ``output_dir``: ``winrates.json`` (settings, judge, per pair: mean, std, per-repeat and total
counts), ``table.md`` (also printed), ``comparisons.jsonl`` (every verdict and the judge's raw answer),
``samples.jsonl`` (every candidate's answers).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
from pathlib import Path

import numpy as np

from otalign.paths import write_text_atomically, written_atomically

from .config import JUDGES, EvalConfig
from .generations import common_prompts, prompt_text, read_generations, sample_responses
from .http_judge import HostUnreachable
from .judges import ChatModelJudge, Judge, RewardJudge
from .winrate import WinRate, compare, mean_std, subsample


def build_judge(config: EvalConfig) -> Judge:
    """The judge ``config.judge`` names (a :data:`~otalign.eval.config.JUDGES` entry), built from the ``judge_*``
    fields."""
    return JUDGES.build(config.judge, config=config)


def reward_fn_judge(config: EvalConfig) -> Judge:
    """The higher built-in reward ``judge_reward_fn`` wins (ties within ``judge_tie_tolerance``)."""
    from otalign.rewards import build_reward

    return RewardJudge(build_reward(config.judge_reward_fn), config.judge_tie_tolerance)


def reward_model_judge(config: EvalConfig) -> Judge:
    """The higher score of the reward model ``judge_model`` wins."""
    from otalign.rewards import build_reward

    reward = build_reward(reward_model=config.judge_model, retokenize=True, dtype=config.model_dtype)
    return RewardJudge(reward, config.judge_tie_tolerance)


def chat_model_judge(config: EvalConfig) -> Judge:
    """The local chat model ``judge_model`` answers ``judge_template`` with A or B."""
    from otalign.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(config.judge_model, dtype=config.model_dtype).eval()
    return ChatModelJudge(
        model,
        load_tokenizer(config.judge_model),
        config.judge_template,
        max_new_tokens=config.judge_max_new_tokens,
        batch_size=config.batch_size,
    )


def http_judge(config: EvalConfig) -> Judge:
    """An OpenAI-compatible endpoint answers ``judge_template`` with A or B (cached, retried, rate-limited)."""
    from .http_judge import HTTPJudge

    return HTTPJudge(
        config.judge_base_url,
        config.judge_model_name,
        api_key_env=config.judge_api_key_env,
        template=config.judge_template,
        timeout=config.judge_timeout,
        max_retries=config.judge_max_retries,
        backoff=config.judge_backoff,
        requests_per_second=config.judge_requests_per_second,
        cache_path=config.judge_cache or Path(config.output_dir) / "judge_cache.jsonl",
        max_tokens=config.judge_max_new_tokens,
    )


def candidate_names(config: EvalConfig) -> tuple[list[str], list[str]]:
    """Display names of the generation files (their stems) and of the models (their folder names), unique
    across both (``-2``, ``-3`` appended to repeats)."""
    names: list[str] = []
    for source in [Path(f).stem for f in config.generation_files] + [Path(m).name or m for m in config.models]:
        name, k = source, 2
        while name in names:
            name, k = f"{source}-{k}", k + 1
        names.append(name)
    return names[: len(config.generation_files)], names[len(config.generation_files) :]


def collect_answers(config: EvalConfig) -> tuple[list[str], list, list[tuple[list[int], int]], dict]:
    """``(names, prompts, repeats, answers)``: candidate names, the prompt set, each repeat's
    ``(prompt indices, sampling seed)``, and ``answers[name][repeat][j]`` for the repeat's ``j``-th prompt."""
    file_names, model_names = candidate_names(config)
    files = {name: read_generations(path) for name, path in zip(file_names, config.generation_files, strict=True)}
    if files:
        prompts = common_prompts(files)
    else:
        from otalign.data import load_prompts

        prompts = load_prompts(config.prompts, config.prompt_split)
    repeats = []
    for r in range(config.num_repeats):
        rng = np.random.default_rng([config.seed, r])
        repeats.append((subsample(len(prompts), config.num_prompts, rng), int(rng.integers(2**31))))
    answers = {name: [[files[name][prompts[i]] for i in idx] for idx, _ in repeats] for name in files}
    for name, model_path in zip(model_names, config.models, strict=True):
        answers[name] = _generate(config, model_path, prompts, repeats)
    return file_names + model_names, prompts, repeats, answers


def run_eval(config: EvalConfig, judge: Judge | None = None) -> dict:
    """Run the evaluation ``config`` describes (with ``judge`` instead of the configured one, if given); returns
    and writes the ``winrates.json`` content."""
    names, prompts, repeats, answers = collect_answers(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge = judge or build_judge(config)
    _write_samples(out / "samples.jsonl", prompts, repeats, answers)
    pairs = []
    with written_atomically(out / "comparisons.jsonl") as tmp, tmp.open("w", encoding="utf-8") as log:
        for k, (x, y) in enumerate(itertools.combinations(names, 2)):
            counts = []
            for r, (idx, _) in enumerate(repeats):
                texts = [prompt_text(prompts[i]) for i in idx]
                try:
                    comparisons = compare(
                        judge, texts, answers[x][r], answers[y][r], np.random.default_rng([config.seed, r, k])
                    )
                except HostUnreachable as err:  # name the option to fix
                    raise HostUnreachable(f"--judge_base_url: {err}") from None
                counts.append(WinRate.of(comparisons))
                for c in comparisons:
                    row = {
                        "repeat": r,
                        "model": x,
                        "opponent": y,
                        "prompt_index": idx[c.index],
                        "swapped": c.swapped,
                        "verdict": c.verdict,
                        "score": c.score,
                        "raw": c.raw,
                    }
                    log.write(json.dumps(row, ensure_ascii=False) + "\n")
            pairs.append(_pair_summary(x, y, counts))
    result = {"judge": judge.name, "candidates": names, "config": config.to_dict(), "pairs": pairs}
    write_text_atomically(out / "winrates.json", json.dumps(_finite(result), indent=2) + "\n")
    table = format_table(pairs)
    write_text_atomically(out / "table.md", table + "\n")
    print(table)
    return result


def _generate(config: EvalConfig, model_path: str, prompts: list, repeats: list) -> list[list[str]]:
    """One list of answers per repeat from the model at ``model_path`` (loaded once, freed afterwards)."""
    from otalign.generation import sample_seeds
    from otalign.models import load_causal_lm, load_tokenizer

    params = config.params()
    model = load_causal_lm(model_path, dtype=config.model_dtype).eval()
    tokenizer = load_tokenizer(model_path)
    answers = [
        sample_responses(
            model,
            tokenizer,
            [prompts[i] for i in idx],
            sample_seeds(seed, idx),
            params,
            batch_size=config.batch_size,
            max_prompt_length=config.max_prompt_length,
        )
        for idx, seed in repeats
    ]
    del model
    gc.collect()
    return answers


def _pair_summary(x: str, y: str, counts: list[WinRate]) -> dict:
    mean, std = mean_std([c.rate for c in counts])
    total = WinRate(*(sum(getattr(c, f) for c in counts) for f in ("wins", "ties", "losses", "malformed")))
    return {
        "model": x,
        "opponent": y,
        "win_rate_mean": mean,
        "win_rate_std": std,
        "total": total.to_dict(),
        "repeats": [c.to_dict() for c in counts],
    }


def _write_samples(path: Path, prompts: list, repeats: list, answers: dict[str, list[list[str]]]) -> None:
    with written_atomically(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for r, (idx, _) in enumerate(repeats):
            for j, i in enumerate(idx):
                row = {"repeat": r, "prompt_index": i, "prompt": prompts[i]}
                row["responses"] = {name: answers[name][r][j] for name in answers}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _finite(value):
    """``value`` with every NaN float replaced by None (strict JSON)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def format_table(pairs: list[dict]) -> str:
    """A Markdown table: pair, win rate mean ± std, total wins / ties / losses, malformed verdicts."""
    lines = ["| model | opponent | win rate (mean ± std) | wins / ties / losses | malformed |", "|---|---|---|---|---|"]
    for p in pairs:
        t = p["total"]
        lines.append(
            f"| {p['model']} | {p['opponent']} | {p['win_rate_mean']:.3f} ± {p['win_rate_std']:.3f} "
            f"| {t['wins']} / {t['ties']} / {t['losses']} | {t['malformed']} |"
        )
    return "\n".join(lines)
