"""An append-only on-disk cache of judge answers, keyed by a hash of the request, that survives interruption.

Each answer is one JSON line ``{"key": ..., "value": ...}`` appended and flushed as soon as it arrives, so a
run killed mid-way keeps everything it paid for; a half-written last line (killed during the write) is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def request_key(request: dict) -> str:
    """SHA-256 of the request's canonical JSON (sorted keys): equal requests get equal keys."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class ResponseCache:
    """``key -> str`` answers stored in the JSONL file ``path`` (created on first write)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.entries: dict[str, str] = {}
        text = self.path.read_text(encoding="utf-8") if self.path.is_file() else ""
        self.torn = bool(text) and not text.endswith("\n")  # the next write must start on a fresh line
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted write
            self.entries[row["key"]] = row["value"]

    def get(self, key: str) -> str | None:
        return self.entries.get(key)

    def put(self, key: str, value: str) -> None:
        """Store and append ``value`` under ``key`` (flushed to disk before returning)."""
        self.entries[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("\n" * self.torn + json.dumps({"key": key, "value": value}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.torn = False
