"""``otalign analyze apps``: pass@k and reward per difficulty from generation files, checked against direct counts."""

from __future__ import annotations

import json

import pytest

from otalign.cli import main
from otalign.data import load_code_problems
from otalign.eval.analysis.code_execution import CodeEvalConfig, read_code_generations, summarize
from otalign.rewards.code import CodeResult, RewardScheme, pass_at_k
from otalign.trainers import ConfigError


def _result(status: str, n_pass: int = 0, n_fail: int = 1) -> CodeResult:
    return CodeResult(RewardScheme()(status, n_pass, n_fail), n_pass, n_fail, status)


def test_summary_counts_per_difficulty():
    problems = [{"difficulty": "introductory"}, {"difficulty": "introductory"}, {"difficulty": "competition"}]
    ok, bad, err = _result("passed", 2, 0), _result("failed", 1, 1), _result("runtime_error")
    results = [[ok, bad, bad], [bad, bad, bad], [ok, ok, err]]
    s = summarize(problems, results, [1, 2, 3])
    assert s["introductory"]["pass@1"] == pytest.approx((1 / 3 + 0) / 2)
    assert s["introductory"]["pass@2"] == pytest.approx((pass_at_k(3, 1, 2) + 0) / 2)
    assert s["competition"]["pass@1"] == pytest.approx(2 / 3) and s["competition"]["pass@3"] == 1.0
    assert s["all"]["pass@1"] == pytest.approx((1 / 3 + 0 + 2 / 3) / 3)
    assert s["all"]["samples"] == 9 and s["all"]["status/runtime_error"] == pytest.approx(1 / 9)
    assert s["all"]["mean_reward"] == pytest.approx((3 * 1.0 + 5 * 0.35 - 0.6) / 9)


def test_cli_scores_a_generation_file(tmp_path, capsys):
    """Per problem: its known-correct solution and every known-wrong one as the samples."""
    problems = load_code_problems().rows
    rows = []
    for p in problems:
        for program in [p["solutions"][0]] + [w["program"] for w in p["wrong_solutions"]]:
            rows.append({"problem_id": p["problem_id"], "response": f"```python\n{program}```"})
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    argv = ["analyze", "apps", "--generation_file", str(gen), "--ks", "1,2", "--timeout", "1", "--output_dir", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "apps.json").read_text())
    assert (out / "apps.png").stat().st_size > 0 and len((out / "samples.jsonl").read_text().splitlines()) == len(rows)
    for entry, p in zip(report["problems"], problems, strict=True):
        assert (entry["n"], entry["c"]) == (1 + len(p["wrong_solutions"]), 1)
    expected = sum(1 / (1 + len(p["wrong_solutions"])) for p in problems) / len(problems)
    assert report["summary"]["all"]["pass@1"] == pytest.approx(expected)
    assert set(report["summary"]) == {"all", "introductory", "interview", "competition"}
    assert "own network namespace" in report["isolation"]
    assert "pass@1" in capsys.readouterr().out


def test_bad_generation_rows_and_config_are_named(tmp_path):
    problems = load_code_problems().rows
    gen = tmp_path / "gen.jsonl"
    gen.write_text('{"problem_id": 0, "response": "x"}\n{"problem_id": 999, "response": "x"}\n')
    with pytest.raises(ValueError, match=r"gen.jsonl, row 2: names no problem"):
        read_code_generations(gen, problems)
    gen.write_text('{"problem_id": 0}\n')
    with pytest.raises(ValueError, match=r"gen.jsonl, row 1: field 'response' missing"):
        read_code_generations(gen, problems)
    with pytest.raises(ConfigError, match="exactly one of model and generation_file"):
        CodeEvalConfig()
    with pytest.raises(ConfigError, match="every k must be <= num_samples=2"):
        CodeEvalConfig(model="default", num_samples=2, ks=[1, 5])


def test_cli_samples_a_model(tmp_path):
    """A tiny random model writes 2 programs for each of 3 problems: random words, scored (compile errors mostly)."""
    from test_eval_run import save_tiny_models

    (model,) = save_tiny_models(tmp_path, seeds=(0,))
    out = tmp_path / "report"
    argv = ["analyze", "apps", "--model", model, "--num_prompts", "3", "--num_samples", "2", "--ks", "1,2"]
    assert main([*argv, "--max_new_tokens", "6", "--max_prompt_length", "120", "--output_dir", str(out)]) == 0
    report = json.loads((out / "apps.json").read_text())
    assert report["summary"]["all"]["samples"] == 6 and report["summary"]["all"]["problems"] == 3
    assert -1.0 <= report["summary"]["all"]["mean_reward"] <= 1.0


def test_summary_is_valid_json_and_says_what_pass_at_k_averages(tmp_path, capsys):
    """A difficulty without samples has null means (never NaN, which is not JSON); pass@k over fewer problems
    than the set says so, in the summary and the printed line; a k beyond every problem's samples is one error."""
    problems = load_code_problems().rows
    first = {p["difficulty"]: p for p in reversed(problems)}  # one problem per difficulty
    rows = [{"problem_id": p["problem_id"], "response": p["solutions"][0]} for p in first.values()]
    rows.append(rows[0])  # two samples for one problem, one for the others, none for the rest
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    argv = ["analyze", "apps", "--generation_file", str(gen), "--timeout", "1", "--output_dir", str(out)]
    assert main([*argv, "--ks", "1,2"]) == 0
    text = (out / "apps.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in apps.json"))
    summary = report["summary"]["all"]
    assert summary["problems"] == len(problems) and summary["pass@1/problems"] == len(first)
    assert summary["pass@1"] == 1.0 and summary["pass@2"] == 1.0 and summary["pass@2/problems"] == 1
    printed = capsys.readouterr().out
    assert f"all: {len(problems)} problems, pass@1 1.000 (over {len(first)} of them)" in printed
    empty = summarize([{"difficulty": "x"}], [[]], [1])["x"]
    assert empty["mean_reward"] is None and empty["test_pass_rate"] is None and "pass@1" not in empty
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--ks", "1,5"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass@5 needs a problem with 5 samples or more" in err[0] and "at most 2" in err[0]


@pytest.mark.parametrize(
    ("field", "value", "message"), [("workers", 0, "workers must be >= 1"), ("timeout", 0, "timeout must be > 0")]
)
def test_pool_and_timeout_are_checked(field, value, message):
    with pytest.raises(ConfigError, match=message):
        CodeEvalConfig(generation_file="x.jsonl", **{field: value})
