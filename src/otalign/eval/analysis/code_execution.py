"""Code generation scored by execution (the WPR paper's Table 5): pass@k and reward per APPS difficulty.

``otalign analyze apps`` samples ``num_samples`` programs per problem from a model (or reads them from a generation
file), scores every one with :func:`otalign.rewards.code.score_programs` in the sandbox and reports, overall and per
difficulty (introductory / interview / competition):

- ``pass@k`` for each ``k <= num_samples``: the unbiased estimator ``1 - C(n-c, k)/C(n, k)`` (``n`` samples of a
  problem, ``c`` of them passing every test), averaged over problems;
- the mean reward (the paper's scheme), the mean share of tests passed, and the share of each status.

Writes ``apps.json`` (config, isolation, summary, per-problem counts), ``samples.jsonl`` (every program with its
verdict) and ``apps.png`` (pass@k per difficulty).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from otalign.config import ConfigError
from otalign.data.apps import APPS_MINI
from otalign.paths import write_text_atomically, written_atomically

from ..config import SamplingFields
from .sampling import load_model, save_figure


@dataclass
class CodeEvalConfig(SamplingFields):
    """Settings of ``otalign analyze apps`` (sampling fields: :class:`SamplingFields`)."""

    output_dir: str = field(
        default="reports/apps", metadata={"path": "output_dir", "help": "where apps.json/samples.jsonl/apps.png go"}
    )
    prompts: str = field(
        default="apps_mini",
        metadata={
            "path": "data",
            "builtins": (APPS_MINI,),
            "help": "apps_mini, a raw APPS file, or a prompt file with a tests column",
        },
    )
    prompt_split: str = field(default="test", metadata={"help": "split of a Hugging Face APPS dataset"})
    num_prompts: int = field(default=5000, metadata={"help": "problems drawn (seeded); all when there are fewer"})
    max_new_tokens: int = field(default=256, metadata={"help": "program length limit (tokens)"})
    model: str | None = field(
        default=None, metadata={"path": "model", "help": "model id or folder that writes the programs"}
    )
    generation_file: str | None = field(
        default=None,
        metadata={"path": "file", "help": "JSONL of {problem_id or prompt, response} rows instead of a model"},
    )
    num_samples: int = field(default=5, metadata={"help": "programs sampled per problem (n of pass@k)"})
    ks: list[int] = field(default_factory=lambda: [1, 5], metadata={"help": "k values of pass@k (each <= n)"})
    extract: str = field(default="auto", metadata={"help": "program extraction: auto | fenced | raw"})
    timeout: float = field(default=4.0, metadata={"help": "wall-clock seconds per test"})
    workers: int | None = field(
        default=None, metadata={"help": "sandbox worker pool size (None: CPU count)", "check": ">= 1"}
    )
    allow_unsandboxed_network: bool = field(
        default=False, metadata={"help": "run programs even where the network cannot be isolated"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.model is None) == (self.generation_file is None):
            raise ConfigError("give exactly one of model and generation_file")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"ks must be positive integers, got {self.ks}")
        if self.model is not None and max(self.ks) > self.num_samples:
            raise ConfigError(f"every k must be <= num_samples={self.num_samples}, got ks={self.ks}")
        if self.extract not in ("auto", "fenced", "raw"):
            raise ConfigError(f"extract must be auto, fenced or raw, got {self.extract!r}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers must be >= 1 (or left out for the CPU count), got {self.workers}")


def summarize(problems: Sequence[dict], results: Sequence[Sequence], ks: Sequence[int]) -> dict:
    """Overall and per-difficulty metrics of ``results[i]`` (the :class:`~otalign.rewards.code.CodeResult` list of
    problem ``i``'s samples); a problem with fewer than k samples is left out of pass@k, whose mean is over the
    ``pass@<k>/problems`` problems that have k or more (absent when none has).

    Returns:
        ``{"all": metrics, "<difficulty>": metrics, ...}`` with metrics ``{"problems", "samples",
        "pass@<k>", "pass@<k>/problems", "mean_reward", "test_pass_rate", "status/<status>"}``; the means of a
        group without samples are None (``null`` in JSON, never NaN).
    """
    from otalign.rewards.code import STATUSES, pass_at_k

    groups: dict[str, list[int]] = {"all": list(range(len(problems)))}
    for i, row in enumerate(problems):
        groups.setdefault(str(row.get("difficulty", "unknown")), []).append(i)
    out = {}
    for name, members in groups.items():
        samples = [r for i in members for r in results[i]]
        metrics: dict[str, float] = {"problems": len(members), "samples": len(samples)}
        for k in ks:
            values = [
                pass_at_k(len(results[i]), sum(r.passed for r in results[i]), k)
                for i in members
                if len(results[i]) >= k
            ]
            if values:
                metrics[f"pass@{k}"] = float(np.mean(values))
                metrics[f"pass@{k}/problems"] = len(values)
        metrics["mean_reward"] = float(np.mean([r.reward for r in samples])) if samples else None
        metrics["test_pass_rate"] = (
            float(np.mean([r.n_pass / max(r.n_pass + r.n_fail, 1) for r in samples])) if samples else None
        )
        counts = Counter(r.status for r in samples)
        for status in STATUSES:
            metrics[f"status/{status}"] = counts[status] / max(len(samples), 1)
        out[name] = metrics
    return out


def read_code_generations(path: str | Path, problems: Sequence[dict]) -> list[list[str]]:
    """Responses per problem from a JSONL file of ``{"problem_id" or "prompt", "response"}`` rows (any number
    per problem; order kept).

    Raises:
        ValueError: a row that is not JSON, lacks a string ``response``, or names no known problem (file and row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generation file {path} does not exist")
    by_id = {row.get("problem_id"): i for i, row in enumerate(problems)}
    by_prompt = {
        row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"]): i
        for i, row in enumerate(problems)
    }
    out: list[list[str]] = [[] for _ in problems]
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, row {n}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("response"), str):
            raise ValueError(f"{path}, row {n}: field 'response' missing or not a string")
        if "problem_id" in row and row["problem_id"] in by_id:
            out[by_id[row["problem_id"]]].append(row["response"])
        elif isinstance(row.get("prompt"), str) and row["prompt"] in by_prompt:
            out[by_prompt[row["prompt"]]].append(row["response"])
        else:
            raise ValueError(f"{path}, row {n}: names no problem of the set (by 'problem_id' or 'prompt')")
    return out


def _sample(config: CodeEvalConfig, problems: list[dict]) -> list[list[str]]:
    from otalign.generation import sample_seeds

    from ..generations import sample_responses

    model, tokenizer = load_model(config.model, config.model_dtype)
    n = config.num_samples
    prompts = [row["prompt"] for row in problems for _ in range(n)]
    seeds = sample_seeds(config.seed, list(range(len(prompts))))
    texts = sample_responses(
        model,
        tokenizer,
        prompts,
        seeds,
        config.params(),
        batch_size=config.batch_size,
        max_prompt_length=config.max_prompt_length,
    )
    return [texts[i * n : (i + 1) * n] for i in range(len(problems))]


def run_code_eval(config: CodeEvalConfig) -> dict:
    """Sample (or read) the programs, score them in the sandbox, write the report; returns the summary."""
    from otalign.data import load_code_problems
    from otalign.rewards.code import CodeScorer, extract_program
    from otalign.rewards.sandbox import SandboxConfig

    from ..winrate import subsample

    problems = load_code_problems(config.prompts, config.prompt_split).rows
    keep = subsample(len(problems), min(config.num_prompts, len(problems)), np.random.default_rng(config.seed))
    problems = [problems[i] for i in sorted(keep)]
    if config.generation_file is not None:
        responses = read_code_generations(config.generation_file, problems)
    else:
        responses = _sample(config, problems)
    most = max(map(len, responses), default=0)
    if max(config.ks) > most:
        raise ConfigError(
            f"ks={config.ks}: pass@{max(config.ks)} needs a problem with {max(config.ks)} samples or more; "
            f"{config.generation_file or 'the sampling'} gives at most {most}"
        )
    sandbox = SandboxConfig(timeout=config.timeout, allow_unsandboxed_network=config.allow_unsandboxed_network)
    scorer = CodeScorer(config=sandbox, workers=config.workers)
    try:
        flat = [(i, extract_program(r, config.extract)) for i, rs in enumerate(responses) for r in rs]
        scored = scorer.score_batch([p for _, p in flat], [problems[i]["tests"] for i, _ in flat])
    finally:
        scorer.close()
    results: list[list] = [[] for _ in problems]
    for (i, _), result in zip(flat, scored, strict=True):
        results[i].append(result)
    summary = summarize(problems, results, config.ks)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "config": asdict(config),
        "isolation": scorer.sandbox.describe(),
        "summary": summary,
        "problems": [
            {
                "problem_id": p.get("problem_id"),
                "difficulty": p.get("difficulty"),
                "n": len(rs),
                "c": sum(r.passed for r in rs),
            }
            for p, rs in zip(problems, results, strict=True)
        ],
    }
    write_text_atomically(out / "apps.json", json.dumps(report, indent=2) + "\n")
    with written_atomically(out / "samples.jsonl") as tmp, tmp.open("w", encoding="utf-8") as f:
        for p, rs, texts in zip(problems, results, responses, strict=True):
            for r, text in zip(rs, texts, strict=True):
                row = {"problem_id": p.get("problem_id"), "response": text, "status": r.status, "reward": r.reward}
                f.write(json.dumps(row | {"n_pass": r.n_pass, "n_fail": r.n_fail, "detail": r.detail}) + "\n")
    _plot(summary, config.ks, out / "apps.png")
    print(f"sandbox: {scorer.sandbox.describe()}")
    for name, m in summary.items():
        print(_summary_line(name, m, config.ks))
    return summary


def _summary_line(name: str, m: dict, ks: Sequence[int]) -> str:
    """``name: N problems, pass@k x (over n of N problems, when fewer), ..., mean reward r``."""
    passes = []
    for k in (k for k in ks if f"pass@{k}" in m):
        over = m[f"pass@{k}/problems"]
        passes.append(f"pass@{k} {m[f'pass@{k}']:.3f}" + (f" (over {over} of them)" if over < m["problems"] else ""))
    reward = "n/a" if m["mean_reward"] is None else f"{m['mean_reward']:.3f}"
    return f"{name}: {m['problems']} problems, {', '.join(passes) or 'no pass@k'}, mean reward {reward}"


def _plot(summary: dict, ks: Sequence[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(names), 3.5))
    width = 0.8 / len(ks)
    for j, k in enumerate(ks):
        ax.bar(
            [i + j * width for i in range(len(names))],
            [summary[n].get(f"pass@{k}", 0.0) for n in names],
            width,
            label=f"pass@{k}",
        )
    ax.set_xticks([i + width * (len(ks) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass@k")
    ax.legend()
    ax.set_title("execution-based evaluation")
    save_figure(fig, path)
