"""The execution reward: APPS comparison rules, the paper's reward scheme, pass@k, the built-in problems' verdicts,
the named reward and the batched/cached scorer (programs run in the real sandbox)."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import math
import time
from pathlib import Path

import pytest
import torch

from otalign.data import apps_mini_path, load_apps, load_code_problems
from otalign.data.conversion import write_jsonl
from otalign.rewards import REWARD_FUNCTIONS, ExecutionReward
from otalign.rewards.code import (
    CodeScorer,
    RewardScheme,
    call_match,
    extract_program,
    judge,
    pass_at_k,
    score_program,
    stdio_match,
)
from otalign.rewards.sandbox import SandboxConfig

SUM = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}


@pytest.fixture(scope="module")
def scorer():
    s = CodeScorer(config=SandboxConfig(timeout=1.0), workers=2)
    yield s
    s.close()


@pytest.mark.parametrize(
    ("output", "expected", "ok"),
    [
        ("3\n", "3\n", True),
        ("3", "3\n", True),
        ("  1   2 \r\n\n3\n\n", "1 2\n3\n", True),
        ("1 2 3\n", "1 2\n3\n", False),  # line structure matters
        ("2.5\n", "2.5000000000\n", True),
        ("2.50002\n", "2.5\n", True),  # |difference| 2e-5 <= 1e-8 + 1e-5 * 2.5
        ("2.5001\n", "2.5\n", False),
        ("1e-9\n", "0.0\n", True),  # within atol of a float
        ("1e-9\n", "0\n", False),  # an integer matches exactly or not at all
        ("1000009000\n", "999999999\n", False),  # within allclose's rtol, but integers are exact (issue 32)
        ("3300030\n", "3300000\n", False),  # print(a + b + 30) for an answer of ~3.3 million
        ("3.0\n", "3\n", True),  # the same number exactly
        ("+3\n", "3\n", True),
        ("3.0000001\n", "3\n", False),
        ("1e999999999\n", "3\n", False),  # decided without expanding the exponent
        ("3\n", "3.0000001\n", True),  # a float expected: the tolerance holds
        ("3 2 1\n", "1 2 3\n", False),  # no order-insensitive set comparison
        ("YES\n", "yes\n", False),
        ("", "0\n", False),
        ("", "", True),
        ("a\nb\n", ["a", "b"], True),  # expected given as a list of lines
        ("nan\n", "nan\n", True),
        ("1_0\n", "10\n", False),  # not a plain numeric token
    ],
)
def test_stdio_comparison(output, expected, ok):
    assert stdio_match(output, expected) is ok


def test_float_tolerance_is_numpy_allclose():
    np = pytest.importorskip("numpy")
    for a, b in [(1.0, 1.00001), (1e6, 1e6 + 11), (0.0, 2e-8), (-3.0, -3.0000301), (123.456, 123.4572)]:
        assert stdio_match(f"{a!r}\n", f"{b!r}\n") is bool(np.allclose(a, b))


@pytest.mark.parametrize(
    ("value", "expected", "ok"),
    [
        (6, [6], True),  # APPS wraps call-based outputs in a list
        (6, 6, True),
        ([0, 1], [[0, 1]], True),
        ([0, 1], [0, 1], True),
        ("6", [6], False),
        (0.30000000000000004, [0.3], True),
        ([1, 2], [[1, 2, 3]], False),
        ({"a": 1.0}, [{"a": 1}], True),
        (None, [None], True),
        ([6, 6], [6], False),
        (1000009000, [999999999], False),  # integers are exact (issue 32)
        (999999999, 999999999, True),
        (3.0, 3, True),  # the same number exactly
        (3.0000001, 3, False),
        (3, 3.0000001, True),  # a float expected: the tolerance holds
        (True, [1], False),  # bool is not int
        (False, 0, False),
        (1, [True], False),
        (True, [True], True),
        ([True, 0], [[1, 0]], False),
        (10**400, 1.5, False),  # too large for a float: no OverflowError
        (float("inf"), [float("inf")], True),
    ],
)
def test_call_comparison(value, expected, ok):
    assert call_match(value, expected) is ok


def test_reward_scheme_is_the_papers():
    scheme = RewardScheme()
    assert scheme("compile_error", 0, 0) == -1.0
    assert scheme("runtime_error", 3, 1) == -0.6 and scheme("timeout", 0, 1) == -0.6
    assert scheme("passed", 4, 0) == pytest.approx(1.0)
    assert scheme("failed", 1, 3) == pytest.approx(-0.3 + 1.3 / 4)
    assert scheme("failed", 0, 5) == pytest.approx(-0.3)


def test_extraction_modes():
    fenced = "Here you go:\n```python\nprint(1)\n```\nand\n```\nprint(2)\n```"
    assert extract_program(fenced) == "print(1)\n"
    assert extract_program("```py\nx = 1\n") == "x = 1\n"  # unterminated block (cut by the length limit)
    assert extract_program("print(3)") == "print(3)"
    assert extract_program("print(3)", "fenced") is None
    assert extract_program(fenced, "raw") == fenced
    with pytest.raises(ValueError, match="extract must be one of"):
        extract_program("x", "first")


@pytest.mark.parametrize(("n", "c"), [(5, 0), (5, 1), (5, 3), (6, 6), (7, 2), (10, 4)])
def test_pass_at_k_matches_brute_force(n, c):
    """pass@k = P(at least one of k samples drawn without replacement passes), enumerated."""
    samples = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        draws = list(itertools.combinations(samples, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
        assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(3, 4, 1)


def test_builtin_problems_give_the_reference_verdicts(scorer):
    """Every known-correct solution passes and every known-wrong one gets its recorded status, in one batch."""
    rows = load_code_problems().rows
    assert len(rows) == 12 and {r["difficulty"] for r in rows} == {"introductory", "interview", "competition"}
    assert any(r["tests"]["fn_name"] for r in rows) and any(not r["tests"]["fn_name"] for r in rows)
    programs, tests, expected = [], [], []
    for row in rows:
        for program in row["solutions"]:
            programs.append(program)
            tests.append(row["tests"])
            expected.append("passed")
        for wrong in row["wrong_solutions"]:
            programs.append(wrong["program"])
            tests.append(json.dumps(row["tests"]))  # the JSON-string form works too
            expected.append(wrong["status"])
    results = scorer.score_batch(programs, tests)
    assert [r.status for r in results] == expected
    assert {"passed", "failed", "runtime_error", "compile_error", "timeout"} == set(expected)
    for r in results:
        assert r.reward == pytest.approx(RewardScheme()(r.status, r.n_pass, r.n_fail))
    partial = results[programs.index("print(input())\n")]  # the palindrome passes, the others do not
    assert (partial.n_pass, partial.n_fail) == (1, 2) and partial.reward == pytest.approx(-0.3 + 1.3 / 3)


def test_loader_reads_real_apps_rows_into_the_builtin_form(tmp_path):
    rows = load_code_problems().rows
    raw = [
        {
            "problem_id": r["problem_id"],
            "question": r["prompt"].split("QUESTION:\n", 1)[1].split("\n", 1)[0],
            "solutions": json.dumps(r["solutions"]),
            "input_output": json.dumps({k: v for k, v in r["tests"].items() if v is not None}),
            "difficulty": r["difficulty"],
            "url": "",
            "starter_code": "",
        }
        for r in rows
        if not r["tests"]["fn_name"]  # these have no starter code, so the prompt is reproduced exactly
    ]
    path = write_jsonl(raw, tmp_path / "apps.jsonl")
    loaded = load_apps(str(path)).rows
    assert loaded == load_code_problems(str(path)).rows
    by_id = {r["problem_id"]: r for r in rows}
    for row in loaded:
        assert row["tests"] == by_id[row["problem_id"]]["tests"]
        assert row["prompt"] == by_id[row["problem_id"]]["prompt"]


def test_bad_tests_are_named(scorer):
    with pytest.raises(ValueError, match="tests of batch row 1: expected lists 'inputs' and 'outputs'"):
        scorer.score_batch(["print(1)", "print(1)"], [SUM, {"inputs": ["1"], "outputs": []}])
    with pytest.raises(ValueError, match="2 programs but 1 test sets"):
        scorer.score_batch(["a", "b"], [SUM])


def test_cache_makes_repeated_programs_free(scorer):
    before = scorer.misses
    results = scorer.score_batch(["a, b = map(int, input().split()); print(a * b)"] * 4, [SUM] * 4)
    assert scorer.misses == before + 1 and len({r.status for r in results}) == 1
    scorer.score_batch(["a, b = map(int, input().split()); print(a * b)"], [json.dumps(SUM)])
    assert scorer.misses == before + 1  # same tests as a JSON string: same key


def test_execution_reward_reads_the_tests_column(scorer):
    reward = ExecutionReward(scorer=scorer)
    responses = ["```python\na, b = map(int, input().split())\nprint(a + b)\n```", "print(", "no code at all"]
    seqs, mask = torch.zeros(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.bool)
    scores = reward(["p"] * 3, responses, seqs, mask, columns={"tests": [SUM, SUM, SUM], "difficulty": ["x"] * 3})
    assert scores.dtype == torch.float32 and scores.tolist() == pytest.approx([1.0, -1.0, -1.0])
    assert reward.stats["code/passed"] == pytest.approx(1 / 3) and reward.stats["code/isolated_network"] == 1.0
    with pytest.raises(ValueError, match="needs each prompt row's 'tests' column"):
        reward(["p"], ["x"], seqs[:1], mask[:1])
    strict = ExecutionReward(scorer=scorer, extract="fenced")
    assert strict(["p"], ["print(3)"], seqs[:1], mask[:1], columns={"tests": [SUM]}).tolist() == [-1.0]


def test_named_reward_is_registered():
    fn = REWARD_FUNCTIONS["apps_execution"]
    assert fn(["p"], ["a, b = map(int, input().split())\nprint(a + b)"], tests=[SUM]) == pytest.approx([1.0])
    assert score_program("print(", SUM).status == "compile_error"
    with pytest.raises(ValueError, match="needs the prompt rows' 'tests' column"):
        fn(["p"], ["print(1)"])


def test_ppo_runs_end_to_end_with_the_execution_reward(tmp_path):
    """Two PPO steps of a tiny random policy on the built-in problems, scored by the named execution reward."""
    from otalign.models.tiny import tiny_causal_lm, tiny_tokenizer
    from otalign.trainers import PPOConfig, PPOTrainer, read_metrics

    tokenizer = tiny_tokenizer()
    config = PPOConfig(
        output_dir=str(tmp_path),
        prompts=apps_mini_path(),
        reward_fn="apps_execution",
        max_steps=2,
        per_device_train_batch_size=4,
        response_length=6,
        max_prompt_length=120,
        progress_bar=False,
        save_model=False,
    )
    policy, ref = tiny_causal_lm(tokenizer, seed=0), tiny_causal_lm(tokenizer, seed=0)
    PPOTrainer(config, policy=policy, ref_model=ref, tokenizer=tokenizer).train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(-1.0 <= r["reward/mean"] <= 1.0 for r in rows)  # random text: compile errors (-1) mostly


def test_harness_is_restarted_after_it_dies(scorer):
    program = "a, b = map(int, input().split())\nprint(a + b)  # restart"
    scorer.sandbox.run("print(1)", ["\n"])
    for harness in scorer.sandbox._harnesses.values():
        if harness.proc is not None:
            harness.proc.kill()
            harness.proc.wait()
    assert scorer.score(program, SUM).status == "passed"


def test_degraded_isolation_still_judges_and_kills_leftovers():
    """Without namespaces or a uid switch (other platforms, no root): same verdicts; a daemon that escaped its
    session is killed by the harness (a subreaper) and the program scored a runtime error."""
    config = SandboxConfig(timeout=1.0, allow_unsandboxed_network=True, uid_base=63000)
    degraded = CodeScorer(config=config, workers=1, cache_size=0)
    degraded.sandbox.isolation = dict.fromkeys(degraded.sandbox.isolation, False)
    daemon = (
        "import os, sys, time\nif os.fork() == 0:\n    os.setsid()\n    pid = os.fork()\n    if pid == 0:\n"
        "        time.sleep(60)\n    print('daemon', pid, file=sys.stderr, flush=True)\n    os._exit(0)\n"
        "time.sleep(0.1)\na, b = map(int, input().split())\nprint(a + b)\n"
    )
    try:
        results = degraded.score_batch(
            ["a, b = map(int, input().split())\nprint(a + b)", "print(", "while True: pass"], [SUM] * 3
        )
        assert [r.status for r in results] == ["passed", "compile_error", "timeout"]
        runs = degraded.sandbox.run(daemon, ["1 2\n"])
        pid = int(runs[0].stderr.split()[1])
        assert runs[0].outcome == "leftover_process" and judge(runs, {**SUM, "fn_name": None}).status == "runtime_error"
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        degraded.close()


def test_harness_failing_mid_program_is_that_programs_runtime_error():
    """A harness killed while it runs a program (by the host, say) is that program's runtime error, not an
    exception in the caller; the next program gets a fresh harness."""
    single = CodeScorer(config=SandboxConfig(timeout=2.0), workers=1, cache_size=0)
    try:
        assert single.score("print(1)", {"inputs": [""], "outputs": ["1"]}).status == "passed"  # harness started
        (harness,) = single.sandbox._harnesses.values()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        pending = pool.submit(single.score, "import time\ntime.sleep(1.5)\nprint(3)", SUM)
        time.sleep(0.5)
        harness.proc.kill()
        result = pending.result(timeout=30)
        pool.shutdown()
        assert result.status == "runtime_error" and "sandbox harness" in result.detail, result
        assert single.score("a, b = map(int, input().split())\nprint(a + b)", SUM).status == "passed"
    finally:
        single.close()
