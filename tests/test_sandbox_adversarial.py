"""Hostile programs against the code sandbox: each must be contained, scored as a runtime error or timeout (never a
pass), and leave the machine as it was: no process, no file outside the temporary directories, no memory growth.

Every program's expected output is what it would print if its attack worked, so containment means "not passed".
The isolation this machine allows is printed (``-s``) and asserted where the test needs it.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from otalign.rewards.code import CodeScorer
from otalign.rewards.sandbox import SandboxConfig, describe, detect_isolation

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox suite is Linux-only")

SECRET = f"otalign-secret-{uuid.uuid4().hex}"
EXPECTED = f"expected-{uuid.uuid4().hex}"
TAG = uuid.uuid4().hex  # names the files an attack tries to create
PROJECT = Path(__file__).resolve().parents[1]
SECRET_DIR = PROJECT / f".otalign-private-{uuid.uuid4().hex}"  # 0700 in a world-readable tree, made by the fixture
UID_BASE = 62000  # this module's uids, so a leftover process is recognisable
ONE = {"inputs": ["\n"], "outputs": [f"{EXPECTED}\n"]}
# world-writable directories holding world-connectable Unix sockets (as dbus or journald sockets are on a host):
# one in the project tree (visible in the sandbox's read-only view), one under /tmp (hidden by its empty /tmp)
SOCKET_DIRS = (PROJECT / f".otalign-sockets-{TAG[:8]}", Path(f"/tmp/otalign-sockets-{TAG[:8]}"))
STREAM_SOCKETS = [str(d / "stream") for d in SOCKET_DIRS]
DGRAM_SOCKETS = [str(d / "dgram") for d in SOCKET_DIRS]
ADD_SUM = {"inputs": [[1, 2]], "outputs": [3], "fn_name": "f"}

ATTACKS = {
    "infinite loop": ("while True:\n    pass\n", ONE, {"timeout"}),
    "fork bomb": ("import os\nwhile True:\n    os.fork()\n", ONE, {"runtime_error", "timeout"}),
    "10 GB allocation": ("x = bytearray(10 * 1024 ** 3)\nprint(len(x))\n", ONE, {"runtime_error"}),
    "10 GB file": (
        "with open('big', 'wb') as f:\n    for _ in range(10 * 1024):\n        f.write(b'x' * 1024 ** 2)\n"
        "print('done')\n",
        ONE,
        {"runtime_error"},
    ),
    "write home and project": (
        f"for p in ['/root/otalign-pwned-{TAG}', {str(PROJECT / f'pwned-{TAG}')!r}, "
        f"'/tmp/otalign-pwned-{TAG}', '/dev/shm/otalign-pwned-{TAG}', '/run/lock/otalign-pwned-{TAG}']:\n"
        "    try:\n        open(p, 'w').write('x')\n        print('wrote', p)\n    except OSError as e:\n"
        "        print('blocked', p, e)\nraise SystemExit(1)\n",
        ONE,
        {"runtime_error"},
    ),
    "read environment and private files": (
        "import os\nprint(dict(os.environ))\nhome = os.environ.get('HOME', '/')\n"
        f"for p in [os.path.join(home, n) for n in os.listdir(home)] + [{str(SECRET_DIR / 'secret.txt')!r}, "
        "'/proc/1/environ', '/root/.bash_history']:\n"
        "    try:\n        print(open(p).read())\n    except Exception as e:\n        print('blocked', p, e)\n"
        "raise SystemExit(1)\n",
        ONE,
        {"runtime_error"},
    ),
    "socket to an outside address": (
        "import socket\ns = socket.socket()\ns.settimeout(0.5)\ns.connect(('1.1.1.1', 80))\nprint('connected')\n",
        ONE,
        {"runtime_error"},
    ),
    "background process outliving the test": (
        textwrap.dedent(
            f"""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(120)
                    open('/tmp/otalign-daemon-{TAG}', 'w').write('survived')
                os._exit(0)
            time.sleep(0.05)
            print({EXPECTED!r})
            """
        ),
        ONE,
        {"runtime_error"},
    ),
    "print 1 GB": (
        "import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n",
        ONE,
        {"runtime_error"},
    ),
    "sys.exit(0) before the tests (call-based)": (
        "import sys\nsys.exit(0)\ndef f(x):\n    return x\n",
        {"inputs": [[1]], "outputs": [[1]], "fn_name": "f"},
        {"runtime_error"},
    ),
    "__eq__ always true (call-based)": (
        "class Yes:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Yes()\n",
        {"inputs": [[1]], "outputs": [[EXPECTED]], "fn_name": "f"},
        {"runtime_error"},
    ),
    "int subclass with a lying __eq__ (call-based)": (
        "class Yes(int):\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Yes(0)\n",
        {"inputs": [[1]], "outputs": [[7]], "fn_name": "f"},
        {"failed"},  # serialised as the plain int 0, then compared here: a wrong answer, not a pass
    ),
    "connect to a host's Unix socket": (
        textwrap.dedent(
            f"""
            import socket, sys
            reached = 0
            for path in {STREAM_SOCKETS!r}:
                try:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(path)
                    s.sendall(b'pwned')
                    reached += 1
                except OSError as e:
                    print('blocked', path, e, file=sys.stderr)
            print({EXPECTED!r} if reached else 'blocked')
            """
        ),
        ONE,
        {"failed"},
    ),
    "datagram to a host's Unix socket from a socketpair": (
        textwrap.dedent(
            f"""
            import socket, sys
            reached = 0
            for path in {DGRAM_SOCKETS!r}:
                try:
                    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                    a.sendto(b'pwned', path)
                    reached += 1
                except OSError as e:
                    print('blocked', path, e, file=sys.stderr)
            print({EXPECTED!r} if reached else 'blocked')
            """
        ),
        ONE,
        {"failed"},
    ),
    "memfds holding memory outside RLIMIT_AS": (
        # the example: 60 x 16 MiB held with memory_mb=128 (here 512: 960 MiB is still beyond it)
        "import os\nfds = []\nfor _ in range(60):\n    fd = os.memfd_create('x')\n    os.write(fd, b'x' * (16 << 20))\n"
        f"    fds.append(fd)\nprint({EXPECTED!r})\n",
        ONE,
        {"runtime_error"},
    ),
    "user namespace with a tmpfs mount": (
        "import os\nos.execv('/usr/bin/unshare', ['unshare', '-Urm', 'sh', '-c', "
        f"'mount -t tmpfs none . && echo {EXPECTED}'])\n",
        ONE,
        {"runtime_error"},
    ),
    "result forged on fd 3 without the function (call-based)": (
        "import os\nos.write(3, b'{\"result\": 3}')\nos._exit(0)\n",
        ADD_SUM,
        {"runtime_error"},  # it defines no f: what a correct reading of it earns
    ),
    "result forged on fd 3 before returning (call-based)": (
        "import os\nos.write(3, b'{\"result\": 3}')\ndef f(a, b):\n    return a + b\n",
        ADD_SUM,
        {"runtime_error"},  # two messages on the channel: not one result
    ),
    "monkeypatched print and builtins": (
        "import builtins, sys\nbuiltins.print = lambda *a, **k: None\nsys.stdout.write = lambda s: len(s)\n"
        "print('anything')\nraise SystemExit(3)\n",
        ONE,
        {"runtime_error"},
    ),
    "search for the expected output": (
        textwrap.dedent(
            """
            import os
            seen = []
            for top in [os.getcwd(), '/tmp', '/proc']:
                for root, dirs, files in os.walk(top):
                    if root.count('/') > 4:
                        dirs[:] = []
                    for name in files[:50]:
                        try:
                            seen.append(open(os.path.join(root, name), errors='replace').read(4096))
                        except Exception:
                            pass
            print('\\n'.join(seen))
            raise SystemExit(1)
            """
        ),
        ONE,
        {"runtime_error"},
    ),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _sandbox_processes() -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
            if UID_BASE <= uid < UID_BASE + 1024:
                out.append(f"{entry}: {status.splitlines()[0]}")
    return out


def _sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("otalign-sandbox-*")}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    isolation = detect_isolation(uid=UID_BASE)
    print(f"\nsandbox isolation on this machine: {describe(isolation)}")
    SECRET_DIR.mkdir(mode=0o700)
    (SECRET_DIR / "secret.txt").write_text(SECRET)
    (SECRET_DIR / "secret.txt").chmod(0o600)
    os.environ["OTALIGN_TEST_SECRET"] = SECRET
    servers = _unix_servers()
    config = SandboxConfig(timeout=1.0, memory_mb=512, file_size_mb=8, workdir_mb=16, output_mb=2.0, uid_base=UID_BASE)
    scorer = CodeScorer(config=config, workers=2, cache_size=0)
    try:
        scorer.score_batch(["print(1)"], [ONE])  # warm up before measuring memory
        dirs, rss, children = _sandbox_dirs(), _rss_mb(), set(_children_of(os.getpid())) - _harness_pids(scorer)
        names = list(ATTACKS)
        raw = {
            name: scorer.sandbox.run(ATTACKS[name][0], ATTACKS[name][1]["inputs"])
            for name in (
                "read environment and private files",
                "search for the expected output",
                "write home and project",
                "socket to an outside address",
                "connect to a host's Unix socket",
                "datagram to a host's Unix socket from a socketpair",
            )
        }
        scored = scorer.score_batch([ATTACKS[n][0] for n in names], [ATTACKS[n][1] for n in names])
        results = dict(zip(names, scored, strict=True))
        yield {
            "isolation": isolation,
            "results": results,
            "raw": raw,
            "dirs": dirs,
            "rss": rss,
            "children": children,  # earlier tests' processes (e.g. the shared default scorer's harnesses)
            "scorer": scorer,
            "servers": servers,
        }
    finally:
        scorer.close()
        os.environ.pop("OTALIGN_TEST_SECRET", None)
        shutil.rmtree(SECRET_DIR, ignore_errors=True)
        for server in servers:
            server.close()
        for directory in SOCKET_DIRS:
            shutil.rmtree(directory, ignore_errors=True)


def _unix_servers() -> list[socket.socket]:
    """A listening stream socket and a bound datagram socket in each of :data:`SOCKET_DIRS`, all world-writable."""
    servers = []
    for directory, stream, dgram in zip(SOCKET_DIRS, STREAM_SOCKETS, DGRAM_SOCKETS, strict=True):
        directory.mkdir()
        directory.chmod(0o777)
        for path, kind in ((stream, socket.SOCK_STREAM), (dgram, socket.SOCK_DGRAM)):
            server = socket.socket(socket.AF_UNIX, kind)
            server.bind(path)
            os.chmod(path, 0o777)
            if kind == socket.SOCK_STREAM:
                server.listen(8)
            server.setblocking(False)
            servers.append(server)
    return servers


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_contained_and_not_a_pass(suite, name):
    result = suite["results"][name]
    assert result.status in ATTACKS[name][2], (result.status, result.detail)
    assert result.reward <= -0.3 and result.n_pass == 0


def test_isolation_is_complete_here(suite):
    """This machine (Linux, root) allows every layer; the reward reports it."""
    iso = suite["isolation"]
    if os.geteuid() != 0:
        pytest.skip(f"not root: {describe(iso)}")
    assert iso["net"] and iso["mount"] and iso["pid"] and iso["user"] and iso["seccomp"], iso
    assert suite["scorer"].sandbox.isolation == {k: iso[k] for k in ("net", "mount", "pid", "user", "seccomp")}


def test_nothing_secret_or_expected_reaches_the_program(suite):
    for runs in suite["raw"].values():
        for run in runs:
            assert SECRET not in run.stdout and SECRET not in run.stderr
            assert EXPECTED not in run.stdout
    env_run = suite["raw"]["read environment and private files"][0]
    assert "OTALIGN_TEST_SECRET" not in env_run.stdout
    # a checkout under /tmp is hidden by the sandbox's empty /tmp: then the file is not even there to refuse
    refusal = "[Errno 2] No such file" if SECRET_DIR.is_relative_to("/tmp") else "[Errno 13] Permission denied"
    assert f"blocked {SECRET_DIR / 'secret.txt'} {refusal}" in env_run.stdout


def test_no_network(suite):
    assert "Network is unreachable" in suite["raw"]["socket to an outside address"][0].stderr


def test_no_writes_outside_the_temporary_directory(suite):
    written = suite["raw"]["write home and project"][0].stdout
    assert "wrote" not in written and written.count("blocked") == 5
    for path in (
        Path(f"/root/otalign-pwned-{TAG}"),
        PROJECT / f"pwned-{TAG}",
        Path(f"/tmp/otalign-pwned-{TAG}"),
        Path(f"/dev/shm/otalign-pwned-{TAG}"),
        Path(f"/run/lock/otalign-pwned-{TAG}"),
        Path(f"/tmp/otalign-daemon-{TAG}"),
    ):
        assert not path.exists(), path


def test_host_unix_sockets_are_unreachable(suite):
    """Neither a connection nor a datagram reached the host's world-writable Unix sockets (checked here, from the
    sockets' side: nothing queued)."""
    for server in suite["servers"]:
        with pytest.raises(BlockingIOError):
            server.accept() if server.type == socket.SOCK_STREAM else server.recv(64)
    for name in ("connect to a host's Unix socket", "datagram to a host's Unix socket from a socketpair"):
        stderr = suite["raw"][name][0].stderr
        assert stderr.count("blocked") == 2, stderr
        if suite["isolation"]["seccomp"]:  # refused by the filter, before any path is looked up
            assert stderr.count("[Errno 1] Operation not permitted") == 2, stderr


def test_memfd_and_user_namespaces_are_refused(suite):
    if not suite["isolation"]["seccomp"]:
        pytest.skip(f"no syscall filter: {describe(suite['isolation'])}")
    assert "PermissionError: [Errno 1]" in suite["results"]["memfds holding memory outside RLIMIT_AS"].detail
    assert "Operation not permitted" in suite["results"]["user namespace with a tmpfs mount"].detail


def test_forged_result_is_the_program_not_defining_the_function(suite):
    result = suite["results"]["result forged on fd 3 without the function (call-based)"]
    assert result.detail == "the program does not define 'f'"
    assert suite["results"]["result forged on fd 3 before returning (call-based)"].detail == "malformed result channel"


CHANNEL_WRITES = [
    b'{"compile_error": ',  # a truncated compile error: once raised JSONDecodeError in the caller
    b'{"compile_error": "forged"}',
    b"\xff\xfe\x00",
    b"[" * 100000,  # too deep for the JSON decoder
    b'{"result": 1' + b"0" * 5000 + b"}",  # more digits than int() converts
    b'{"result": 3, "extra": 1}',
    b"[3]",
]


@pytest.mark.parametrize("payload", CHANNEL_WRITES, ids=range(len(CHANNEL_WRITES)))
def test_writes_on_fd_3_never_crash_the_caller(suite, payload):
    """Whatever a program writes on fd 3 is its own verdict, never an exception here: a stdin/stdout program has no
    fd 3 (writing fails, and it then prints the right answer: a pass); a call-based one that writes there before
    returning the right value has a malformed channel (a runtime error)."""
    write = f"import os\ntry:\n    os.write(3, {payload!r})\nexcept OSError:\n    pass\n"
    stdio = suite["scorer"].score(write + f"print({EXPECTED!r})\n", ONE)
    called = suite["scorer"].score(write + "def f(a, b):\n    return a + b\n", ADD_SUM)
    assert (stdio.status, called.status) == ("passed", "runtime_error"), (stdio.detail, called.detail)
    assert called.detail == "malformed result channel"


def test_the_syscall_filter_leaves_ordinary_programs_alone(suite):
    """Threads (clone3 answers ENOSYS: the C library falls back to clone), fork, a stream socketpair, an inet socket
    and exec still work behind the filter."""
    program = textwrap.dedent(
        """
        import os, socket, threading
        seen = []
        threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        a, b = socket.socketpair()
        a.send(b'ok')
        print(sorted(seen), os.waitpid(pid, 0)[1] >> 8, b.recv(2).decode(), socket.socket().family.name, flush=True)
        os.execv('/bin/sh', ['sh', '-c', 'echo from sh'])
        """
    )
    expected = "[0, 1, 2, 3] 7 ok AF_INET\nfrom sh\n"
    result = suite["scorer"].score(program, {"inputs": ["\n"], "outputs": [expected]})
    assert result.status == "passed", result.detail


def test_machine_is_left_as_it_was(suite):
    """No process of the sandbox's uids, no leftover temporary directory, the parent's memory within a margin; after
    ``close()`` no child process beyond those earlier tests left. (Runs last: it closes the module's scorer.)"""
    assert _sandbox_processes() == []
    assert _sandbox_dirs() <= suite["dirs"]
    assert _rss_mb() - suite["rss"] < 64
    harnesses = _harness_pids(suite["scorer"])
    assert set(_children_of(os.getpid())) <= suite["children"] | harnesses  # and the idle harnesses (one per slot)
    suite["scorer"].close()
    assert set(_children_of(os.getpid())) <= suite["children"]


def _harness_pids(scorer) -> set[int]:
    return {h.proc.pid for h in scorer.sandbox._harnesses.values() if h.proc is not None}


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out
