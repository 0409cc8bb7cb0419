"""A judge behind an OpenAI-compatible ``/chat/completions`` endpoint (the paper's GPT-4 judge), standard library only.

Robust to a flaky or rate-limited service: every request has a timeout; timeouts, connection errors, HTTP 429
and 5xx are retried with exponential backoff (honouring a numeric ``Retry-After``), but a host that cannot be
reached at all (no network, an unknown name) raises :class:`HostUnreachable` at once; a client-side rate limit
spaces requests; answers go to an on-disk :class:`~otalign.eval.cache.ResponseCache` keyed by the request
(URL, model, messages, sampling settings; never the API key), so a resumed evaluation pays only for what
it has not asked yet, and a request made twice (same prompt, answers and order) is paid once.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

from .cache import ResponseCache, request_key
from .judges import Judge, Judgement
from .parsing import parse_verdict
from .templates import render_judge_prompt


class JudgeError(RuntimeError, OSError):
    """The endpoint failed for good: a non-retryable HTTP error, a bad response, or retries exhausted (an
    ``OSError`` too: the command line reports it in one line)."""


class HostUnreachable(JudgeError):
    """The endpoint's host cannot be reached at all: its name does not resolve (no network, or a wrong name) or
    the network is down; never retried."""


UNREACHABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN})


def _unreachable(err: OSError) -> bool:
    """Whether a request's error means the host cannot be reached at all (retrying cannot help)."""
    reason = getattr(err, "reason", err)
    return isinstance(reason, socket.gaierror) or getattr(reason, "errno", None) in UNREACHABLE_ERRNOS


class RateLimiter:
    """Spaces calls at least ``1 / requests_per_second`` apart (None or 0: no limit)."""

    def __init__(self, requests_per_second: float | None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self.sleep = sleep
        self.last = -float("inf")

    def wait(self) -> None:
        delay = self.last + self.interval - time.monotonic()
        if delay > 0:
            self.sleep(delay)
        self.last = time.monotonic()


class HTTPJudge(Judge):
    """Pairwise judge through ``POST {base_url}/chat/completions``.

    Args:
        base_url: e.g. ``https://api.openai.com/v1`` or a local server's ``http://127.0.0.1:8000/v1``.
        model: the model name sent in the request.
        api_key: bearer token; None reads the environment variable ``api_key_env`` (unset: no header).
        template: ``summarization``, ``helpfulness`` or a format string (see :mod:`otalign.eval.templates`).
        timeout: seconds per request.
        max_retries: retries after the first attempt.
        backoff: first retry delay in seconds, doubled each retry, capped at ``max_backoff``.
        requests_per_second: client-side rate limit (None: none).
        cache_path: JSONL answer cache (None: no cache).
        temperature, max_tokens: sampling settings sent with the request.
        sleep: the sleep function (waits between retries and for the rate limit).
    """

    RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        template: str = "helpfulness",
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        requests_per_second: float | None = None,
        cache_path: str | os.PathLike | None = None,
        temperature: float = 0.0,
        max_tokens: int = 256,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.template = model, template
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.limiter = RateLimiter(requests_per_second, sleep)
        self.cache = ResponseCache(cache_path) if cache_path is not None else None
        self.temperature, self.max_tokens = temperature, max_tokens
        self.sleep = sleep
        self.name = f"http:{model}"

    def judge(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[Judgement]:
        out = []
        for p, a, b in zip(prompts, first, second, strict=True):
            text = self.complete(render_judge_prompt(self.template, p, a, b))
            out.append(Judgement(parse_verdict(text), text))
        return out

    def complete(self, content: str) -> str:
        """The model's answer to one user message (from the cache when this exact request was made before)."""
        request = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        key = request_key({"url": self.url, **request})
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            return cached
        answer = self._post(request)
        if self.cache is not None:
            self.cache.put(key, answer)
        return answer

    def _post(self, request: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        body = json.dumps(request).encode("utf-8")
        last_error, last_retry_after = "", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.sleep(self._delay(attempt, last_retry_after))
                last_retry_after = None
            self.limiter.wait()
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(self.url, data=body, headers=headers, method="POST"), timeout=self.timeout
                ) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                if err.code not in self.RETRY_STATUS:
                    raise JudgeError(f"{self.url}: HTTP {err.code}: {detail}") from None
                last_error, last_retry_after = f"HTTP {err.code}: {detail}", err.headers.get("Retry-After")
            except (TimeoutError, urllib.error.URLError, ConnectionError) as err:
                if _unreachable(err):
                    host = urllib.parse.urlsplit(self.url).hostname
                    reason = getattr(getattr(err, "reason", err), "strerror", None) or getattr(err, "reason", err)
                    raise HostUnreachable(
                        f"{self.url}: cannot reach {host} ({reason}): no network, or a wrong host name; not retried"
                    ) from None
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise JudgeError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last_error}")

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before retry ``attempt`` (1-based): the server's ``Retry-After`` if numeric, else backoff."""
        try:
            if retry_after is not None:
                return min(float(retry_after), self.max_backoff)
        except ValueError:
            pass
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff)

    def _content(self, raw: bytes) -> str:
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"{self.url}: not a chat-completions response: {raw[:300]!r}") from None
        if not isinstance(content, str):
            raise JudgeError(f"{self.url}: message content is not a string: {content!r:.300}")
        return content
