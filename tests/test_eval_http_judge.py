"""The OpenAI-compatible HTTP judge against a real HTTP server on 127.0.0.1 (ephemeral port, in a thread):
success, timeout, 429/500 with retry, non-retryable errors, and a resumed run that reuses its cache."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from otalign.eval import HTTPJudge, JudgeError, WinRate, compare


class Handler(BaseHTTPRequestHandler):
    """Plays the server's ``script`` (one action per request, then ``ok``): ``ok``, ``slow``, ``429``, ``500``,
    ``400``. An ``ok`` answer prefers the response containing "good" (helpfulness JSON format)."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
            action = server.script.pop(0) if server.script else "ok"
        if action == "slow":
            time.sleep(0.5)
            action = "ok"
        if action != "ok":
            self.send_response(int(action))
            if action == "429":
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "scripted failure"}}')
            return
        content = body["messages"][0]["content"]
        a = content.split("Response A:")[1].split("Response B:")[0]
        b = content.split("Response B:")[1]
        choice = "E" if ("good" in a) == ("good" in b) else ("A" if "good" in a else "B")
        answer = {
            "choices": [
                {"message": {"role": "assistant", "content": json.dumps({"comparison": "-", "choice": choice})}}
            ]
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.script, httpd.requests, httpd.lock = [], [], threading.Lock()
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def make_judge(server, **kwargs):
    sleeps = []
    options = {"timeout": 2.0, "max_retries": 3, "backoff": 0.01, "sleep": lambda s: (sleeps.append(s), time.sleep(s))}
    judge = HTTPJudge(server.base_url, "gpt-test", api_key="sk-test", **(options | kwargs))
    return judge, sleeps


def test_success_sends_the_template_and_parses_the_choice(server):
    judge, _ = make_judge(server)
    out = judge.judge(["How do I boil an egg?"], ["a good answer"], ["a bad answer"])
    assert [j.verdict for j in out] == ["A"]
    request = server.requests[0]
    assert request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "gpt-test"
    assert request["body"]["messages"][0]["content"].startswith("For the following query to a chatbot assistant")
    assert "Query: How do I boil an egg?" in request["body"]["messages"][0]["content"]


def test_429_and_500_are_retried_with_exponential_backoff(server):
    server.script = ["500", "503", "500"]
    judge, sleeps = make_judge(server, max_retries=3)
    assert judge.judge(["q"], ["bad"], ["good"])[0].verdict == "B"
    assert len(server.requests) == 4
    assert sleeps == pytest.approx([0.01, 0.02, 0.04])
    server.script = ["429"]
    judge, sleeps = make_judge(server)
    assert judge.judge(["q"], ["good"], ["good"])[0].verdict == "E"
    assert sleeps == [0.0]  # the server's Retry-After: 0


def test_timeout_is_retried(server):
    server.script = ["slow"]
    judge, sleeps = make_judge(server, timeout=0.2)
    assert judge.judge(["q"], ["good"], ["bad"])[0].verdict == "A"
    assert len(server.requests) == 2 and len(sleeps) == 1


def test_gives_up_after_max_retries_and_fails_fast_on_400(server):
    server.script = ["500"] * 10
    judge, _ = make_judge(server, max_retries=2)
    with pytest.raises(JudgeError, match="gave up after 3 attempts; last error: HTTP 500"):
        judge.judge(["q"], ["a"], ["b"])
    assert len(server.requests) == 3
    server.script = ["400"]
    with pytest.raises(JudgeError, match="HTTP 400"):
        make_judge(server)[0].judge(["q"], ["a"], ["b"])
    assert len(server.requests) == 4


def test_client_side_rate_limit_spaces_requests(server):
    judge, _ = make_judge(server, requests_per_second=20.0)
    start = time.monotonic()
    judge.judge(["q"] * 4, ["a", "b", "c", "d"], ["e", "f", "g", "h"])
    assert time.monotonic() - start >= 3 / 20.0


def test_interrupted_evaluation_resumes_from_its_cache(server, tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    prompts = [f"question {i}" for i in range(6)]
    xs = ["good answer"] * 3 + ["bad answer"] * 3
    ys = ["bad answer"] * 6
    server.script = ["ok", "ok", "ok", "400"]  # the 4th request fails for good: the run is interrupted
    with pytest.raises(JudgeError):
        compare(make_judge(server, cache_path=cache)[0], prompts, xs, ys, np.random.default_rng(0))
    assert len(server.requests) == 4
    assert len(cache.read_text().splitlines()) == 3
    with cache.open("a") as f:
        f.write('{"key": "half-writ')  # killed during a write: ignored on resume
    resumed = compare(make_judge(server, cache_path=cache)[0], prompts, xs, ys, np.random.default_rng(0))
    assert len(server.requests) == 4 + 3  # only the three unanswered comparisons are paid for
    assert WinRate.of(resumed).rate == pytest.approx((3 + 0.5 * 3) / 6)
    again = compare(make_judge(server, cache_path=cache)[0], prompts, xs, ys, np.random.default_rng(0))
    assert len(server.requests) == 7 and again == resumed  # a finished run costs nothing the second time


def test_otalign_eval_with_the_http_judge_resumes_from_its_default_cache(server, tmp_path, monkeypatch):
    from otalign.eval.config import EvalConfig
    from otalign.eval.run import run_eval

    prompts = [f"question {i}" for i in range(4)]
    files = []
    for name, answer in (("good", "a good answer"), ("bad", "a bad answer")):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p, "response": answer}) + "\n" for p in prompts))
        files.append(str(path))
    monkeypatch.setenv("JUDGE_KEY", "sk-env")
    config = EvalConfig(
        output_dir=str(tmp_path / "out"),
        generation_files=files,
        num_prompts=4,
        num_repeats=2,
        judge="http",
        judge_base_url=server.base_url,
        judge_model_name="gpt-test",
        judge_api_key_env="JUDGE_KEY",
        judge_backoff=0.01,
    )
    result = run_eval(config)
    assert result["judge"] == "http:gpt-test" and result["pairs"][0]["win_rate_mean"] == 1.0
    paid = len(server.requests)
    assert server.requests[0]["auth"] == "Bearer sk-env"
    # 2 repeats x 4 prompts; a comparison repeated with the same order is the same request, asked once
    assert 4 <= paid == len((tmp_path / "out" / "judge_cache.jsonl").read_text().splitlines()) <= 8
    run_eval(config)
    assert len(server.requests) == paid  # every answer came from the cache


def test_an_unreachable_host_is_not_retried(monkeypatch):
    """No network (a name that does not resolve, or ENETUNREACH): one ``HostUnreachable`` at once, no retries."""
    import errno
    import urllib.error
    import urllib.request

    from otalign.eval import HostUnreachable

    sleeps = []
    judge = HTTPJudge("http://no-such-host.invalid/v1", "gpt-test", max_retries=5, sleep=sleeps.append)
    with pytest.raises(HostUnreachable, match=r"cannot reach no-such-host\.invalid .*not retried"):
        judge.judge(["q"], ["a"], ["b"])
    calls = []

    def down(*args, **kwargs):
        calls.append(args)
        raise urllib.error.URLError(OSError(errno.ENETUNREACH, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", down)
    judge = HTTPJudge("https://api.example.com/v1", "gpt-test", max_retries=5, sleep=sleeps.append)
    with pytest.raises(HostUnreachable, match=r"cannot reach api\.example\.com \(Network is unreachable\)"):
        judge.judge(["q"], ["a"], ["b"])
    assert sleeps == [] and len(calls) == 1


def test_eval_with_an_unreachable_judge_is_one_line_naming_the_option(tmp_path, capsys):
    from otalign.cli import main

    files = []
    for name, answer in (("x", "yes"), ("y", "no")):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text(json.dumps({"prompt": "q", "response": answer}) + "\n")
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["eval", "--generation_files", *map(str, files), "--judge", "http"]
            + ["--judge_base_url", "http://no-such-host.invalid/v1", "--output_dir", str(tmp_path / "out")]
        )
    assert exit_info.value.code == 2 and time.monotonic() - start < 10  # five retries would sleep 31 s
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("otalign eval: error: --judge_base_url: http://no-such-host.invalid")
    assert not (tmp_path / "out" / "winrates.json").exists()
