"""Sandbox harness: runs untrusted programs against test inputs, each test in a fresh contained process.

Started by :mod:`otalign.rewards.sandbox` as ``python -I -S <this file>`` in a new session, with a minimal
environment and ``close_fds``; one long-lived harness per worker slot (its own uid). Standard library only; it
never imports otalign. It never sees the expected outputs: the caller compares.

Protocol (JSON lines on stdin/stdout): first a session ``{"uid", "isolation": {"net", "mount", "pid", "user",
"seccomp"},
"preload": [allowed module names]}``, answered ``{"ready": true}`` or ``{"setup_error": message}``; then any
number of jobs ``{"program", "mode": "stdio"|"call", "fn_name", "inputs": [...], "timeout", "cpu_seconds",
"memory_bytes", "file_bytes", "max_processes", "max_open_files", "output_bytes", "workdir_bytes",
"stop_on_error", "workdir" (without a mount namespace)}``, each answered by one line per test run and then
``{"done": true}``. ``{"probe": true, "uid": int}`` instead of a session reports which isolation this machine
allows, and exits.

Session (Linux as root, every namespace available): the harness enters a new network namespace (no interface
up) and a new mount namespace in which every mount is read-only and /tmp, /var/tmp and /dev/shm are empty
read-only tmpfs (holding only the empty working directory). Per test::

    harness ─fork→ A: setpgid; unshare(NEWNS | NEWPID | NEWIPC); a fresh size-capped tmpfs, owned by the uid,
                   on the working directory (SysV/POSIX IPC objects die with the test's IPC namespace)
      A ─fork→ B: pid 1 of the new pid namespace; mounts its own /proc; reaps; exits with the program's status
                  (or "left a process behind"), and the kernel then kills everything left in the namespace
        B ─fork→ C: stdin = the test input (an anonymous memfd), stdout/stderr = pipes to the harness, fd 3 the
                    result pipe (call-based tests only), fd 4 the prelude pipe, every other fd closed; rlimits
                    (CPU, AS, FSIZE, NPROC, NOFILE, CORE, MEMLOCK, MSGQUEUE); setgroups([]), setgid/setuid to the
                    unprivileged uid; no_new_privs; the syscall filter (:data:`SYSCALLS`); compiles the program
                    (a compile error goes on fd 4), closes fd 4, then runs it.

The harness (trusted, outside the pid namespaces) reads the pipes with byte caps and a wall-clock deadline and
kills A's process group (hence B, hence the namespace) on timeout or overflow. Missing pieces degrade as the
session's ``isolation`` says (the caller decides whether that is acceptable): without a pid namespace the harness
is a child subreaper and kills every orphan reparented to it after each test; without setuid the program runs
as the harness's user. Standard-library modules a program imports that are in the allowed ``preload`` list are
imported by the harness first (the contained uid may be unable to read the interpreter's library directory).

Per-test line: ``{"index", "outcome": "exited"|"signaled"|"timeout"|"output_limit"|"leftover_process",
"returncode", "signal", "stdout", "stderr" (first 4 KB), "channel" (what the program's process wrote to fd 3: the
call-based result as JSON text, or whatever the program wrote there itself), "compile_error" (what fd 4 carried:
written before any of the program's code ran, so never the program's; null when it compiled), "wall"}``. A setup
failure (a namespace that cannot be created) ends the job with ``{"setup_error": message}`` (reported by A on a
pipe no contained process holds).
"""

import ast
import contextlib
import ctypes
import json
import os
import re
import resource
import selectors
import signal
import sys
import time
import traceback

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
MOUNT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 22, 36, 38
SETUP_ERROR = 125  # exit status of A when containment could not be set up
LEFTOVER = 121  # exit status of B when the program exited but left a process running in its namespace
STDERR_KEEP = 4096
LEAVE_WRITABLE = ("/proc", "/sys", "/dev", "/dev/pts")  # pseudo file systems: writes there need root or a tty
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm")  # shown empty and read-only to the program

_HARNESS_STDIO = None
_exit = os._exit  # kept: a program may replace os._exit in its own process, never in the harness
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _call(name, *args):
    if _libc is None:
        raise OSError(f"{name} needs Linux")
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args!r:.120}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data):
    enc = [None if x is None else x.encode() for x in (source, target, fstype, data)]
    _call("mount", enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3])


def _prctl(option, value):
    if _libc is not None:
        _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0)


# The program's syscall filter (seccomp-BPF). Refused with EPERM: memory no rlimit counts (memfd_create,
# memfd_secret, SysV shared memory and message queues), filesystem Unix sockets (socket(AF_UNIX); a socketpair
# other than SOCK_STREAM, whose datagram ends can sendto() a path), new namespaces (unshare, setns, clone with a
# CLONE_NEW* flag: no user namespace, hence no mounts), and kernel surface no solution needs (io_uring, which
# bypasses seccomp; bpf, userfaultfd, perf_event_open, keyrings). clone3 answers ENOSYS (its flags sit in memory a
# filter cannot read; the C library then falls back to clone). Another architecture (x32 included) is killed.
SYSCALLS = {  # (audit arch, {name: number}) per machine
    "x86_64": (
        0xC000003E,
        {
            "clone": 56,
            "clone3": 435,
            "socket": 41,
            "socketpair": 53,
            "memfd_create": 319,
            "memfd_secret": 447,
            "shmget": 29,
            "msgget": 68,
            "unshare": 272,
            "setns": 308,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "bpf": 321,
            "userfaultfd": 323,
            "perf_event_open": 298,
            "add_key": 248,
            "request_key": 249,
            "keyctl": 250,
        },
    ),
    "aarch64": (
        0xC00000B7,
        {
            "clone": 220,
            "clone3": 435,
            "socket": 198,
            "socketpair": 199,
            "memfd_create": 279,
            "memfd_secret": 447,
            "shmget": 194,
            "msgget": 186,
            "unshare": 97,
            "setns": 268,
            "io_uring_setup": 425,
            "io_uring_enter": 426,
            "io_uring_register": 427,
            "bpf": 280,
            "userfaultfd": 282,
            "perf_event_open": 241,
            "add_key": 217,
            "request_key": 218,
            "keyctl": 219,
        },
    ),
}
CLONE_NEW_ANY = 0x7E020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
AF_UNIX, SOCK_STREAM, SOCK_TYPE_MASK = 1, 1, 0xF
EPERM, ENOSYS = 1, 38
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
LD_ABS, JEQ, JGE, JSET, AND, RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06  # BPF_LD|W|ABS, BPF_JMP|K ..., BPF_RET|K
NR, ARCH, ARG0, ARG1 = 0, 4, 16, 24  # offsets in struct seccomp_data (low 32 bits of an argument, little-endian)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def _filter_program(machine):
    """The filter of :data:`SYSCALLS` for ``machine`` as (code, jt, jf, k) tuples; jumps are to labels."""
    arch, nr = SYSCALLS[machine]
    refused = [n for name, n in nr.items() if name not in ("clone", "clone3", "socket", "socketpair")]
    prog = [(LD_ABS, 0, 0, ARCH), (JEQ, 0, "kill", arch), (LD_ABS, 0, 0, NR)]
    if machine == "x86_64":
        prog.append((JGE, "kill", 0, 0x40000000))  # the x32 ABI's numbers
    prog += [
        (JEQ, "clone", 0, nr["clone"]),
        (JEQ, "socket", 0, nr["socket"]),
        (JEQ, "socketpair", 0, nr["socketpair"]),
        (JEQ, "enosys", 0, nr["clone3"]),
    ]
    prog += [(JEQ, "eperm", 0, n) for n in refused]
    prog += [
        (RET, 0, 0, RET_ALLOW),
        ("clone",),
        (LD_ABS, 0, 0, ARG0),
        (JSET, "eperm", "allow", CLONE_NEW_ANY),
        ("socket",),
        (LD_ABS, 0, 0, ARG0),
        (JEQ, "eperm", "allow", AF_UNIX),
        ("socketpair",),
        (LD_ABS, 0, 0, ARG0),
        (JEQ, 0, "allow", AF_UNIX),
        (LD_ABS, 0, 0, ARG1),
        (AND, 0, 0, SOCK_TYPE_MASK),
        (JEQ, "allow", "eperm", SOCK_STREAM),
        ("allow",),
        (RET, 0, 0, RET_ALLOW),
        ("eperm",),
        (RET, 0, 0, RET_ERRNO | EPERM),
        ("enosys",),
        (RET, 0, 0, RET_ERRNO | ENOSYS),
        ("kill",),
        (RET, 0, 0, RET_KILL_PROCESS),
    ]
    labels, out = {}, []
    for item in prog:
        if len(item) == 1:
            labels[item[0]] = len(out)
        else:
            out.append(item)
    resolved = []
    for i, (code, jt, jf, k) in enumerate(out):
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        resolved.append((code, jt, jf, k))
    return resolved


def _seccomp():
    """Install the program's syscall filter on the calling process (needs no_new_privs; irreversible)."""
    machine = os.uname().machine
    if _libc is None or machine not in SYSCALLS:
        raise OSError(f"no syscall filter for {sys.platform}/{machine}")
    prog = _filter_program(machine)
    insns = (_SockFilter * len(prog))(*(_SockFilter(*insn) for insn in prog))
    fprog = _SockFprog(len(prog), insns)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(fprog), 0, 0) != 0:  # SECCOMP_MODE_FILTER
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")


def _mount_points():
    """(mount point, per-mount flags to keep) of every mount, from /proc/self/mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # octal escapes (\040 for a space)
            flags = 0
            for opt in fields[5].split(","):
                flags |= MOUNT_FLAGS.get(opt, 0)
            out.append((point, flags))
    return out


def _read_only_view():
    """In the calling process's fresh mount namespace: every mount read-only (except pseudo file systems) and the
    shared temporary directories (:data:`HIDDEN`) replaced by empty read-only tmpfs, the first holding an empty
    working directory, whose path is returned."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    for point, flags in _mount_points():
        if point in LEAVE_WRITABLE or point.startswith(("/proc/", "/sys/")):
            continue
        _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
    hidden = [h for h in HIDDEN if os.path.isdir(h) and not os.path.islink(h)]
    if not hidden:
        raise OSError(f"none of {HIDDEN} is a directory to hold the working directory")
    for point in hidden:  # other users' temporary files stay out of sight
        _mount("tmpfs", point, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    workdir = os.path.join(hidden[0], "otalign-work")
    os.mkdir(workdir, 0o755)
    for point in hidden:
        _mount(None, point, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    return workdir


def _fresh_workdir(workdir, uid, size):
    """A new private tmpfs of ``size`` bytes on ``workdir`` (in the caller's own mount namespace); cwd onto it."""
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=0700{owner}")
    os.chdir(workdir)


def _limits(job):
    cpu = int(job["cpu_seconds"])
    for which, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (job["memory_bytes"],) * 2),
        (resource.RLIMIT_FSIZE, (job["file_bytes"],) * 2),
        (resource.RLIMIT_NPROC, (job["max_processes"],) * 2),
        (resource.RLIMIT_NOFILE, (job["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_MEMLOCK, (0, 0)),
        (resource.RLIMIT_MSGQUEUE, (0, 0)),  # POSIX message queues hold kernel memory outside RLIMIT_AS
    ):
        resource.setrlimit(which, value)


def _write_all(fd, data):
    while data:
        data = data[os.write(fd, data) :]


def _defines(tree, name):
    """Whether the module ``tree`` binds ``name`` anywhere (def, class, assignment target, import alias)."""
    for node in ast.walk(tree):
        bound = None
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound = node.name
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound = node.id
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            bound = node.attr
        elif isinstance(node, ast.alias):
            bound = node.asname or node.name.rpartition(".")[2]
        if bound == name:
            return True
    return False


def _program(job, index, stdin_fd, fds):
    """Process C: becomes the contained program; never returns.

    Before any of the program's code runs (under the limits, as the contained uid, behind the syscall filter) it is
    compiled; a compile error is written to the prelude pipe, which is closed before the program starts, so only
    this code can report one. A call-based program that binds no ``fn_name`` anywhere is refused unrun (it could
    not return a value). The result channel (fd 3) exists for call-based tests only."""
    out, err, channel, prelude = fds
    call = job["mode"] == "call"
    for src, dst in ((stdin_fd, 0), (out, 1), (err, 2), (channel, 3), (prelude, 4)):
        os.dup2(src, dst)
    os.closerange(5, 1 << 16)
    if not call:
        os.close(3)
    _limits(job)
    uid = job["uid"] if job["isolation"]["user"] else None
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if job["isolation"].get("seccomp"):
        _seccomp()
    home = os.getcwd()
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home})
    global _HARNESS_STDIO
    _HARNESS_STDIO = (sys.stdin, sys.stdout, sys.stderr)  # kept alive: collecting them would close fds 0-2
    sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stdout = sys.__stdout__ = out_file = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = sys.__stderr__ = err_file = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    source, mode, fn_name = job["program"], job["mode"], job["fn_name"]
    args = job["inputs"][index] if call else None
    job.clear()  # the program's process keeps nothing of the job but its own source and arguments
    try:
        tree = ast.parse(source, "<program>")
        code = compile(tree, "<program>", "exec")
    except BaseException as e:  # SyntaxError, ValueError (null bytes), MemoryError, RecursionError
        _write_all(4, f"{type(e).__name__}: {e}"[:2000].encode("utf-8", "replace"))
        _exit(1)
    os.close(4)
    if call and not _defines(tree, fn_name):
        _write_all(2, f"the program does not define {fn_name!r}\n".encode())
        _exit(1)
    del tree
    status = 0
    try:
        namespace = {"__name__": "__main__" if mode == "stdio" else "solution", "__builtins__": __builtins__}
        exec(code, namespace)
        if call:
            target = namespace.get("Solution")
            fn = getattr(target(), fn_name) if isinstance(target, type) and "class Solution" in source else None
            fn = fn if fn is not None else namespace[fn_name]
            value = fn(*(args if isinstance(args, list) else [args]))
            try:
                payload = json.dumps({"result": value})
            except (TypeError, ValueError):
                payload = json.dumps({"unserializable": type(value).__name__})
            _write_all(3, payload.encode())
    except SystemExit as e:
        status = 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)
        if call:
            status = status or 1  # a call-based program that exits never returned a value
    except BaseException:
        traceback.print_exc()
        status = 1
    for stream in {id(f): f for f in (sys.stdout, sys.stderr, out_file, err_file)}.values():
        try:
            stream.flush()
        except BaseException:
            status = status or 1
    _exit(status & 0xFF)


def _status_code(status):
    """A wait status as one exit code: the code itself (capped at 120) or 128 + the signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return min(os.WEXITSTATUS(status), 120)


def _init(job, index, stdin_fd, fds):
    """Process B, pid 1 of the test's pid namespace: own /proc, start the program, reap, exit with its status."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if job["isolation"]["mount"]:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    pid = os.fork()
    if pid == 0:
        _program(job, index, stdin_fd, fds)
    for fd in (stdin_fd, *fds):
        os.close(fd)
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            _exit(1)
        if done == pid:
            break
    while True:  # reap what already exited; a live child left now is a process the program left behind
        try:
            done, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if done == 0:
            _exit(LEFTOVER)
    _exit(_status_code(status))  # pid 1 exits: the kernel kills the rest of the namespace


def _contain(job, index, stdin_fd, fds, setup):
    """Process A: namespaces, then B (or C directly without a pid namespace); never returns. A setup failure
    is written to ``setup``, a pipe only A holds (a contained program cannot fake one)."""
    try:
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # drop the harness's stdio: no contained process may reach the report pipe
            os.dup2(null, fd)
        os.close(null)
        iso = job["isolation"]
        flags = (CLONE_NEWNS if iso["mount"] else 0) | (CLONE_NEWPID | CLONE_NEWIPC if iso["pid"] else 0)
        if flags:
            _call("unshare", flags)  # the network namespace is the session's
        if iso["mount"]:
            _fresh_workdir(job["workdir"], job["uid"] if iso["user"] else None, job["workdir_bytes"])
        else:
            os.chdir(job["workdir"])
        if not iso["pid"]:
            os.close(setup)
            _program(job, index, stdin_fd, fds)
        pid = os.fork()
    except BaseException as e:
        _write_all(setup, f"{type(e).__name__}: {e}".encode())
        _exit(SETUP_ERROR)
    os.close(setup)
    if pid == 0:
        _init(job, index, stdin_fd, fds)
    for fd in (stdin_fd, *fds):
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    _exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _stdin_fd(job, index):
    """A read-only fd holding the test's stdin (stdio mode) or nothing (call mode), at offset 0."""
    data = b""
    if job["mode"] == "stdio":
        value = job["inputs"][index]
        data = ("\n".join(map(str, value)) if isinstance(value, list) else str(value)).encode()
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("stdin", 0)
        _write_all(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd
    r, w = os.pipe()  # small inputs only (pipe buffer) on platforms without memfd
    _write_all(w, data)
    os.close(w)
    return r


def _kill_group(pgid):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _reap_orphans(kill):
    """Reap every exited child; with ``kill``, SIGKILL the process group of any child still alive (orphans a
    contained program left behind, reparented to this subreaper) until none is left. Whether any was alive."""
    found = False
    for _ in range(1000):
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return found
        if pid:
            continue
        if not kill:
            return found
        found = True
        for child in _children():
            _kill_group(child)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        time.sleep(0.005)


def _children():
    me, out = os.getpid(), []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(entry))
    return out


def _run_one(job, index):
    stdin_fd = _stdin_fd(job, index)
    pipes = [os.pipe() for _ in range(4)]  # stdout, stderr, channel, prelude
    setup_r, setup_w = os.pipe()
    sys.stdout.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        for r in (setup_r, *(r for r, _ in pipes)):
            os.close(r)
        _contain(job, index, stdin_fd, [w for _, w in pipes], setup_w)
    for fd in (stdin_fd, setup_w, *(w for _, w in pipes)):
        os.close(fd)
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)
    setup_error = b""
    while chunk := os.read(setup_r, 4096):  # A closes it once contained (or writes why it could not be)
        setup_error += chunk
    os.close(setup_r)
    if setup_error:
        for r, _ in pipes:
            os.close(r)
        os.waitpid(pid, 0)
        return {"setup_error": setup_error.decode("utf-8", "replace")}
    names = ("stdout", "stderr", "channel", "prelude")
    buffers = {name: bytearray() for name in names}
    sizes = dict.fromkeys(names, 0)
    selector = selectors.DefaultSelector()
    for name, (r, _) in zip(names, pipes, strict=False):
        os.set_blocking(r, False)
        selector.register(r, selectors.EVENT_READ, name)
    deadline, outcome, status = start + job["timeout"], None, None
    killed = leftover = False
    while selector.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            if killed:
                break
            if status is None and outcome is None:
                outcome = "timeout"
            _kill_group(pid)  # on timeout, or a finished program whose leftovers still hold its pipes
            if status is None:
                _, status = os.waitpid(pid, 0)
            leftover = _reap_orphans(kill=not job["isolation"]["pid"])
            killed, deadline = True, time.monotonic() + 2.0  # drain what the killed processes left in the pipes
            continue
        for key, _ in selector.select(min(left, 0.05)):
            try:
                chunk = os.read(key.fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                selector.unregister(key.fd)
                continue
            name = key.data
            sizes[name] += len(chunk)
            keep = STDERR_KEEP if name in ("stderr", "prelude") else job["output_bytes"]
            buffers[name] += chunk[: max(0, keep - len(buffers[name]))]
            if sizes[name] > job["output_bytes"] and outcome is None:
                outcome = "output_limit"
                _kill_group(pid)
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st  # leftovers get a short grace to close the pipes (in a pid namespace, none are left)
                deadline = min(deadline, time.monotonic() + 0.5)
    selector.close()
    for r, _ in pipes:
        os.close(r)
    while status is None and time.monotonic() < deadline:  # the pipes are closed: A is about to exit
        done, st = os.waitpid(pid, os.WNOHANG)
        status = st if done else time.sleep(0.001)
    if status is None:
        outcome = outcome or "timeout"
        _kill_group(pid)
        _, status = os.waitpid(pid, 0)
    _kill_group(pid)
    wall = time.monotonic() - start
    leftover = _reap_orphans(kill=not job["isolation"]["pid"]) or leftover
    if leftover and outcome is None:
        outcome = "leftover_process"
    returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    if job["isolation"]["pid"] and returncode is not None and returncode > 128:
        returncode, sig = None, returncode - 128  # B's encoding of "the program died of signal N"
    if job["isolation"]["pid"] and returncode == LEFTOVER and outcome is None:
        outcome = "leftover_process"
    channel = buffers["channel"].decode("utf-8", "replace")
    prelude = buffers["prelude"].decode("utf-8", "replace")
    return {
        "index": index,
        "outcome": outcome or ("signaled" if sig is not None else "exited"),
        "returncode": returncode,
        "signal": sig,
        "stdout": buffers["stdout"].decode("utf-8", "replace"),
        "stderr": buffers["stderr"].decode("utf-8", "replace"),
        "channel": channel,
        "compile_error": prelude or None,
        "wall": wall,
    }


def _probe(uid):
    """Which isolation works here: each piece tried in a throwaway child."""

    def attempt(fn):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                fn()
                _exit(0)
            except BaseException as e:
                _write_all(w, f"{type(e).__name__}: {e}".encode())
                _exit(1)
        os.close(w)
        message = b""
        while chunk := os.read(r, 4096):
            message += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        return (status == 0), message.decode("utf-8", "replace")

    def pid_ns():
        _call("unshare", CLONE_NEWPID | CLONE_NEWIPC)
        child = os.fork()
        if child == 0:
            _exit(0 if os.getpid() == 1 else 1)
        _, status = os.waitpid(child, 0)
        if status != 0:
            raise OSError("the first child of a new pid namespace is not pid 1")

    def mount_ns():
        _call("unshare", CLONE_NEWNS)
        _fresh_workdir(_read_only_view(), None, 1 << 20)
        try:
            open("probe", "w").close()  # noqa: SIM115
        except OSError as e:
            raise OSError(f"the private tmpfs is not writable: {e}") from None

    def user():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid:
            raise OSError("setuid had no effect")

    def seccomp():
        _seccomp()
        try:
            os.close(os.memfd_create("probe", 0))
        except PermissionError:
            return
        raise OSError("the syscall filter let memfd_create through")

    results = {}
    for name, fn in (
        ("net", lambda: _call("unshare", CLONE_NEWNET)),
        ("mount", mount_ns),
        ("pid", pid_ns),
        ("user", user),
        ("seccomp", seccomp),
    ):
        ok, message = attempt(fn)
        results[name] = ok
        if not ok:
            results[f"{name}_error"] = message
    return results


_IMPORT = re.compile(r"(?:^|;)[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import|import[ \t]+([\w., \t]+))", re.MULTILINE)


def _imports(program):
    """Module names (and their parents) that ``program``'s plain import statements name."""
    names = set()
    for match in _IMPORT.finditer(program):
        for part in [match.group(1)] if match.group(1) else match.group(2).split(","):
            name = part.split()[0] if part.split() else ""
            while name:
                names.add(name)
                name = name.rpartition(".")[0]
    return names


def _session(session):
    """Enter the session's network and mount namespaces; the working directory of its tests."""
    iso = session["isolation"]
    if iso["net"]:
        _call("unshare", CLONE_NEWNET)
    if iso["mount"]:
        _call("unshare", CLONE_NEWNS)
        workdir = _read_only_view()
        os.chdir("/")
        return workdir
    return None


def _serve(session, workdir):
    allowed = set(session["preload"])
    while line := sys.stdin.readline():
        if not line.strip():
            continue
        job = json.loads(line)
        job.update(uid=session["uid"], isolation=session["isolation"])
        if workdir is not None:
            job["workdir"] = workdir
        for name in sorted(_imports(job["program"]) & allowed):  # trusted stdlib code, as the harness's user
            with contextlib.suppress(Exception):
                __import__(name)
        for index in range(len(job["inputs"])):
            record = _run_one(job, index)
            print(json.dumps(record), flush=True)
            if "setup_error" in record or record["compile_error"] is not None:
                break
            failed = record["outcome"] != "exited" or record["returncode"] != 0
            if failed and job["stop_on_error"]:
                break
        print('{"done": true}', flush=True)


def main():
    session = json.loads(sys.stdin.readline())
    if session.get("probe"):
        print(json.dumps(_probe(session["uid"])), flush=True)
        return
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        workdir = _session(session)
    except OSError as e:
        print(json.dumps({"setup_error": f"{type(e).__name__}: {e}"}), flush=True)
        return
    print('{"ready": true}', flush=True)
    _serve(session, workdir)


if __name__ == "__main__":
    main()
