"""Run untrusted, model-generated Python code against HumanEval-style tests (Linux only).

Three processes take part (threat model, guarantees and what each kernel or privilege level
cannot contain: ``docs/sandbox.md``):

* the **evaluator** (:func:`run_python`, in this process) starts
* a **monitor** (a fresh ``python -I -S`` running :func:`_monitor_main` from this file), which
  builds the sandbox, starts the program, enforces the time and disk limits, kills every process
  the program left behind, and reports back -- the verdict is the monitor's exit status (0 =
  passed), which only the kernel hands to the evaluator;
* the **program** (``python -I -B -c _RUNNER program.py``). When the evaluator is root it runs as a
  fresh unused uid/gid (no supplementary groups, ``no_new_privs``), in new network, mount and IPC
  namespaces where the kernel allows: the whole filesystem read-only except a private,
  size-limited tmpfs on /tmp (also seen at /var/tmp and /dev/shm), no /proc or /run, an empty
  environment, and resource limits (address space, file size, CPU time, processes, open files).

The program passes when its process exits with status 0, which the in-process runner (_RUNNER)
only does after the program's last statement ran and left the builtins alone. The program gets
no status file, pipe or nonce it could write; it cannot end the process with status 0 earlier
because the runner removes ``os._exit``, Python-level signal handlers and the loaders of new
native modules, and an audit hook refuses tracing, ``exec*``, crafted code objects, opening
``/proc/self/mem`` and, from Python 3.13, frame objects (plus, by default, process spawning and
network access). That in-process guard is a second layer, not a boundary; the isolation above is
the first.

Statuses: ``passed``, ``failed`` (an ``AssertionError`` escaped, i.e. a test failed), ``timeout``
(wall-clock or CPU limit), ``error`` (any other exception, an early ``SystemExit``, a refused
operation, replaced builtins, a limit, or death by a signal). What a run could not contain is
listed in :attr:`ExecutionResult.limitations` and logged once per process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ExecutionResult",
    "build_humaneval_program",
    "check_humaneval",
    "pass_at_1",
    "pass_at_k",
    "run_python",
]

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "error"]

_DETAIL_CHARS = 2000
# uid = gid = _ID_BASE + block * _ID_SPAN + the monitor's pid: unique among live sandboxes (pids
# are), below 2**31 (some tools mishandle larger ids), and clear of ordinary accounts.
_ID_BASE = 2_000_000_000
_ID_SPAN = 1 << 22  # the largest pid_max Linux allows
_OPEN_FILES = 256
_MONITOR_GRACE_S = 30.0  # monitor start-up and clean-up time on top of the program's time limit
_POLL_S = 0.005
_DISK_POLL_S = 0.02
_KILL_DEADLINE_S = 5.0
_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")  # world-writable on most systems
# Exit statuses of the runner; 0 means the program ran to its end.
_EXIT_FAILED, _EXIT_ERROR, _EXIT_EARLY, _EXIT_BUILTINS = 91, 92, 93, 94

# Native modules cannot be loaded once the program runs (their loaders are removed, see _RUNNER),
# so the runner loads these first: the standard-library extensions tests commonly need (names of
# all supported versions; missing ones are skipped), and the pure-Python modules most programs
# import (cheaper from bytecode now than from source later).
_PRELOAD = (
    "_bisect", "_blake2", "_bz2", "_contextvars", "_csv", "_datetime", "_decimal", "_heapq",
    "_json", "_lzma", "_md5", "_opcode", "_pickle", "_posixsubprocess", "_queue", "_random",
    "_sha1", "_sha2", "_sha256", "_sha3", "_sha512", "_socket", "_statistics", "_struct", "_typing",
    "array", "binascii", "cmath", "fcntl", "grp", "math", "mmap", "resource", "select",
    "termios", "unicodedata", "zlib",
    "bisect", "collections", "copy", "functools", "heapq", "importlib.machinery",
    "importlib.util", "itertools", "random", "re", "runpy", "signal", "string", "traceback",
    "typing",
)  # fmt: skip

# Linux constants (the os module of Python 3.10/3.11 has none of these calls).
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_REC = 1024, 2048, 4096, 16384
_MS_PRIVATE, _MS_RELATIME = 1 << 18, 1 << 21
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
_KEPT_MOUNT_OPTIONS = {
    "nosuid": _MS_NOSUID,
    "nodev": _MS_NODEV,
    "noexec": _MS_NOEXEC,
    "noatime": _MS_NOATIME,
    "nodiratime": _MS_NODIRATIME,
    "relatime": _MS_RELATIME,
}


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sandboxed run; ``detail`` holds an error message / stderr tail.

    ``limitations`` lists, one sentence each (prefixed ``user:``, ``network:``, ``filesystem:``
    or ``processes:``), what this kernel or privilege level did not let the sandbox contain; it
    is empty when running as root with namespaces available. It does not take part in equality.
    """

    passed: bool
    status: Status
    detail: str
    seconds: float
    limitations: tuple[str, ...] = field(default=(), compare=False)


# ---------------------------------------------------------------------------------- the runner
# Runs inside the program's process before the program and decides its exit status. The program
# can read this code, walk frames up to _sb_run and patch any module: so _sb_run keeps what it
# needs in fast locals (which nothing can rebind without a tracer, and tracing is refused), and no
# function that could end the process with status 0 early survives anywhere to be found.
_RUNNER = r'''
import sys


def _sb_disarm(sys, posix, _imp, _signal, block_spawn):
    # Replace the functions that could end the process with status 0 before the tests ran
    # (os._exit, a Python signal handler raising SystemExit at the right moment) or undo these
    # replacements (fresh copies of builtin modules, native code); the originals are dropped.
    def refuse(what, error):
        def refused(*args, **kwargs):
            raise error(what + " is disabled in the sandbox")
        return refused

    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # no Python handler left to run
    posix._exit = sys.modules["os"]._exit = refuse("os._exit", OSError)
    _signal.signal = sys.modules["signal"].signal = refuse("installing signal handlers", OSError)
    loading = refuse("loading native modules other than the preloaded ones", ImportError)
    for name in ("create_builtin", "create_dynamic", "exec_builtin", "exec_dynamic",
                 "get_frozen_object", "init_frozen"):
        setattr(_imp, name, loading)
    if block_spawn:  # subprocess binds its own name for it: replace that too, if loaded
        spawning = refuse("starting processes", OSError)
        sys.modules["_posixsubprocess"].fork_exec = spawning
        if "subprocess" in sys.modules:
            sys.modules["subprocess"]._fork_exec = spawning
    # bytecode caches are refused below (marshal); compile sources instead of failing on them
    sys.pycache_prefix = "/proc/lwlora-sandbox-no-bytecode"


def _sb_guard(block_spawn, block_network, hide_frames):
    # An audit hook stays for the life of the process, and once this function returns it is
    # reachable from nowhere. It never calls code the program could have supplied (exact types
    # only, no helper functions), so the program cannot observe or alter it while it runs.
    import posix
    OSError_, type_, issubclass_, str_, bytes_ = OSError, type, issubclass, str, bytes
    getpid = posix.getpid
    main_pid = getpid()
    denied = frozenset((
        "sys.settrace", "sys.setprofile",      # tracers can rebind the runner's locals or jump
        "sys.addaudithook",                    # more hooks would see (and raise into) the runner
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "code.__new__", "marshal.load", "marshal.loads",  # crafted bytecode corrupts memory
        "os.symlink",                          # keeps /proc/<pid>/mem reachable only by that name
    ))
    spawning = frozenset((
        "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system", "os.exec",
        "subprocess.Popen", "pty.spawn",
    ))
    # The ways to obtain a frame object; f_back leads from any frame to the runner's.
    frame_events = frozenset(("sys._getframe", "sys._current_frames"))
    frame_attributes = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame"))

    def hook(event, args):
        if type_(event) is not str_:
            return  # only sys.audit() passes anything else; such events do nothing
        if event in denied:
            raise OSError_(event + " is disabled in the sandbox")
        if hide_frames and (event in frame_events or (
            event == "object.__getattr__" and type_(args[1]) is str_ and args[1] in frame_attributes
        )):
            raise OSError_("access to frames is disabled in the sandbox (" + event + ")")
        if event == "os.exec" and getpid() == main_pid:
            raise OSError_("replacing the program (os.exec*) is disabled in the sandbox")
        if block_spawn and event in spawning:
            raise OSError_("starting processes is disabled in the sandbox (" + event + ")")
        if block_network and str_.startswith(event, "socket."):
            raise OSError_("network access is disabled in the sandbox (" + event + ")")
        if event == "open":
            # /proc/<pid>/mem: writing it rewrites the interpreter's machine code
            # (type and unbound methods: no __class__ or method override of a subclass runs)
            path, tail = args[0], None
            if issubclass_(type_(path), str_):
                tail = str_.rpartition(str_.rstrip(path, "/"), "/")[2]
            elif issubclass_(type_(path), bytes_):
                tail = str_(bytes_.rpartition(bytes_.rstrip(path, b"/"), b"/")[2], "latin-1")
            if tail == "mem":
                raise OSError_("opening process memory is disabled in the sandbox")

    sys.addaudithook(hook)


def _sb_run(argv):
    import builtins, posix, _imp, _signal
    for name in sys.builtin_module_names + __PRELOAD__:
        try:
            __import__(name)
        except ImportError:
            pass
    import traceback

    path = argv[1]
    with open(path, encoding="utf-8") as file:
        source = file.read()
    exec_, compile_, tuple_, zip_, len_, type_, str_ = exec, compile, tuple, zip, len, type, str
    encode, write = str.encode, posix.write
    BaseException_, AssertionError_, SystemExit_ = BaseException, AssertionError, SystemExit
    format_exception = traceback.format_exception
    # From 3.13 frame.f_locals writes through (PEP 667): the program could rebind the locals
    # below, so it gets no frames at all -- and the failure detail is formed without them.
    hide_frames = sys.version_info >= (3, 13)
    _sb_disarm(sys, posix, _imp, _signal, argv[2] == "1")
    _sb_guard(argv[2] == "1", argv[3] == "1", hide_frames)

    module = type(sys)("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = [path]
    builtins_dict = builtins.__dict__
    before = tuple(builtins_dict.items())
    status, error = 0, None
    try:
        exec_(compile_(source, path, "exec"), module.__dict__)
    except AssertionError_ as exc:
        status, error = __EXIT_FAILED__, exc
    except SystemExit_ as exc:
        status, error = __EXIT_EARLY__, exc
    except BaseException_ as exc:
        status, error = __EXIT_ERROR__, exc
    if status == 0:
        # by position and identity: iterating a dict runs no code of the program (lookups
        # would call __eq__ of keys it added); a replaced value keeps its position
        after = tuple_(builtins_dict.items())
        changed = [
            was[0]
            for was, now in zip_(before, after)
            if was[0] is not now[0] or was[1] is not now[1]
        ]
        if changed or len_(after) < len_(before):
            status = __EXIT_BUILTINS__
            error = "the program replaced builtins: " + ", ".join(changed)
    if status:
        try:
            if status == __EXIT_EARLY__:
                text = "the program exited early via SystemExit(" + repr(error.code) + ")"
            elif status == __EXIT_BUILTINS__:
                text = error
            elif hide_frames:
                text = type_(error).__name__ + ": " + str_(error)
            else:
                text = "".join(format_exception(error))
        except BaseException_:
            text = "(the error could not be formatted)"
        try:
            write(2, encode("\n" + text, "utf-8", "replace"))
        except BaseException_:
            pass
        raise SystemExit_(status)


_sb_run(sys.argv)
'''
_RUNNER_SOURCE = (
    _RUNNER.replace("__PRELOAD__", repr(_PRELOAD))
    .replace("__EXIT_FAILED__", str(_EXIT_FAILED))
    .replace("__EXIT_ERROR__", str(_EXIT_ERROR))
    .replace("__EXIT_EARLY__", str(_EXIT_EARLY))
    .replace("__EXIT_BUILTINS__", str(_EXIT_BUILTINS))
)

# Loads this file as a module without importing the lwlora package, then runs the monitor.
_MONITOR_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_lwlora_sandbox_monitor', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module._monitor_main()\n"
)


# --------------------------------------------------------------------------------- public API
def run_python(
    code: str,
    timeout_s: float = 10.0,
    memory_bytes: int | None = 1 << 30,
    max_file_bytes: int | None = 64 << 20,
    max_disk_bytes: int | None = 128 << 20,
    max_files: int | None = 10_000,
    max_processes: int | None = 64,
    block_process_spawn: bool = True,
    block_network: bool = True,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ExecutionResult:
    """Run ``code`` as a Python program in the sandbox (see the module docstring).

    ``memory_bytes``, ``max_file_bytes`` and ``max_processes`` set RLIMIT_AS, RLIMIT_FSIZE and
    RLIMIT_NPROC (the last on top of the tasks the program's user already has: none for the fresh
    uid used as root); ``max_disk_bytes`` and ``max_files`` bound what the program stores in
    total. None leaves a limit unset. ``block_process_spawn`` / ``block_network`` turn the
    in-process refusal of process creation / sockets on; the namespaces apply either way.
    ``python`` (default ``sys.executable``) runs the program; ``env`` adds environment variables.
    """
    if not sys.platform.startswith("linux"):
        raise RuntimeError("the sandbox needs Linux (namespaces, prctl, /proc)")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    python = python or sys.executable
    program_paths = _interpreter_paths(python)
    # the monitor's own interpreter too: it may still import after the mounts
    paths = {*program_paths["paths"], *_interpreter_paths(sys.executable)["paths"]}
    root = tempfile.mkdtemp(prefix="lwlora-sandbox-")
    try:
        job = {
            "parent": os.getpid(),
            "root": root,
            "code": code,
            "python": python,
            "interpreter": program_paths["interpreter"],
            "paths": sorted(paths),
            "timeout_s": timeout_s,
            "memory_bytes": memory_bytes,
            "max_file_bytes": max_file_bytes,
            "max_disk_bytes": max_disk_bytes,
            "max_files": max_files,
            "max_processes": max_processes,
            "block_process_spawn": block_process_spawn,
            "block_network": block_network,
            "env": dict(env or {}),
        }
        return _run_monitor(job)
    finally:
        _remove_tree(root)


def build_humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """HumanEval check program: ``prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"``."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
    )


def check_humaneval(
    problem: Mapping[str, Any], completion: str, timeout_s: float = 10.0, **kwargs: Any
) -> ExecutionResult:
    """Run a completion against a HumanEval problem's tests (keyword args go to :func:`run_python`)."""
    return run_python(
        build_humaneval_program(problem, completion), timeout_s=timeout_s, **kwargs
    )


def pass_at_1(results: Iterable[ExecutionResult | bool]) -> float:
    """Fraction of passed results (one sample per problem). Raises ValueError when empty."""
    flags = [r.passed if isinstance(r, ExecutionResult) else bool(r) for r in results]
    if not flags:
        raise ValueError("pass_at_1 needs at least one result")
    return sum(flags) / len(flags)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem: ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021)."""
    if not 0 <= num_correct <= num_samples or not 1 <= k <= num_samples:
        raise ValueError(
            f"need 0 <= c <= n and 1 <= k <= n, got n={num_samples}, c={num_correct}, k={k}"
        )
    if num_samples - num_correct < k:
        return 1.0
    prod = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


# ------------------------------------------------------------------------------ evaluator side
_logged_limitations: set[str] = set()


@functools.lru_cache(maxsize=None)
def _interpreter_paths(python: str) -> dict[str, tuple[str, ...]]:
    """Directories the program's interpreter needs to start (``"interpreter"``: its own and its
    prefixes) and may import from (``"paths"``: those and ``sys.path``), so that the monitor can
    make them reachable for the program's uid (e.g. pyenv's Python under /root)."""
    probe = (
        "import json, sys; print(json.dumps([[sys.prefix, sys.base_prefix, sys.exec_prefix,"
        " sys.base_exec_prefix], sys.path]))"
    )
    listed = subprocess.run(
        [python, "-I", "-c", probe],
        capture_output=True,
        check=True,
        timeout=60,
        env={"PATH": os.defpath},
    ).stdout
    prefixes, search = json.loads(listed)
    own = [os.path.dirname(os.path.abspath(python)), os.path.dirname(os.path.realpath(python))]
    interpreter = {os.path.realpath(p) for p in own + prefixes if os.path.isdir(p)}
    paths = interpreter | {os.path.realpath(p) for p in search if p and os.path.isdir(p)}
    return {"interpreter": tuple(sorted(interpreter)), "paths": tuple(sorted(paths))}


def _run_monitor(job: dict[str, Any]) -> ExecutionResult:
    """Start the monitor on ``job``, wait for it and turn its report into a result."""
    monitor = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _MONITOR_BOOT, os.path.abspath(__file__)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.defpath, "LC_ALL": "C.UTF-8"},
        cwd="/",
        close_fds=True,
        start_new_session=True,  # no terminal signals, and the program cannot reach our group
    )
    try:
        out, err = monitor.communicate(
            json.dumps(job).encode(), timeout=job["timeout_s"] + _MONITOR_GRACE_S
        )
    except subprocess.TimeoutExpired:
        monitor.kill()
        out, err = monitor.communicate()
    except BaseException:
        monitor.kill()
        monitor.wait()
        _clean_up_after(monitor.pid)
        raise
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    if monitor.returncode not in (0, 1) or report is None:
        _clean_up_after(monitor.pid)
        tail = err.decode("utf-8", "replace").strip()[-_DETAIL_CHARS:]
        return ExecutionResult(
            False, "error", f"the sandbox monitor failed (status {monitor.returncode}): {tail}", 0.0
        )
    limitations = tuple(report["limitations"])
    for text in limitations:
        if text not in _logged_limitations:
            _logged_limitations.add(text)
            logger.warning("code sandbox: %s", text)
    passed = monitor.returncode == 0 and report["status"] == "passed"
    status = report["status"] if passed or report["status"] != "passed" else "error"
    return ExecutionResult(passed, status, report["detail"], report["seconds"], limitations)


def _clean_up_after(monitor_pid: int) -> None:
    """The monitor died (it cannot be killed by the program when we are root): kill whatever is
    left running under the uid it gave the program."""
    if os.geteuid() != 0:
        return
    ident = _sandbox_id(monitor_pid)
    if ident is None:
        return
    proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + _KILL_DEADLINE_S
        while _kill_round(proc_fd, None, ident) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    finally:
        os.close(proc_fd)


def _remove_tree(path: str) -> None:
    """Delete ``path`` (file or directory), first giving back the permissions a program running
    as our own uid may have taken away (root needs none). Symlinks are removed, never followed."""
    if not os.path.isdir(path) or os.path.islink(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    if os.geteuid() != 0:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)
        for parent, dirs, _files in os.walk(path):  # top-down: fixed before it is entered
            for child in (os.path.join(parent, name) for name in dirs):
                if not os.path.islink(child):
                    with contextlib.suppress(OSError):
                        os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- shared by both sides
def _sandbox_id(monitor_pid: int) -> int | None:
    """The uid (= gid) the program of monitor ``monitor_pid`` runs as, if one is free: not in the
    password or group database, and never shared by two live monitors."""
    import grp
    import pwd

    for block in range(4):
        candidate = _ID_BASE + block * _ID_SPAN + monitor_pid
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
        except KeyError:
            return candidate
    return None


def _process_table(proc_fd: int) -> dict[int, tuple[str, int, int, int]]:
    """pid -> (state, ppid, real uid, threads) of every process, read through ``proc_fd`` (an
    fd on the real /proc: the monitor hides /proc from the program by mounting over it)."""
    table = {}
    for name in os.listdir(proc_fd):
        if name.isdigit() and (entry := _process_status(proc_fd, int(name))) is not None:
            table[int(name)] = entry
    return table


def _process_status(proc_fd: int, pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, real uid, threads) of ``pid``, or None once it is gone."""
    try:
        fd = os.open(f"{pid}/status", os.O_RDONLY, dir_fd=proc_fd)
        try:
            data = os.read(fd, 8192)
        finally:
            os.close(fd)
    except OSError:
        return None
    fields = {}
    for line in data.decode("ascii", "replace").splitlines():
        key, _, value = line.partition(":")
        if key in ("State", "PPid", "Uid", "Threads"):
            fields[key] = value.split()
    try:
        state, ppid, uid = fields["State"][0], int(fields["PPid"][0]), int(fields["Uid"][0])
        return state, ppid, uid, int(fields["Threads"][0])
    except (KeyError, IndexError, ValueError):
        return None


def _kill_round(proc_fd: int, root_pid: int | None, uid: int | None) -> list[int]:
    """SIGKILL every live process that descends from ``root_pid`` or runs as ``uid``, and return
    them. Reparenting to the monitor (a subreaper) means none can leave the subtree, however it
    detaches (setsid, double fork)."""
    table = _process_table(proc_fd)
    children: dict[int, list[int]] = {}
    for pid, (_state, ppid, _uid, _threads) in table.items():
        children.setdefault(ppid, []).append(pid)
    ours: set[int] = set()
    stack = [root_pid] if root_pid is not None else []
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in ours:
                ours.add(child)
                stack.append(child)
    if uid is not None:
        ours.update(pid for pid, entry in table.items() if entry[2] == uid)
    ours.discard(os.getpid())
    live = [pid for pid in ours if table[pid][0] not in ("Z", "X")]
    parents = ours | ({root_pid} if root_pid is not None else set())
    for pid in live:
        _kill(proc_fd, pid, lambda st: st[1] in parents or st[2] == uid)
    return live


def _kill(proc_fd: int, pid: int, still_ours: Any) -> None:
    """SIGKILL ``pid`` through a pidfd, after re-checking it is still the process we meant (the
    number may have been reused since the scan)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # pragma: no cover - kernels before 5.3
        current = _process_status(proc_fd, pid)
        if current is not None and still_ours(current):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return
    try:
        current = _process_status(proc_fd, pid)
        if current is not None and still_ours(current):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


# --------------------------------------------------------------------------------- the monitor
class _Libc:
    """unshare, mount, umount2 and prctl via ctypes (not in the os module before Python 3.12)."""

    def __init__(self) -> None:
        import ctypes

        self._get_errno = ctypes.get_errno
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        self._libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            errno = self._get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def unshare(self, flags: int) -> None:
        self._check(self._libc.unshare(flags), "unshare")

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str = ""
    ) -> None:
        encoded = [s.encode() if s is not None else None for s in (source, target, fstype, data)]
        self._check(
            self._libc.mount(encoded[0], encoded[1], encoded[2], flags, encoded[3]),
            f"mount {target}",
        )

    def detach(self, target: str) -> None:
        self._check(self._libc.umount2(target.encode(), _MNT_DETACH), f"umount {target}")

    def prctl(self, option: int, value: int) -> None:
        self._check(self._libc.prctl(option, value, 0, 0, 0), "prctl")


@dataclass(frozen=True)
class _Layout:
    """Where and as whom the program runs: its uid/gid (None: the monitor's own), its cwd/HOME,
    its TMPDIR, the program file, and what the monitor polls for the disk limit (None when a
    size-limited tmpfs enforces it)."""

    ident: int | None
    work: str
    tmp: str
    program: str
    polled: str | None


def _monitor_main() -> None:
    """Entry point of the monitor process: read the job from stdin, run it, print the report;
    exit status 0 exactly when the program passed."""
    job = json.loads(sys.stdin.buffer.read())
    report = _run_job(job)
    sys.stdout.write(json.dumps(report))
    sys.stdout.flush()
    sys.exit(0 if report["status"] == "passed" else 1)


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Build the sandbox, run the program, stop everything it started and judge it."""
    os.umask(0o022)
    libc = _Libc()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the evaluator's death ends the run
    if os.getppid() != job["parent"]:
        return _report("error", "the evaluator exited before the sandbox started", 0.0, [])
    libc.prctl(_PR_SET_DUMPABLE, 0)  # a same-uid program cannot ptrace us or open our /proc
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of the program become our children
    proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    limitations: list[str] = []
    ident, why = _identity()
    if why:
        limitations.append(why)
    if ident is not None:
        _stop_everything(proc_fd, ident, {})  # left by an earlier monitor with our pid
    try:
        libc.unshare(_CLONE_NEWNET)
    except OSError as exc:
        guard = "only the in-process guard blocks network access"
        limitations.append(
            f"network: no network namespace ({exc}); "
            + (guard if job["block_network"] else f"{guard}, and it is off")
        )
    err_fd = os.open(os.path.join(job["root"], "stderr"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        layout = _filesystem(libc, job, ident, limitations)
    except OSError as exc:
        return _report("error", f"could not build the sandbox: {exc}", 0.0, limitations)
    with open(layout.program, "w", encoding="utf-8") as file:
        file.write(job["code"])
    return _judge(job, libc, proc_fd, layout, err_fd, limitations)


def _filesystem(
    libc: _Libc, job: dict[str, Any], ident: int | None, limitations: list[str]
) -> _Layout:
    """A private filesystem view where the kernel allows one, else a private directory (which
    may mean giving up the program's own uid: the layout says as whom it runs)."""
    try:
        return _private_filesystem(libc, job, ident, limitations)
    except _NoMountNamespace as exc:
        limitations.append(
            f"filesystem: no mount namespace ({exc.__cause__}): the program can write where its"
            " uid may (its files in /tmp, /var/tmp, /dev/shm and /run/lock are removed"
            " afterwards), total disk use is checked by polling, and /proc stays visible"
        )
        if ident is not None and any(_blocking_ancestor(p) for p in job["interpreter"]):
            limitations.append(
                "user: the Python installation is not readable by other users and cannot be"
                " exposed without a mount namespace, so the program runs as root"
            )
            ident = None
        return _shared_filesystem(job, ident)


def _judge(
    job: dict[str, Any],
    libc: _Libc,
    proc_fd: int,
    layout: _Layout,
    err_fd: int,
    limitations: list[str],
) -> dict[str, Any]:
    """Run the program to its end or a limit, stop everything, and build the report."""
    ident = layout.ident
    statuses: dict[int, int] = {}
    start = time.monotonic()
    try:
        program = _spawn(job, libc, proc_fd, layout, err_fd)
    except (OSError, subprocess.SubprocessError) as exc:
        return _report("error", f"could not start the program: {exc}", 0.0, limitations)
    stopped, end = _wait(program.pid, start + job["timeout_s"], job, layout, statuses)
    left = _stop_everything(proc_fd, ident, statuses)
    if layout.polled is not None and ident is not None:
        for shared in _SHARED_DIRS:
            _remove_owned(shared, ident)
    if left:
        limitations.append(f"processes: could not kill processes {left} of the program")
    status, detail = _outcome(job, statuses.get(program.pid), stopped)
    tail = _tail(err_fd)
    if status in ("failed", "error") and tail:
        detail = f"{detail}\n{tail}".strip() if detail else tail
    return _report(status, detail[-_DETAIL_CHARS:], end - start, limitations)


def _report(status: str, detail: str, seconds: float, limitations: list[str]) -> dict[str, Any]:
    """The monitor's JSON report (its exit status carries the verdict itself)."""
    return {"status": status, "detail": detail, "seconds": seconds, "limitations": limitations}


def _identity() -> tuple[int | None, str | None]:
    """The uid/gid the program will run as, or None and why it keeps the monitor's own."""
    if os.geteuid() != 0:
        return None, (
            f"user: not running as root, so the program runs as your own user (uid"
            f" {os.geteuid()}): it can read and write your files and signal or inspect your"
            " other processes"
        )
    ident = _sandbox_id(os.getpid())
    if ident is None:
        return None, "user: no unused uid found, so the program runs as root"
    if not (_is_mapped("/proc/self/uid_map", ident) and _is_mapped("/proc/self/gid_map", ident)):
        return None, (
            f"user: uid {ident} is not mapped in this user namespace, so the program runs as root"
        )
    return ident, None


def _is_mapped(map_file: str, ident: int) -> bool:
    """Whether ``ident`` exists in this user namespace (one line of ``inside outside count``)."""
    with open(map_file, encoding="ascii") as file:
        for line in file:
            inside, _outside, count = (int(x) for x in line.split())
            if inside <= ident < inside + count:
                return True
    return False


class _NoMountNamespace(Exception):
    """The kernel refused a private mount namespace; nothing visible has changed yet."""


def _private_filesystem(
    libc: _Libc, job: dict[str, Any], ident: int | None, limitations: list[str]
) -> _Layout:
    """Give the program a read-only view of the filesystem with a private tmpfs on /tmp (size
    and inode limited, also at /var/tmp and /dev/shm), its interpreter reachable, and neither
    /proc nor /run.
    Mounts that would not turn read-only are added to ``limitations``."""
    stage = os.path.join(job["root"], "stage")
    os.mkdir(stage, 0o700)
    try:
        libc.unshare(_CLONE_NEWNS | _CLONE_NEWIPC)
        libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount reaches the host
        libc.mount("tmpfs", stage, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0700")
    except OSError as exc:
        raise _NoMountNamespace() from exc
    if ident is not None:
        _expose(libc, job["paths"], stage)
    libc.detach(stage)
    limitations.extend(_make_read_only(libc))
    kept = _hold_paths_under_shared_dirs(libc, job["paths"])
    size = job["max_disk_bytes"] or 0  # 0: unlimited
    inodes = job["max_files"] + 8 + sum(p.count("/") for _, p in kept) if job["max_files"] else 0  # room for work/, program.py and the held paths' directories
    owner = f",uid={ident},gid={ident}" if ident is not None else ""
    options = f"size={size},nr_inodes={inodes},mode=0700{owner}"
    libc.mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    os.mkdir("/tmp/work", 0o700)
    if ident is not None:
        os.chown("/tmp/work", ident, ident)
    for shared in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(shared):
            libc.mount("/tmp", shared, None, _MS_BIND)
    for held, path in kept:  # the interpreter's paths under /tmp, back at their places, read-only
        os.makedirs(path, mode=0o755, exist_ok=True)
        libc.mount(held, path, None, _MS_BIND | _MS_REC)
        libc.mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    # Empty over /proc (other processes, and our own memory) and /run (daemons' sockets, which
    # stay connectable on a read-only mount and in a new network namespace).
    readonly = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    for hidden in ("/proc", "/run"):
        if os.path.isdir(hidden) and not os.path.islink(hidden):
            libc.mount("tmpfs", hidden, "tmpfs", readonly, "size=4k,mode=0555")
    return _Layout(ident, work="/tmp/work", tmp="/tmp", program="/tmp/program.py", polled=None)


def _hold_paths_under_shared_dirs(libc: _Libc, paths: Iterable[str]) -> list[tuple[str, str]]:
    """The interpreter's paths that the private tmpfs on /tmp (and /var/tmp, /dev/shm) would hide
    (a virtual environment under /tmp): each outermost one is bind-mounted to a hold under /run
    (itself covered with an empty tmpfs later), to be mounted back at its place once the tmpfs is
    up. Returns (hold, path) pairs; none when no path lies under those directories."""
    under = sorted({p for p in paths if any(p == d or p.startswith(d + "/") for d in _SHARED_DIRS[:3])})
    outermost = [p for p in under if not any(p.startswith(q + "/") for q in under)]
    if not outermost:
        return []
    if not os.path.isdir("/run") or os.path.islink("/run"):
        raise RuntimeError(f"the sandbox's interpreter lives under a shared temporary directory ({outermost[0]}) and this system has no /run to hold it while /tmp is replaced; use a Python outside /tmp, /var/tmp and /dev/shm")
    libc.mount("tmpfs", "/run", "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0700")
    kept = []
    for number, path in enumerate(outermost):
        hold = f"/run/held-{number}"
        os.mkdir(hold, 0o700)
        libc.mount(path, hold, None, _MS_BIND | _MS_REC)
        kept.append((hold, path))
    return kept


def _expose(libc: _Libc, paths: Iterable[str], stage: str) -> None:
    """Make ``paths`` reachable for the program's uid: each directory other users cannot enter
    (e.g. /root, where pyenv installs Python) is covered by an empty tmpfs into which only the
    needed paths are bind-mounted back -- which also hides the rest of it from the program."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        blocker = _blocking_ancestor(path)
        if blocker is not None and blocker != path:
            groups.setdefault(blocker, []).append(path)
    slots = 0
    for blocker, members in sorted(groups.items()):
        outermost = [p for p in members if not any(p.startswith(q + "/") for q in members)]
        staged = []
        for path in sorted(set(outermost)):
            slot = os.path.join(stage, str(slots))
            slots += 1
            os.mkdir(slot)
            libc.mount(path, slot, None, _MS_BIND | _MS_REC)
            staged.append((slot, path))
        libc.mount("tmpfs", blocker, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
        for slot, path in staged:
            os.makedirs(path, mode=0o755, exist_ok=True)
            libc.mount(slot, path, None, _MS_BIND | _MS_REC)


def _blocking_ancestor(path: str) -> str | None:
    """The topmost directory on the way to ``path`` (itself included) that users other than its
    owner and group cannot enter, or None."""
    current = "/"
    for part in path.strip("/").split("/"):
        current = os.path.join(current, part)
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return None
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return current
    return None


def _make_read_only(libc: _Libc) -> list[str]:
    """Remount every mount of this namespace read-only, keeping its other flags; returns a
    limitation for each one the kernel refused."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as file:
        mounts = [line.split() for line in file]
    problems = []
    for fields in mounts:
        point = fields[4]
        for escaped, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
            point = point.replace(escaped, char)
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for option in fields[5].split(","):
            flags |= _KEPT_MOUNT_OPTIONS.get(option, 0)
        try:
            libc.mount(None, point, None, flags)
        except OSError as exc:
            problems.append(f"filesystem: {point} stays writable ({exc.strerror})")
    return problems


def _shared_filesystem(job: dict[str, Any], ident: int | None) -> _Layout:
    """Without a mount namespace: a private 0700 directory owned by the program's uid."""
    root = job["root"]
    box = os.path.join(root, "box")
    work, tmp = os.path.join(box, "work"), os.path.join(box, "tmp")
    for directory in (box, work, tmp):
        os.mkdir(directory, 0o700)
        if ident is not None:
            os.chown(directory, ident, ident)
    os.chmod(root, 0o711)  # the program may pass through, not list or open what else is here
    if ident is not None and (blocker := _blocking_ancestor(root)) is not None:
        raise OSError(f"{blocker} is closed to other users: set TMPDIR to a directory like /tmp")
    return _Layout(ident, work=work, tmp=tmp, program=os.path.join(box, "program.py"), polled=box)


def _spawn(
    job: dict[str, Any], libc: _Libc, proc_fd: int, layout: _Layout, err_fd: int
) -> subprocess.Popen[bytes]:
    """Start the program as ``layout.ident`` with its resource limits, an empty environment and
    only stdin (/dev/null), stdout (/dev/null) and stderr (our file) open."""
    ident = layout.ident
    limits = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, _OPEN_FILES)]
    if job["memory_bytes"] is not None:
        limits.append((resource.RLIMIT_AS, job["memory_bytes"]))
    if job["max_file_bytes"] is not None:
        limits.append((resource.RLIMIT_FSIZE, job["max_file_bytes"]))
    limits.append((resource.RLIMIT_CPU, math.ceil(job["timeout_s"]) + 1))
    if job["max_processes"] is not None:
        owner = ident if ident is not None else os.getuid()
        limits.append((resource.RLIMIT_NPROC, _count_tasks(proc_fd, owner) + job["max_processes"]))
    monitor = os.getpid()

    def set_up() -> None:  # runs in the child after the uid change, before exec
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # a uid change clears it
        if os.getppid() != monitor:
            os._exit(1)
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries grant nothing
        for limit, value in limits:
            hard = resource.getrlimit(limit)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(limit, (value, value))

    flags = ["1" if job["block_process_spawn"] else "0", "1" if job["block_network"] else "0"]
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": layout.work,
        "TMPDIR": layout.tmp,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        **job["env"],
    }
    identity = {"user": ident, "group": ident, "extra_groups": []} if ident is not None else {}
    return subprocess.Popen(
        [job["python"], "-I", "-B", "-c", _RUNNER_SOURCE, layout.program, *flags],
        cwd=layout.work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=err_fd,
        close_fds=True,
        start_new_session=True,  # a kill(0, ...) by the program stays in its own group
        preexec_fn=set_up,  # noqa: PLW1509 - the monitor is single-threaded
        **identity,
    )


def _count_tasks(proc_fd: int, uid: int) -> int:
    """Tasks (threads) of ``uid`` as RLIMIT_NPROC counts them: a fresh uid has none."""
    return sum(entry[3] for entry in _process_table(proc_fd).values() if entry[2] == uid)


def _wait(
    pid: int, deadline: float, job: dict[str, Any], layout: _Layout, statuses: dict[int, int]
) -> tuple[str | None, float]:
    """Wait for the program to exit, reaping orphans meanwhile; returns (why it was stopped,
    when it ended) -- ``"timeout"`` or ``"disk"``, or None when it exited by itself."""
    next_check = 0.0
    while True:
        _reap(statuses)
        now = time.monotonic()
        if pid in statuses:
            return None, now
        if now >= deadline:
            return "timeout", now
        if layout.polled is not None and now >= next_check:
            if _over_disk_limit(layout.polled, job["max_disk_bytes"], job["max_files"]):
                return "disk", now
            next_check = now + _DISK_POLL_S
        time.sleep(_POLL_S)


def _reap(statuses: dict[int, int]) -> bool:
    """Collect every exited child's wait status; returns whether any child is left."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
        statuses[pid] = status


def _stop_everything(proc_fd: int, uid: int | None, statuses: dict[int, int]) -> list[int]:
    """Kill every process the program started and reap them; returns any that would not die."""
    deadline = time.monotonic() + _KILL_DEADLINE_S
    while True:
        alive = _kill_round(proc_fd, os.getpid(), uid)
        children = _reap(statuses)
        if not alive and not children:
            return []
        if time.monotonic() > deadline:
            return sorted(alive)
        time.sleep(0.001)


def _over_disk_limit(top: str, max_bytes: int | None, max_files: int | None) -> bool:
    """Whether the files under ``top`` use more than ``max_bytes`` (allocated blocks, so sparse
    files count what they occupy) or number more than ``max_files``."""
    used = count = 0
    pending = [top]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            count += 1
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            used += info.st_blocks * 512
            if stat.S_ISDIR(info.st_mode):
                pending.append(entry.path)
        if (max_files is not None and count > max_files) or (
            max_bytes is not None and used > max_bytes
        ):
            return True
    return False


def _remove_owned(top: str, uid: int) -> None:
    """Remove what ``uid`` created under ``top``: its own entries, searching only directories
    anyone may write to (it could have written nowhere else)."""
    pending = [top]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_uid == uid:
                _remove_tree(entry.path)
            elif stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_IWOTH:
                pending.append(entry.path)


def _outcome(job: dict[str, Any], wait_status: int | None, stopped: str | None) -> tuple[str, str]:
    """(status, detail) from how the program ended."""
    if stopped == "timeout":
        return "timeout", f"exceeded time limit of {job['timeout_s']:g}s"
    if stopped == "disk":
        return "error", (
            f"exceeded the disk limit ({job['max_disk_bytes']} bytes, {job['max_files']} files)"
        )
    if wait_status is None:
        return "error", "the program's exit status was lost"
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGXCPU:
            return "timeout", f"exceeded CPU time limit of {job['timeout_s']:g}s"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        why = {"SIGXFSZ": " (file size limit exceeded)", "SIGKILL": " (killed, e.g. out of memory)"}
        return "error", f"killed by signal {name}{why.get(name, '')}"
    code = os.WEXITSTATUS(wait_status)
    if code == 0:
        return "passed", ""
    if code == _EXIT_FAILED:
        return "failed", ""
    if code in (_EXIT_ERROR, _EXIT_EARLY, _EXIT_BUILTINS):
        return "error", ""
    return "error", f"exited with code {code} before the program finished"


def _tail(fd: int, limit: int = _DETAIL_CHARS) -> str:
    """The last ``limit`` characters the program wrote to stderr."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, limit * 4, max(0, size - limit * 4))
    return data.decode("utf-8", "replace").strip()[-limit:]
