"""Running untrusted programs: one contained child process per test, never in the caller's process.

:class:`Sandbox` starts the stdlib-only harness (``_sandbox_harness.py``) once per program, as
``python -I -S harness`` in a new session and process group, with ``close_fds``, a minimal environment (``PATH``,
``LANG`` only: no inherited tokens), stdin carrying the job and a fresh temporary working directory that is
deleted afterwards. The harness runs each test in its own process and reports raw outputs; the comparison with
the expected outputs happens here, in the caller, and the expected outputs never leave it.

Guarantees, by platform (what :func:`detect_isolation` finds is reported by :meth:`Sandbox.describe`):

=============================  =================================================  ==============================
guarantee                      Linux as root (user, pid, mount, net namespaces)    elsewhere / missing pieces
=============================  =================================================  ==============================
no network                     new network namespace (no interface is up)          refused unless
                                                                                   ``allow_unsandboxed_network``
no writes outside the workdir  every mount read-only in a private mount namespace;  without a mount namespace only
                               the workdir is a private tmpfs of ``workdir_mb``;    file permissions (uid below)
                               /tmp, /var/tmp, /dev/shm are shown empty
no reads of private files      a separate unprivileged uid per worker slot          same user as the caller
                               (``uid_base + slot``): root-only files unreadable;
                               its /proc shows only its own processes. World-
                               readable files (/etc, /usr, the interpreter, a
                               world-readable project) remain readable
no process outlives its test   pid namespace: its init exiting kills the rest       harness is a subreaper and kills
                                                                                   orphans; a daemon that escapes
                                                                                   its session may survive
fork bombs                     RLIMIT_NPROC on the slot's own uid                   RLIMIT_NPROC (not enforced for
                                                                                   root); the wall clock bounds it
CPU, memory, file size, fds    RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE   same (POSIX)
wall clock, output size        the harness kills the test's process group at        same
                               ``timeout`` or at ``output_mb``; this process kills
                               the harness's group at the job's total deadline
=============================  =================================================  ==============================

Both the harness and the contained programs run the interpreter given by ``python`` (default: this one) without
``site``: the programs see the standard library only. Modules in ``preload`` are imported by the harness before
it forks (the contained uid may be unable to read the interpreter's library directory, e.g. under /root);
importing another module fails unless the library is world-readable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

HARNESS = Path(__file__).with_name("_sandbox_harness.py")
PRELOAD = tuple(
    [
        "array",
        "bisect",
        "cmath",
        "collections",
        "collections.abc",
        "copy",
        "dataclasses",
        "encodings.idna",
        "datetime",
        "decimal",
        "enum",
        "fractions",
        "functools",
        "hashlib",
        "heapq",
        "io",
        "itertools",
        "json",
        "math",
        "numbers",
        "operator",
        "os",
        "queue",
        "random",
        "re",
        "socket",
        "statistics",
        "string",
        "struct",
        "sys",
        "textwrap",
        "threading",
        "time",
        "typing",
        "unicodedata",
    ]
)
"""Standard-library modules competitive-programming solutions import, preloaded in the harness."""


class SandboxError(RuntimeError):
    """The sandbox itself failed (isolation unavailable, harness crashed): not a verdict on the program."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of :class:`Sandbox` (per test unless stated)."""

    timeout: float = field(default=4.0, metadata={"help": "wall-clock seconds per test (APPS: 4)"})
    cpu_seconds: int | None = field(default=None, metadata={"help": "RLIMIT_CPU per test; None: ceil(timeout)"})
    memory_mb: int = field(default=1024, metadata={"help": "RLIMIT_AS (address space) per test process, MiB"})
    file_size_mb: int = field(default=16, metadata={"help": "RLIMIT_FSIZE: largest file a test may write, MiB"})
    workdir_mb: int = field(default=32, metadata={"help": "size of the private tmpfs working directory, MiB"})
    max_processes: int = field(default=16, metadata={"help": "RLIMIT_NPROC of the contained uid"})
    max_open_files: int = field(default=64, metadata={"help": "RLIMIT_NOFILE per test process"})
    output_mb: float = field(default=4.0, metadata={"help": "stdout (and result) cap per test; more is an error"})
    uid_base: int = field(default=61000, metadata={"help": "contained uids are uid_base + slot (+1024 * LOCAL_RANK)"})
    allow_unsandboxed_network: bool = field(
        default=False, metadata={"help": "run even where no network namespace can be created"}
    )
    python: str = field(default=sys.executable, metadata={"help": "interpreter of the harness and the programs"})
    preload: tuple[str, ...] = field(default=PRELOAD, metadata={"help": "modules the harness preloads"})
    stop_on_error: bool = field(
        default=True, metadata={"help": "stop a program's tests at its first runtime error or timeout"}
    )

    def __post_init__(self) -> None:
        for name in ("timeout", "memory_mb", "file_size_mb", "workdir_mb", "max_processes", "max_open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.output_mb <= 0:
            raise ValueError(f"SandboxConfig.output_mb must be > 0, got {self.output_mb}")


@dataclass(frozen=True)
class TestRun:
    """What one test's process did (raw; :mod:`otalign.rewards.code` judges it).

    Attributes:
        outcome: ``exited`` | ``signaled`` | ``timeout`` | ``output_limit`` | ``leftover_process`` (it exited
            leaving a process running; that process was killed).
        returncode: exit status (None when killed by a signal). signal: the signal number, or None.
        stdout: its standard output (UTF-8, undecodable bytes replaced), at most ``output_mb``.
        stderr: the first 4 KB of its standard error.
        channel: what it reported on its result channel: ``{"compile_error": msg}``, ``{"result": value}``
            (call-based tests) or empty.
        wall: seconds.
    """

    outcome: str
    returncode: int | None
    signal: int | None
    stdout: str
    stderr: str
    channel: str
    wall: float


def _minimal_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _run_harness(job: dict, python: str, deadline: float) -> tuple[int, str, str]:
    """Run the harness on ``job`` in a fresh temporary directory; ``(returncode, stdout, stderr)``."""
    workdir = tempfile.mkdtemp(prefix="otalign-sandbox-")
    try:
        uid = job.get("uid")
        if uid is not None and job.get("isolation", {}).get("user", True) and os.geteuid() == 0:
            os.chown(workdir, uid, uid)  # without a mount namespace, the program writes here as its uid
        proc = subprocess.Popen(
            [python, "-I", "-S", str(HARNESS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_minimal_env(),
            close_fds=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(json.dumps(job).encode(), timeout=deadline)
        except subprocess.TimeoutExpired:
            _kill_session(proc)
            out, err = proc.communicate()
            return -signal.SIGKILL, out.decode("utf-8", "replace"), "harness deadline exceeded"
        finally:
            _kill_session(proc)
        return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@functools.lru_cache(maxsize=8)
def detect_isolation(python: str = sys.executable, uid: int = 61000) -> dict[str, bool]:
    """Which isolation this machine allows, probed once per (interpreter, uid) in throwaway children:
    ``{"net", "mount", "pid", "user"}`` -> bool, plus ``"<name>_error"`` messages for what failed."""
    if not sys.platform.startswith("linux"):
        return {"net": False, "mount": False, "pid": False, "user": False, "platform_error": sys.platform}
    code, out, err = _run_harness({"probe": True, "uid": uid}, python, deadline=60.0)
    if code != 0:
        raise SandboxError(f"the sandbox probe failed (exit {code}): {err.strip()[-2000:]}")
    found = json.loads(out)
    if os.geteuid() != 0:
        found["user"] = False  # setuid to another uid needs root
    return found


def describe(isolation: dict) -> str:
    """One line naming the active isolation, e.g. for a run's log."""
    parts = [
        "network: " + ("own network namespace" if isolation["net"] else "NOT isolated"),
        "files: " + ("read-only view + private tmpfs" if isolation["mount"] else "permissions only"),
        "processes: " + ("own pid namespace" if isolation["pid"] else "subreaper cleanup"),
        "user: " + ("separate unprivileged uid per worker" if isolation["user"] else "same user as the trainer"),
    ]
    return "; ".join(parts)


class Sandbox:
    """Runs programs against test inputs under :class:`SandboxConfig`; thread-safe (one uid per concurrent run).

    Args:
        config: limits and isolation.
        slots: the most runs at once (each gets its own uid); the caller's pool should not exceed it.

    Raises:
        SandboxError: no network namespace can be created and ``allow_unsandboxed_network`` is false.
    """

    def __init__(self, config: SandboxConfig | None = None, *, slots: int | None = None) -> None:
        self.config = config or SandboxConfig()
        self.slots = slots or default_workers()
        base = self.config.uid_base + 1024 * int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.isolation = {k: v for k, v in detect_isolation(self.config.python, base).items() if k in ISOLATION}
        if not self.isolation["net"] and not self.config.allow_unsandboxed_network:
            errors = detect_isolation(self.config.python, base).get("net_error", "not Linux")
            raise SandboxError(
                f"cannot isolate the network of executed programs on this machine ({errors}); pass "
                "allow_unsandboxed_network=True (env OTALIGN_ALLOW_UNSANDBOXED_NETWORK=1 for the named reward) "
                "to run them anyway"
            )
        self._uids: queue.Queue[int] = queue.Queue()
        for slot in range(self.slots):
            self._uids.put(base + slot)
        self._lock = threading.Lock()
        logger.info("code sandbox: %s", describe(self.isolation))

    def describe(self) -> str:
        """The active isolation in words."""
        return describe(self.isolation)

    def run(self, program: str, inputs: list, *, fn_name: str | None = None) -> list[TestRun]:
        """Run ``program`` on each test input in turn (stdin text, or the argument list of ``fn_name`` for
        call-based tests); the runs in order, stopping early after a compile error (and, with
        ``stop_on_error``, after a runtime error or timeout).

        Raises:
            SandboxError: the sandbox could not be set up (never for anything the program does).
        """
        c = self.config
        uid = self._uids.get()
        try:
            job = {
                "program": program,
                "mode": "call" if fn_name else "stdio",
                "fn_name": fn_name,
                "inputs": list(inputs),
                "timeout": float(c.timeout),
                "cpu_seconds": c.cpu_seconds or max(1, int(-(-c.timeout // 1))),
                "memory_bytes": int(c.memory_mb) << 20,
                "file_bytes": int(c.file_size_mb) << 20,
                "workdir_bytes": int(c.workdir_mb) << 20,
                "max_processes": int(c.max_processes),
                "max_open_files": int(c.max_open_files),
                "output_bytes": int(c.output_mb * (1 << 20)),
                "uid": uid,
                "isolation": self.isolation,
                "stop_on_error": c.stop_on_error,
                "preload": list(c.preload),
            }
            deadline = len(job["inputs"]) * (c.timeout + 3.0) + 30.0
            code, out, err = _run_harness(job, c.python, deadline)
        finally:
            self._uids.put(uid)
        runs: list[TestRun] = []
        for line in out.splitlines():
            record = json.loads(line)
            if "setup_error" in record:
                raise SandboxError(f"could not contain the program: {record['setup_error']}")
            record.pop("index")
            runs.append(TestRun(**record))
        if code != 0:
            raise SandboxError(f"the sandbox harness failed (exit {code}): {err.strip()[-2000:]}")
        return runs


ISOLATION = ("net", "mount", "pid", "user")


def default_workers() -> int:
    """Worker count: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
