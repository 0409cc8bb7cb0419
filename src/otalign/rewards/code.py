"""Execution reward for code generation (the WPR paper's APPS setting): run the program against the problem's tests.

One entry point, used by the reward, the evaluation and the tests::

    score_program(program, tests) -> CodeResult(reward, n_pass, n_fail, status, ...)
    score_programs(programs, tests_per_program) -> list[CodeResult]      # a rollout batch, on a worker pool

``tests`` is the APPS form ``{"inputs": [...], "outputs": [...], "fn_name": optional}`` (a dict or its JSON
string). Programs run in :class:`~otalign.rewards.sandbox.Sandbox` (one contained process per test); the
expected outputs stay in this process.

Verdicts (the APPS reference evaluator's rules, with the differences noted):

- standard input/output (no ``fn_name``): the test's input is the program's stdin (a list of lines is joined with
  newlines); the output passes when its non-empty lines, split on whitespace, equal the expected ones token by
  token (trailing spaces, blank lines and line endings are ignored). Numbers: when the expected token is an
  integer (``[-+]?digits``) the output token must be the same number exactly (``3``, ``+3`` or ``3.0`` for ``3``;
  never ``3.0000001``, and ``1000009000`` never for ``999999999``); when it is a decimal or exponent token, any
  numeric output within ``|out - expected| <= 1e-8 + 1e-5 |expected|`` (``numpy.allclose``'s tolerance) matches.
  The reference compares integers with that relative tolerance too, so ``print(a + b + 30)`` passed for an answer
  near 3.3 million; here it does not. The reference's last, order-insensitive comparison of token *sets* is not
  used: it accepts permuted (wrong) answers.
  A program that exits with status 0 (also through ``sys.exit(0)``) is judged by its output; any other status
  is a runtime error.
- call-based (``fn_name``): the program is run as a module (``__name__ != "__main__"``); the function is
  ``Solution().<fn_name>`` when the program defines ``class Solution``, else the top-level ``<fn_name>``; it is
  called with the test's input as positional arguments, its return value is serialised to JSON inside the
  sandbox (tuples become lists) and compared here with the expected value, or with its single element when the
  expected value is a one-element-wrapped list, as the reference does. Integers exactly (a float equal to the
  integer matches: ``2.0`` for ``2``), a finite expected float within the tolerance above, and ``bool`` is not a
  number: ``True`` never matches ``1`` nor ``False`` ``0``. No object of the program's reaches this process, so
  ``__eq__`` tricks cannot fake a pass. A program that exits or does not return is a runtime error; so is one
  that binds ``fn_name`` nowhere (refused before it runs).
- the result channel: the harness writes the return value as one JSON document on the program process's fd 3
  (call-based tests only; a stdin/stdout program has no fd 3). The program runs in that process and can write
  there too, so a channel that is not exactly one ``{"result": ...}`` (or ``{"unserializable": ...}``) document
  (two documents, garbage, invalid UTF-8, nesting or digits beyond the decoder's limits) is that test's runtime
  error, never an exception here. What a program can still do is report a value for a function it defines
  without returning it: no more than returning that value earns. Compile errors come on a pipe closed before the
  program's first line runs, so a program cannot forge one.
- a test that exceeds the wall clock or RLIMIT_CPU is a ``timeout``; one that prints more than the output cap,
  is killed by a signal, exits non-zero or leaves a process running after it exits is a runtime error, and so is
  one whose harness failed while running it (``outcome="sandbox_error"``: the harness is restarted).

Reward (the paper's adaptive compiler-based reward, Chai et al. 2025)::

    r = -1.0                                        the program does not compile
    r = -0.6                                        a test raised a runtime error or timed out
    r = -0.3 + 1.3 * n_pass / (n_pass + n_fail)     otherwise

``status`` is ``compile_error``, ``timeout`` (some test timed out), ``runtime_error``, ``passed`` (every test) or
``failed``. With ``stop_on_error`` (default) a program's remaining tests are skipped after its first runtime error
or timeout (the reward is then -0.6 whatever they do); ``n_pass``/``n_fail`` count the tests that ran.

Program extraction (``extract``): ``"auto"`` (default) takes the first fenced code block (```` ```python ````,
```` ```py ```` or bare ```` ``` ````) when the response has one, else the whole response; ``"fenced"`` requires
a block (no block: a compile error); ``"raw"`` runs the response as it is.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import math
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

import torch

from .base import Reward
from .sandbox import Sandbox, SandboxConfig, TestRun, default_workers

STATUSES = ("passed", "failed", "runtime_error", "timeout", "compile_error")
EXTRACT_MODES = ("auto", "fenced", "raw")
RTOL, ATOL = 1e-5, 1e-8
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")
_XCPU = 24  # SIGXCPU: RLIMIT_CPU exceeded


@dataclass(frozen=True)
class RewardScheme:
    """The paper's reward values (defaults) for each outcome; ``passed_fraction`` maps to ``base + scale * f``."""

    compile_error: float = -1.0
    runtime_error: float = -0.6
    base: float = -0.3
    scale: float = 1.3

    def __call__(self, status: str, n_pass: int, n_fail: int) -> float:
        if status == "compile_error":
            return self.compile_error
        if status in ("runtime_error", "timeout"):
            return self.runtime_error
        return self.base + self.scale * n_pass / max(n_pass + n_fail, 1)


@dataclass(frozen=True)
class CodeResult:
    """The verdict on one program.

    Attributes:
        reward: the :class:`RewardScheme` value.
        n_pass, n_fail: tests passed / failed among those run (a runtime error or timeout counts as failed).
        status: one of :data:`STATUSES`.
        verdicts: per test ``pass`` | ``fail`` | ``runtime_error`` | ``timeout`` | ``skipped``.
        detail: why the first non-passing test did not pass (error message tail), or "".
    """

    reward: float
    n_pass: int
    n_fail: int
    status: str
    verdicts: tuple[str, ...] = ()
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def extract_program(response: str, mode: str = "auto") -> str | None:
    """The program in ``response`` (see the module doc), or None when ``mode="fenced"`` finds no code block."""
    if mode not in EXTRACT_MODES:
        raise ValueError(f"extract must be one of {EXTRACT_MODES}, got {mode!r}")
    if mode == "raw":
        return response
    match = _FENCE.search(response)
    if match:
        return match.group(1)
    return None if mode == "fenced" else response


def parse_tests(tests: Mapping | str, where: str = "tests") -> dict:
    """``{"inputs", "outputs", "fn_name"}`` from a dict or a JSON string in the APPS form, validated.

    Raises:
        ValueError: naming ``where`` and the field at fault.
    """
    from otalign.data.apps import apps_tests
    from otalign.data.conversion import RowError

    if isinstance(tests, Mapping):
        tests = json.dumps(dict(tests))
    try:
        return apps_tests({"input_output": tests})
    except RowError as err:
        raise ValueError(f"{where}: {err.detail}") from None


def _lines(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.strip()]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= ATOL + RTOL * abs(b)


def _token_match(out: str, expected: str) -> bool:
    """An integer token matches only the same number exactly (``3``, ``3.0``, ``+3``, never ``3.00001``); a
    decimal or exponent token matches any number within the float tolerance."""
    if out == expected:
        return True
    if not (_NUMBER.fullmatch(out) and _NUMBER.fullmatch(expected)):
        return False
    if _INTEGER.fullmatch(expected):
        return Decimal(out) == Decimal(expected)  # exact; Decimal never expands a huge exponent
    return _close(float(out), float(expected))


def stdio_match(output: str, expected: str | list) -> bool:
    """Whether a program's stdout matches the expected output (whitespace-tolerant lines, numeric tolerance)."""
    if isinstance(expected, list):
        expected = "\n".join(map(str, expected))
    got, want = _lines(output), _lines(str(expected))
    if got == want:
        return True
    if len(got) != len(want) or any(len(g) != len(w) for g, w in zip(got, want, strict=False)):
        return False
    return all(_token_match(g, w) for gl, wl in zip(got, want, strict=False) for g, w in zip(gl, wl, strict=False))


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _value_match(got, want) -> bool:
    if isinstance(got, bool) or isinstance(want, bool):  # bool is not int: True never matches 1
        return type(got) is type(want) and got == want
    if _is_number(got) and _is_number(want):
        if isinstance(want, int) or not math.isfinite(want):
            return got == want  # exact (Python compares int with float exactly): 3.0 matches 3, 3.0000001 not
        try:  # a finite float expected: within the tolerance (never for inf or nan)
            return _close(float(got), want)
        except OverflowError:  # an int too large for a float is far from any finite float
            return False
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_value_match(g, w) for g, w in zip(got, want, strict=False))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_value_match(got[k], want[k]) for k in got)
    return got == want


def call_match(value, expected) -> bool:
    """Whether a call-based test's (JSON-decoded) return value matches the expected value."""
    if _value_match(value, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and _value_match(value, expected[0])


def _verdict(run: TestRun, expected, call_based: bool) -> tuple[str, str]:
    if run.outcome == "timeout" or (run.outcome == "signaled" and run.signal == _XCPU):
        return "timeout", "time limit exceeded"
    if run.outcome == "output_limit":
        return "runtime_error", "output limit exceeded"
    if run.outcome == "leftover_process":
        return "runtime_error", "left a process running after it exited"
    if run.outcome != "exited" or run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}, signal {run.signal}"]
        return "runtime_error", tail[0][-300:]
    if not call_based:
        return ("pass", "") if stdio_match(run.stdout, expected) else ("fail", "wrong output")
    try:
        reported = json.loads(run.channel) if run.channel else {}
    except (ValueError, RecursionError):  # not one JSON document: the program wrote on the channel itself
        return "runtime_error", "malformed result channel"
    if not isinstance(reported, dict) or set(reported) not in ({"result"}, {"unserializable"}):
        return "runtime_error", "did not return a value" if reported == {} else "malformed result channel"
    if "unserializable" in reported:
        return "runtime_error", "returned an unserialisable value"
    try:
        ok = call_match(reported["result"], expected)
    except RecursionError:
        return "runtime_error", "malformed result channel"
    return ("pass", "") if ok else ("fail", "wrong return value")


def judge(runs: list[TestRun], tests: dict, scheme: RewardScheme | None = None) -> CodeResult:
    """The :class:`CodeResult` of a program's test runs (in order; fewer than the tests when it stopped early)."""
    scheme = scheme or RewardScheme()
    n_tests = len(tests["inputs"])
    if runs and runs[0].compile_error is not None:
        detail = runs[0].compile_error
        return CodeResult(scheme("compile_error", 0, 0), 0, 0, "compile_error", ("skipped",) * n_tests, detail)
    verdicts, detail = [], ""
    for run, expected in zip(runs, tests["outputs"], strict=False):
        verdict, why = _verdict(run, expected, tests["fn_name"] is not None)
        verdicts.append(verdict)
        detail = detail or why
    verdicts += ["skipped"] * (n_tests - len(verdicts))
    n_pass = verdicts.count("pass")
    n_fail = sum(v in ("fail", "runtime_error", "timeout") for v in verdicts)
    if "timeout" in verdicts:
        status = "timeout"
    elif "runtime_error" in verdicts:
        status = "runtime_error"
    else:
        status = "passed" if n_pass == n_tests else "failed"
    return CodeResult(scheme(status, n_pass, n_fail), n_pass, n_fail, status, tuple(verdicts), detail)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


class CodeScorer:
    """Scores programs in a :class:`Sandbox` on a pool of ``workers`` threads (each drives one contained run),
    with an LRU cache keyed by (program hash, tests hash): a program repeated in a group costs nothing.

    Args:
        sandbox: where programs run (default: a new one with ``config``).
        config: :class:`SandboxConfig` of the default sandbox.
        workers: pool size (default: the CPU count).
        scheme: the reward values.
        cache_size: results kept (0 disables the cache).
    """

    def __init__(
        self,
        sandbox: Sandbox | None = None,
        *,
        config: SandboxConfig | None = None,
        workers: int | None = None,
        scheme: RewardScheme | None = None,
        cache_size: int = 65536,
    ) -> None:
        self.workers = workers or default_workers()
        self._owns_sandbox = sandbox is None
        self.sandbox = sandbox or Sandbox(config, slots=self.workers)
        self.scheme = scheme or RewardScheme()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CodeResult] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="otalign-code")
        self.hits = self.misses = 0

    def score(self, program: str | None, tests: Mapping | str) -> CodeResult:
        """One program (None: nothing extracted, a compile error)."""
        return self.score_batch([program], [tests])[0]

    def score_batch(self, programs: Sequence[str | None], tests: Sequence[Mapping | str]) -> list[CodeResult]:
        """Every program against its own tests, all at once on the pool; results in input order.

        Raises:
            ValueError: lengths differ, or a malformed ``tests`` entry (named by its batch index).
            SandboxError: the sandbox failed (not the programs).
        """
        if len(programs) != len(tests):
            raise ValueError(f"{len(programs)} programs but {len(tests)} test sets")
        parsed = [parse_tests(t, f"tests of batch row {i}") for i, t in enumerate(tests)]
        keys = [
            (_digest(p) if p is not None else "", _digest(json.dumps(t, sort_keys=True)))
            for p, t in zip(programs, parsed, strict=False)
        ]
        results: dict[tuple[str, str], CodeResult] = {}
        futures = {}
        with self._lock:
            for key, program, t in zip(keys, programs, parsed, strict=False):
                if key in results or key in futures:
                    self.hits += 1
                    continue
                if key in self._cache:
                    self._cache.move_to_end(key)
                    results[key] = self._cache[key]
                    self.hits += 1
                elif program is None:
                    results[key] = CodeResult(self.scheme.compile_error, 0, 0, "compile_error", (), "no code block")
                else:
                    self.misses += 1
                    futures[key] = self._pool.submit(self._run, program, t)
        for key, future in futures.items():
            results[key] = future.result()
        with self._lock:
            for key, result in results.items():
                if self.cache_size:
                    self._cache[key] = result
                    self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return [results[key] for key in keys]

    def _run(self, program: str, tests: dict) -> CodeResult:
        return judge(self.sandbox.run(program, tests["inputs"], fn_name=tests["fn_name"]), tests, self.scheme)

    def close(self) -> None:
        """Stop the pool (and the sandbox's harness processes when this scorer made the sandbox)."""
        self._pool.shutdown(wait=True)
        if self._owns_sandbox:
            self.sandbox.close()


@functools.lru_cache(maxsize=1)
def default_scorer() -> CodeScorer:
    """The shared scorer of :func:`score_program` and the named reward (created on first use).
    ``OTALIGN_ALLOW_UNSANDBOXED_NETWORK=1`` lets it run where the network cannot be isolated."""
    allow = os.environ.get("OTALIGN_ALLOW_UNSANDBOXED_NETWORK", "") not in ("", "0", "false")
    scorer = CodeScorer(config=SandboxConfig(allow_unsandboxed_network=allow))
    print(f"apps_execution sandbox: {scorer.sandbox.describe()}", file=sys.stderr, flush=True)
    return scorer


def score_program(program: str, tests: Mapping | str, *, scorer: CodeScorer | None = None) -> CodeResult:
    """Run ``program`` against ``tests`` (APPS form) in the sandbox; its :class:`CodeResult`."""
    return (scorer or default_scorer()).score(program, tests)


def score_programs(
    programs: Sequence[str], tests: Sequence[Mapping | str], *, scorer: CodeScorer | None = None
) -> list[CodeResult]:
    """:func:`score_program` for a batch, run in parallel on the scorer's worker pool."""
    return (scorer or default_scorer()).score_batch(programs, tests)


class ExecutionReward(Reward):
    """The execution reward as a :class:`~otalign.rewards.Reward`: extracts each response's program and scores
    it against its prompt row's ``tests`` column (``columns[column]``, a dict or JSON string per row).

    After each call, :attr:`last_results` holds the :class:`CodeResult` list and :attr:`stats` the batch's
    ``code/*`` metrics (pass rate, status shares) plus ``code/isolated_network`` (1.0 or 0.0).

    Args:
        extract: program extraction, ``auto`` | ``fenced`` | ``raw`` (see the module doc).
        column: the prompt-row field holding the tests.
        scorer: the :class:`CodeScorer` (default: a new one from ``config``, ``workers``, ``scheme``).
    """

    name = "apps_execution"

    def __init__(
        self,
        *,
        extract: str = "auto",
        column: str = "tests",
        scorer: CodeScorer | None = None,
        config: SandboxConfig | None = None,
        workers: int | None = None,
        scheme: RewardScheme | None = None,
    ) -> None:
        extract_program("", extract)  # validates the mode
        self.extract, self.column = extract, column
        self.scorer = scorer or CodeScorer(config=config, workers=workers, scheme=scheme)
        self.last_results: list[CodeResult] = []
        self.stats: dict[str, float] = {}

    def score(self, responses: Sequence[str], tests: Sequence[Mapping | str]) -> list[CodeResult]:
        """Results of ``responses`` against their ``tests``; updates :attr:`last_results` and :attr:`stats`."""
        programs = [extract_program(r, self.extract) for r in responses]
        results = self.scorer.score_batch(programs, tests)
        self.last_results = results
        n = max(len(results), 1)
        self.stats = {f"code/{s}": sum(r.status == s for r in results) / n for s in STATUSES}
        self.stats["code/pass_rate"] = sum(r.n_pass / max(r.n_pass + r.n_fail, 1) for r in results) / n
        self.stats["code/isolated_network"] = float(self.scorer.sandbox.isolation["net"])
        return results

    def __call__(self, prompts, responses, sequences, attention_mask, columns=None) -> torch.Tensor:
        """(B,) float32 rewards on ``sequences.device``.

        Raises:
            ValueError: ``columns`` lacks the tests column, or its length differs from the batch.
        """
        if not columns or self.column not in columns:
            have = sorted(columns) if columns else []
            raise ValueError(
                f"reward {self.name!r} needs each prompt row's {self.column!r} column (prompt rows carry: {have})"
            )
        tests = list(columns[self.column])
        if len(tests) != len(responses):
            raise ValueError(f"{len(tests)} {self.column!r} entries for {len(responses)} responses")
        rewards = [r.reward for r in self.score(list(responses), tests)]
        return torch.tensor(rewards, dtype=torch.float32, device=sequences.device)


@functools.lru_cache(maxsize=1)
def _named_reward() -> ExecutionReward:
    return ExecutionReward(scorer=default_scorer())


def apps_execution_reward(prompts: list, responses: list[str], tests: Sequence | None = None) -> list[float]:
    """The named reward ``apps_execution``: ``fn(prompts, responses, tests)`` with ``tests`` the prompt rows'
    column; the paper's reward per response (see the module doc)."""
    if tests is None:
        raise ValueError("reward 'apps_execution' needs the prompt rows' 'tests' column (an APPS-form prompt file)")
    return [r.reward for r in _named_reward().score(responses, tests)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples of which ``c`` passed (Chen et al., 2021):
    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
