"""Running untrusted programs: one contained child process per test, never in the caller's process.

:class:`Sandbox` starts the stdlib-only harness (``_sandbox_harness.py``) as ``python -I -S harness`` in a new
session and process group, with ``close_fds`` and a minimal environment (``PATH``, ``LANG`` only: no inherited
tokens), and sends it jobs (program + test inputs) as JSON lines. Each test runs with stdin from the test only and
a fresh working directory (a private tmpfs, gone with the test; without a mount namespace a temporary directory
deleted after the program). The harness runs each test in its own process and reports raw outputs; the comparison with
the expected outputs happens here, in the caller, and the expected outputs never leave it.

Guarantees, by platform (what :func:`detect_isolation` finds is reported by :meth:`Sandbox.describe`):

=============================  =================================================  ==============================
guarantee                      Linux as root (namespaces, uid, seccomp filter)     elsewhere / missing pieces
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
memory outside RLIMIT_AS       seccomp refuses memfd_create, memfd_secret, SysV    memfds and SysV shm unbounded
                               shm and message queues; RLIMIT_MSGQUEUE and         without the filter
                               RLIMIT_MEMLOCK are 0; the workdir tmpfs holds at
                               most ``workdir_mb``; /dev/shm is read-only. Not
                               bounded as a total: ``max_processes`` processes
                               of ``memory_mb`` each (a cgroup would be)
Unix sockets of the host       seccomp refuses socket(AF_UNIX) and AF_UNIX         read-only mounts do not stop
                               socketpairs other than SOCK_STREAM (a datagram      connect(): reachable
                               end could sendto() a path); abstract sockets
                               belong to the network namespace
no new namespaces              seccomp refuses unshare, setns and clone with a     user namespaces allowed where
                               CLONE_NEW* flag (no user namespace, so no           the host allows them
                               mounts); clone3 answers ENOSYS; io_uring, bpf,
                               userfaultfd, perf_event_open, keyrings refused
wall clock, output size        the harness kills the test's process group at        same
                               ``timeout`` or at ``output_mb``; this process kills
                               the harness's group at the job's total deadline
=============================  =================================================  ==============================

One harness process per worker slot stays up between programs (no interpreter start per program); it is
restarted when it dies, and killed with the :class:`Sandbox` (``close()``, or when it is collected). Both the
harness and the contained programs run the interpreter given by ``python`` (default: this one) without
``site``: the programs see the standard library only. Modules in ``preload`` are imported by the harness before
it forks (the contained uid may be unable to read the interpreter's library directory, e.g. under /root);
importing another module fails unless the library is world-readable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
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
            leaving a process running; that process was killed) | ``sandbox_error`` (the harness failed during
            this program's tests, e.g. killed by the host; ``stderr`` says how; the next run restarts it).
        returncode: exit status (None when killed by a signal). signal: the signal number, or None.
        stdout: its standard output (UTF-8, undecodable bytes replaced), at most ``output_mb``.
        stderr: the first 4 KB of its standard error.
        channel: what its process wrote on the result channel (call-based tests only): the harness's
            ``{"result": value}`` or ``{"unserializable": type name}`` JSON text after the call returned, or
            whatever the program wrote there itself (it runs in the same process; see :mod:`otalign.rewards.code`).
        wall: seconds.
        compile_error: why the program did not compile (``SyntaxError: ...``), reported before any of its code
            ran, on a pipe closed before it starts; None when it compiled.
    """

    outcome: str
    returncode: int | None
    signal: int | None
    stdout: str
    stderr: str
    channel: str
    wall: float
    compile_error: str | None = None


def _minimal_env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _start_harness(python: str) -> subprocess.Popen:
    return subprocess.Popen(
        [python, "-I", "-S", str(HARNESS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=tempfile.TemporaryFile(),  # noqa: SIM115 (read back only when the harness fails)
        cwd="/",
        env=_minimal_env(),
        close_fds=True,
        start_new_session=True,
    )


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError, ValueError):
        proc.stdin.close()
    proc.wait()
    proc.stdout.close()


def _stderr_tail(proc: subprocess.Popen) -> str:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        proc.stderr.seek(0)
        return proc.stderr.read()[-2000:].decode("utf-8", "replace").strip()
    return ""


class _Harness:
    """One long-lived harness process (one worker slot, one uid): sends jobs, reads their JSON lines back with a
    deadline and a byte cap, and is restarted after it dies or is killed."""

    def __init__(self, python: str, session: dict) -> None:
        self.python, self.session = python, session
        self.proc: subprocess.Popen | None = None
        self._buffer = bytearray()

    def _lines(self, deadline: float, cap: int):
        """JSON objects the harness writes until ``deadline`` (monotonic seconds); SandboxError on EOF/time/size."""
        fd = self.proc.stdout.fileno()
        size = 0
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    self.kill()
                    raise SandboxError(f"the sandbox harness wrote a malformed line: {line[:200]!r}")
                yield record
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.kill()
                raise SandboxError("the sandbox harness did not answer within its deadline")
            chunk = os.read(fd, 1 << 20)
            size += len(chunk)
            if not chunk or size > cap:
                why = "exited" if not chunk else "wrote more than its cap"
                tail = _stderr_tail(self.proc)
                self.kill()
                raise SandboxError(f"the sandbox harness {why}: {tail}")
            self._buffer += chunk

    def _send(self, message: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(message).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as err:
            tail = _stderr_tail(self.proc)
            self.kill()
            raise SandboxError(f"the sandbox harness is gone ({err}): {tail}") from None

    def start(self) -> None:
        self.proc = _start_harness(self.python)
        self._buffer.clear()
        self._send(self.session)
        answer = next(self._lines(time.monotonic() + 60.0, 1 << 20))
        if "setup_error" in answer:
            self.kill()
            raise SandboxError(f"could not set up the sandbox: {answer['setup_error']}")

    def run(self, job: dict, timeout: float) -> list[dict]:
        """The job's per-test records. A harness that cannot start raises :class:`SandboxError`; one that fails
        once started (killed, past the job's deadline, a malformed line) is killed (the next job restarts it) and
        the job ends with a ``sandbox_error`` record: a verdict on this program, never an exception."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        records = []
        cap = len(job["inputs"]) * (6 * job["output_bytes"] + (1 << 16)) + (1 << 20)
        try:
            self._send(job)
            for record in self._lines(time.monotonic() + timeout, cap):
                if record.get("done"):
                    return records
                records.append(record)
        except SandboxError as err:
            logger.warning("code sandbox: %s", err)
            records.append(_failure(str(err)))
        return records

    def kill(self) -> None:
        if self.proc is not None:
            _kill_session(self.proc)
            self.proc = None


def _failure(message: str) -> dict:
    """The record of a test whose run the sandbox could not report (``outcome="sandbox_error"``)."""
    return {
        "outcome": "sandbox_error",
        "returncode": None,
        "signal": None,
        "stdout": "",
        "stderr": message[-2000:],
        "channel": "",
        "wall": 0.0,
    }


@functools.lru_cache(maxsize=8)
def detect_isolation(python: str = sys.executable, uid: int = 61000) -> dict[str, bool]:
    """Which isolation this machine allows, probed once per (interpreter, uid) in throwaway children:
    ``{"net", "mount", "pid", "user", "seccomp"}`` -> bool, plus ``"<name>_error"`` messages for what failed."""
    if not sys.platform.startswith("linux"):
        return {**dict.fromkeys(ISOLATION, False), "platform_error": sys.platform}
    proc = _start_harness(python)
    try:
        out, _ = proc.communicate(json.dumps({"probe": True, "uid": uid}).encode() + b"\n", timeout=60.0)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        _kill_session(proc)
    if proc.returncode != 0 or not out.strip():
        raise SandboxError(f"the sandbox probe failed (exit {proc.returncode}): {_stderr_tail(proc)}")
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
        "syscalls: "
        + (
            "filtered (no AF_UNIX sockets, memfd, SysV shm, namespaces)" if isolation.get("seccomp") else "NOT filtered"
        ),
    ]
    return "; ".join(parts)


class Sandbox:
    """Runs programs against test inputs under :class:`SandboxConfig`; thread-safe. Each of its ``slots`` is one
    long-lived harness process with its own uid; a run takes a free slot (waiting for one if all are busy).

    Args:
        config: limits and isolation.
        slots: the most runs at once; the caller's pool should not exceed it.

    Raises:
        SandboxError: no network namespace can be created and ``allow_unsandboxed_network`` is false.
    """

    def __init__(self, config: SandboxConfig | None = None, *, slots: int | None = None) -> None:
        self.config = config or SandboxConfig()
        self.slots = slots or default_workers()
        base = self.config.uid_base + 1024 * int(os.environ.get("LOCAL_RANK", "0") or 0)
        found = detect_isolation(self.config.python, base)
        self.isolation = {k: bool(found[k]) for k in ISOLATION}
        if not self.isolation["net"] and not self.config.allow_unsandboxed_network:
            raise SandboxError(
                f"cannot isolate the network of executed programs on this machine ({found.get('net_error', '?')}); "
                "pass allow_unsandboxed_network=True (env OTALIGN_ALLOW_UNSANDBOXED_NETWORK=1 for the named reward) "
                "to run them anyway"
            )
        self._free: queue.Queue[int] = queue.Queue()
        self._harnesses: dict[int, _Harness] = {}
        for slot in range(self.slots):
            self._free.put(base + slot)
        self._finalizer = weakref.finalize(self, _close_all, self._harnesses)
        log = logger.info if all(self.isolation.values()) else logger.warning
        log("code sandbox: %s", describe(self.isolation))

    def describe(self) -> str:
        """The active isolation in words."""
        return describe(self.isolation)

    def run(self, program: str, inputs: list, *, fn_name: str | None = None) -> list[TestRun]:
        """Run ``program`` on each test input in turn (stdin text, or the argument list of ``fn_name`` for
        call-based tests); the runs in order, stopping early after a compile error (and, with
        ``stop_on_error``, after a runtime error or timeout).

        Raises:
            SandboxError: the sandbox could not be set up or its harness could not start (never for anything the
                program does; a harness failing during the program's tests ends them with a ``sandbox_error`` run).
        """
        c = self.config
        job = {
            "program": program,
            "mode": "call" if fn_name else "stdio",
            "fn_name": fn_name,
            "inputs": list(inputs),
            "timeout": float(c.timeout),
            "cpu_seconds": c.cpu_seconds or max(1, math.ceil(c.timeout)),
            "memory_bytes": int(c.memory_mb) << 20,
            "file_bytes": int(c.file_size_mb) << 20,
            "workdir_bytes": int(c.workdir_mb) << 20,
            "max_processes": int(c.max_processes),
            "max_open_files": int(c.max_open_files),
            "output_bytes": int(c.output_mb * (1 << 20)),
            "stop_on_error": c.stop_on_error,
        }
        uid = self._free.get()
        workdir = None
        try:
            harness = self._harnesses.get(uid)
            if harness is None:
                session = {"uid": uid, "isolation": self.isolation, "preload": list(c.preload)}
                harness = self._harnesses[uid] = _Harness(c.python, session)
            if not self.isolation["mount"]:  # the program writes into a real temporary directory
                workdir = tempfile.mkdtemp(prefix="otalign-sandbox-")
                if self.isolation["user"]:
                    os.chown(workdir, uid, uid)
                job["workdir"] = workdir
            records = harness.run(job, timeout=len(job["inputs"]) * (c.timeout + 3.0) + 30.0)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            self._free.put(uid)
        runs = []
        for record in records:
            if "setup_error" in record:
                raise SandboxError(f"could not contain the program: {record['setup_error']}")
            record.pop("index", None)
            try:
                runs.append(TestRun(**record))
            except TypeError as err:  # a record of another protocol version: this program's sandbox failure
                runs.append(TestRun(**_failure(f"malformed record from the sandbox harness: {err}")))
                break
        return runs

    def close(self) -> None:
        """Stop every harness process (a later run starts new ones)."""
        _close_all(self._harnesses)


def _close_all(harnesses: dict) -> None:
    for harness in list(harnesses.values()):
        harness.kill()
    harnesses.clear()


ISOLATION = ("net", "mount", "pid", "user", "seccomp")


def default_workers() -> int:
    """Worker count: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
