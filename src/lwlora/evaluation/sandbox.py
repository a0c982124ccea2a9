"""Run untrusted, model-generated Python code against HumanEval-style tests in a subprocess.

**Best effort, not a security boundary.** The code runs as a separate ``python -I`` process:

* in a fresh temporary directory (its cwd, deleted afterwards) with a minimal environment
  (proxy variables removed, ``no_proxy=*``, ``HOME`` = that directory, BLAS threads = 1);
* in a new session / process group (``start_new_session=True``); when the time limit (default
  10 s) expires -- and after every run, to catch stray background children -- the *whole group*
  is sent SIGKILL (``os.killpg``) while the leader is still unreaped, so its id cannot have been
  reused;
* with ``resource`` limits set in ``preexec_fn``: ``RLIMIT_AS`` (default 1 GiB address space, so
  allocations fail with MemoryError), ``RLIMIT_FSIZE`` (largest file it may write, including its
  redirected stdout/stderr), ``RLIMIT_CPU`` (CPU seconds, a backstop) and ``RLIMIT_CORE`` = 0, and
  ``RLIMIT_NPROC`` (current number of the user's tasks + ``max_processes``) against fork bombs.
  **RLIMIT_NPROC is not enforced for root** (or any process with CAP_SYS_RESOURCE/CAP_SYS_ADMIN):
  running as root, a fork bomb is stopped only by the time limit and the process-group kill;
* with a prelude, run before the user program, that replaces ``socket.socket`` (and
  ``_socket.socket``) by a subclass whose constructor raises ``OSError`` and makes name lookups
  (``getaddrinfo`` & co.) and ``socketpair``/``fromfd`` raise: no network, unless the code goes
  around Python (ctypes) -- real isolation needs a network namespace/container;
* by default the prelude also disables process spawning from Python (``os.fork``/``forkpty``/
  ``system``/``popen``/``exec*``/``spawn*``/``posix_spawn*``, ``subprocess.Popen``,
  ``_posixsubprocess.fork_exec``), so ``os.fork()`` raises ``OSError`` right away
  (``block_process_spawn=False`` turns that off; again bypassable via ctypes).

A child that detaches itself into another session/process group (``os.setsid`` after a fork)
escapes the group kill; the spawn guard above is what prevents that in practice.

Statuses: ``passed`` (the program ran to the end), ``failed`` (it raised ``AssertionError``, i.e. a
test failed), ``timeout`` (wall-clock or CPU limit), ``error`` (any other exception, including
``MemoryError``, ``SyntaxError``, ``SystemExit``/``os._exit`` before the end, or death by a
signal). POSIX only (uses ``resource``, ``preexec_fn`` and process groups).
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "ExecutionResult",
    "build_humaneval_program",
    "check_humaneval",
    "group_members",
    "pass_at_1",
    "pass_at_k",
    "run_python",
]

Status = Literal["passed", "failed", "timeout", "error"]

_DETAIL_CHARS = 2000


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sandboxed run; ``detail`` holds an error message / stderr tail."""

    passed: bool
    status: Status
    detail: str
    seconds: float


_NETWORK_PRELUDE = """
import socket as _sb_socket, _socket as _sb__socket
def _sb_no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
class _SbBlockedSocket(_sb_socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled in the sandbox")
_sb_socket.socket = _SbBlockedSocket
_sb_socket.SocketType = _SbBlockedSocket
_sb__socket.socket = _SbBlockedSocket
_sb__socket.SocketType = _SbBlockedSocket
for _sb_name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo"):
    if hasattr(_sb_socket, _sb_name):
        setattr(_sb_socket, _sb_name, _sb_no_network)
    if hasattr(_sb__socket, _sb_name):
        setattr(_sb__socket, _sb_name, _sb_no_network)
"""

_SPAWN_PRELUDE = """
import os as _sb_os, subprocess as _sb_subprocess
def _sb_no_spawn(*args, **kwargs):
    raise OSError("starting processes is disabled in the sandbox")
for _sb_name in dir(_sb_os):
    if _sb_name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp",
                    "register_at_fork") or _sb_name.startswith(("exec", "spawn")):
        setattr(_sb_os, _sb_name, _sb_no_spawn)
class _SbBlockedPopen(_sb_subprocess.Popen):
    def __init__(self, *args, **kwargs):
        raise OSError("starting processes is disabled in the sandbox")
_sb_subprocess.Popen = _SbBlockedPopen
try:
    import _posixsubprocess as _sb_ps
    _sb_ps.fork_exec = _sb_no_spawn
except ImportError:
    pass
"""

_RUNNER = """
import sys as _sb_sys
_sb_sys.setrecursionlimit(10000)
import runpy as _sb_runpy, traceback as _sb_traceback
def _sb_report(status, detail=""):
    with open({status_path!r}, "w", encoding="utf-8") as _sb_f:
        _sb_f.write(status + "\\n" + {nonce!r} + "\\n" + detail)
try:
    _sb_runpy.run_path({program_path!r}, run_name="__main__")
except AssertionError as _sb_e:
    _sb_traceback.print_exc()
    _sb_report("failed", "AssertionError: " + str(_sb_e))
    _sb_sys.exit(1)
except SystemExit as _sb_e:
    _sb_report("error", "program exited early via SystemExit(" + repr(_sb_e.code) + ")")
    _sb_sys.exit(1)
except BaseException as _sb_e:
    _sb_traceback.print_exc()
    _sb_report("error", type(_sb_e).__name__ + ": " + str(_sb_e))
    _sb_sys.exit(1)
else:
    _sb_report("passed")
"""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, pgrp) of a process from /proc, or None if it is gone/unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2 :].split()
    try:
        return rest[0], int(rest[2])
    except (IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid`` (Linux: scans /proc).

    Elsewhere it only reports whether the group exists at all (``[pgid]`` or ``[]``).
    """
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            return [pgid]
        return [pgid]
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _proc_stat(int(name))
        if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
            members.append(int(name))
    return members


def _kill_group(pgid: int, deadline_s: float = 5.0) -> None:
    """SIGKILL the group repeatedly until no live member remains (or the deadline passes)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except PermissionError:  # pragma: no cover - members changed uid
            return
        if not group_members(pgid) or time.monotonic() > end:
            return
        time.sleep(0.01)


def _count_user_tasks(uid: int) -> int:
    """Number of tasks (threads) owned by ``uid``, as RLIMIT_NPROC counts them (Linux)."""
    total = 0
    try:
        names = os.listdir("/proc")
    except OSError:
        return 0
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", encoding="ascii", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        owner = threads = None
        for line in text.splitlines():
            if line.startswith("Uid:"):
                owner = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if owner == uid:
            total += threads or 1
    return total


def _make_preexec(
    memory_bytes: int | None,
    max_file_bytes: int | None,
    cpu_seconds: int | None,
    nproc: int | None,
):
    import resource

    def _set(limit: int, value: int) -> None:
        try:
            _soft, hard = resource.getrlimit(limit)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(limit, (value, value))
        except (ValueError, OSError):
            pass

    def preexec() -> None:
        _set(resource.RLIMIT_CORE, 0)
        if memory_bytes is not None:
            _set(resource.RLIMIT_AS, memory_bytes)
        if max_file_bytes is not None:
            _set(resource.RLIMIT_FSIZE, max_file_bytes)
        if cpu_seconds is not None:
            _set(resource.RLIMIT_CPU, cpu_seconds)
        if nproc is not None and hasattr(resource, "RLIMIT_NPROC"):
            _set(resource.RLIMIT_NPROC, nproc)

    return preexec


def _child_env(home: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "no_proxy": "*",
        "NO_PROXY": "*",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if extra:
        env.update(extra)
    return env


def _tail(path: str, limit: int = _DETAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def run_python(
    code: str,
    timeout_s: float = 10.0,
    memory_bytes: int | None = 1 << 30,
    max_file_bytes: int | None = 64 << 20,
    max_processes: int | None = 64,
    block_process_spawn: bool = True,
    block_network: bool = True,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ExecutionResult:
    """Run ``code`` as a Python program in the sandbox (see the module docstring).

    ``memory_bytes``/``max_file_bytes``/``max_processes`` set RLIMIT_AS / RLIMIT_FSIZE /
    RLIMIT_NPROC (the last relative to the user's current task count; ignored for root by the
    kernel); None leaves that limit unset. ``python`` defaults to ``sys.executable``.
    """
    if os.name != "posix":  # pragma: no cover
        raise RuntimeError(
            "the sandbox needs a POSIX system (resource limits, process groups)"
        )
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    nproc = None
    if max_processes is not None:
        nproc = _count_user_tasks(os.getuid()) + max_processes
    cpu_seconds = math.ceil(timeout_s) + 1
    root = tempfile.mkdtemp(prefix="lwlora-sandbox-")
    start = time.monotonic()
    try:
        workdir = os.path.join(root, "work")
        os.mkdir(workdir)
        program_path = os.path.join(root, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(code)
        nonce = secrets.token_hex(16)
        status_path = os.path.join(root, f"status-{nonce}")
        runner = (_NETWORK_PRELUDE if block_network else "") + (
            _SPAWN_PRELUDE if block_process_spawn else ""
        )
        runner += _RUNNER.format(
            status_path=status_path, nonce=nonce, program_path=program_path
        )
        out_path = os.path.join(root, "stdout.txt")
        err_path = os.path.join(root, "stderr.txt")
        preexec = _make_preexec(memory_bytes, max_file_bytes, cpu_seconds, nproc)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [python or sys.executable, "-I", "-c", runner],
                cwd=workdir,
                env=_child_env(workdir, env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                close_fds=True,
                start_new_session=True,
                # preexec only calls setrlimit (no locks, no imports), so it is safe enough even
                # when the parent has threads; rlimits cannot be set any other way before exec.
                preexec_fn=preexec,  # noqa: PLW1509
            )
        pgid = proc.pid  # session leader: pgid == pid
        deadline = start + timeout_s
        timed_out = False
        try:
            # wait for exit *without reaping*, so the group id stays reserved until we killed it
            while True:
                info = os.waitid(
                    os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT
                )
                if info is not None and info.si_pid:
                    break
                if time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(0.005)
        finally:
            _kill_group(pgid)
            proc.wait()
        seconds = time.monotonic() - start
        rc = proc.returncode
        stderr_tail = _tail(err_path)
        if timed_out or rc == -signal.SIGXCPU:
            limit = "time" if timed_out else "CPU time"
            return ExecutionResult(
                False, "timeout", f"exceeded {limit} limit of {timeout_s:g}s", seconds
            )
        reported = None
        try:
            with open(status_path, encoding="utf-8") as f:
                status_line, nonce_line, detail = (f.read().split("\n", 2) + ["", ""])[
                    :3
                ]
            if nonce_line == nonce:
                reported = (status_line, detail)
        except OSError:
            pass
        if reported is not None and reported[0] == "passed" and rc == 0:
            return ExecutionResult(True, "passed", "", seconds)
        if reported is not None and reported[0] in ("failed", "error"):
            detail = reported[1]
            if stderr_tail and reported[0] == "failed":
                detail = f"{detail}\n{stderr_tail}".strip()
            return ExecutionResult(False, reported[0], detail[-_DETAIL_CHARS:], seconds)  # type: ignore[arg-type]
        if rc is not None and rc < 0:
            sig = -rc
            name = (
                signal.Signals(sig).name
                if sig in signal.Signals._value2member_map_
                else str(sig)
            )
            why = {
                "SIGXFSZ": " (file size limit exceeded)",
                "SIGKILL": " (killed, e.g. out of memory)",
            }
            detail = f"killed by signal {name}{why.get(name, '')}"
        else:
            detail = f"exited with code {rc} before the program finished"
        if stderr_tail:
            detail = f"{detail}\n{stderr_tail}"
        return ExecutionResult(False, "error", detail[-_DETAIL_CHARS:], seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
