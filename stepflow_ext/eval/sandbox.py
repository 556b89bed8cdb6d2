"""Run a model-written program against its tests in a separate, contained process.

Layers, each of which alone stops some attacks:
  * a separate process (`python -I -B` of this interpreter) in its own session / process group, killed
    as a group (SIGKILL) at the wall-clock limit and again after it exits (no leftover children);
  * rlimits set before exec: address space (memory_mb), CPU seconds, file size, open files, core dumps 0,
    and RLIMIT_NPROC for non-root users (the kernel never applies RLIMIT_NPROC to root);
  * a fresh temporary working directory, removed afterwards, and an environment with nothing inherited;
  * new user + network namespaces when the kernel allows it (no network interface but a dead loopback;
    as root this also drops root's capabilities in the real namespace);
  * an audit hook installed by a small bootstrap before the program runs (audit hooks cannot be removed):
    it refuses sockets, process creation (fork, exec, spawn, system, subprocess), signals to other
    processes, ctypes calls and modules that bypass the hooks, sub-interpreters, and any write, create,
    remove, rename or permission change outside the working directory. A refused operation makes the run
    fail with status "error" and says what was refused, even if the program catches the exception.

Limits: the audit hook is a Python-level guard for model-written programs, not a boundary against
deliberately hostile native code, and the program runs in the same process as its tests, so a program
written to forge its own test report could do so. Reading files outside the directory is allowed
(imports need it).

Statuses: "ok" (all tests pass), "wrong" (wrong output / failed assert), "error" (exception, syntax error,
non-zero exit, refused operation), "timeout" (wall clock or CPU limit), "memory" (MemoryError or killed
near the memory limit), "killed" (another signal, e.g. a segfault).
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

STATUSES = ("ok", "wrong", "error", "timeout", "memory", "killed")
MAX_OUTPUT_BYTES = 16 << 20       # RLIMIT_FSIZE: stdout/stderr files and anything it writes
MAX_OPEN_FILES = 256
NPROC_MARGIN = 16                 # non-root: processes/threads it may add to what the user already runs

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child after fork must not load libraries
except OSError:  # pragma: no cover - non-glibc platforms
    _LIBC = None


@dataclass
class SandboxResult:
    passed: bool
    status: str
    detail: str
    elapsed: float


def run_tests(program: str, tests: list[dict], *, time_limit: float = 10.0, memory_mb: int = 512) -> SandboxResult:
    """Run `program` against `tests`; stops at the first failing test.

    tests: {"input": str, "output": str} runs the program with that stdin and compares stripped output lines;
    {"assert": code[, "entry_point": name]} runs the code after the program in its namespace (with
    `candidate` bound to `entry_point` when given); all assert tests share one run, after the program.
    time_limit (seconds) and memory_mb apply to each run. elapsed is the total wall time.
    """
    if not isinstance(program, str):
        raise ValueError(f"program: expected a string, got {type(program).__name__}")
    if not isinstance(tests, list) or not tests:
        raise ValueError("tests: expected a non-empty list of test dicts")
    for i, test in enumerate(tests):
        if not isinstance(test, dict):
            raise ValueError(f"tests[{i}]: expected a dict, got {type(test).__name__}")
        if "assert" in test:
            if not isinstance(test["assert"], str):
                raise ValueError(f"tests[{i}].assert: expected a string")
            if "entry_point" in test and not (isinstance(test["entry_point"], str) and test["entry_point"].isidentifier()):
                raise ValueError(f"tests[{i}].entry_point: expected a Python identifier")
        elif not (isinstance(test.get("input"), str) and isinstance(test.get("output"), str)):
            raise ValueError(f"tests[{i}]: expected string 'input' and 'output', or an 'assert' string")
    if isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not (0 < time_limit < math.inf):
        raise ValueError(f"time_limit: expected a positive number of seconds, got {time_limit!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 32:
        raise ValueError(f"memory_mb: expected an integer >= 32, got {memory_mb!r}")

    start = time.monotonic()
    asserts = [t for t in tests if "assert" in t]
    stdio = [t for t in tests if "assert" not in t]
    for index, test in enumerate(stdio):
        result = _run_once(program, "stdio", test["input"], [], time_limit, memory_mb)
        if result.status == "ok":
            got, want = _lines(result.detail), _lines(test["output"])
            if got != want:
                result = SandboxResult(False, "wrong", f"test {index}: expected {_clip(want)}, got {_clip(got)}", 0.0)
        if result.status != "ok":
            return SandboxResult(False, result.status, _prefix(f"test {index}", result.detail, result.status),
                                 time.monotonic() - start)
    if asserts:
        result = _run_once(program, "assert", "", asserts, time_limit, memory_mb)
        if result.status != "ok":
            return SandboxResult(False, result.status, result.detail, time.monotonic() - start)
    return SandboxResult(True, "ok", f"{len(tests)} tests passed", time.monotonic() - start)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def _clip(value, n: int = 200) -> str:
    s = repr(value)
    return s if len(s) <= n else s[:n] + "...]"


def _prefix(where: str, detail: str, status: str) -> str:
    return detail if detail.startswith("test ") else f"{where}: {detail}"


# ---------------------------------------------------------------------------------------------- one run
def _run_once(program: str, mode: str, stdin_text: str, asserts: list[dict], time_limit: float,
              memory_mb: int) -> SandboxResult:
    """One process. For "stdio" mode an "ok" result carries the program's stdout in `detail`."""
    workdir = tempfile.mkdtemp(prefix="stepflow-sandbox-")
    root = os.path.join(workdir, "run")  # the program's cwd; the only place it may write
    os.mkdir(root)
    paths = {name: os.path.join(workdir, name) for name in ("program.py", "stdin", "stdout", "stderr", "status")}
    with open(paths["program.py"], "w", encoding="utf-8") as f:
        f.write(program)
    with open(paths["stdin"], "w", encoding="utf-8") as f:
        f.write(stdin_text)
    config = json.dumps({"mode": mode, "root": root, "program": paths["program.py"], "status": paths["status"],
                         "asserts": asserts})
    env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    limits = _limits(time_limit, memory_mb)
    start = time.monotonic()
    timed_out = False
    try:
        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                open(paths["stderr"], "wb") as ferr:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-X", "utf8", "-c", _BOOTSTRAP, config],
                stdin=fin, stdout=fout, stderr=ferr, cwd=root, env=env, close_fds=True,
                start_new_session=True, preexec_fn=lambda: _child_setup(limits))
            try:
                proc.wait(timeout=time_limit)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # also reaps children it may have left behind
                proc.wait()
        elapsed = time.monotonic() - start
        return _result(proc.returncode, timed_out, _read(paths["status"], 65536), _read(paths["stdout"], 1 << 20),
                       _read(paths["stderr"], 4096, tail=True), elapsed, time_limit)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _limits(time_limit: float, memory_mb: int) -> list[tuple[int, int]]:
    cpu = int(math.ceil(time_limit)) + 1
    limits = [(resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu),
              (resource.RLIMIT_FSIZE, MAX_OUTPUT_BYTES), (resource.RLIMIT_NOFILE, MAX_OPEN_FILES),
              (resource.RLIMIT_CORE, 0)]
    if os.geteuid() != 0:
        # RLIMIT_NPROC counts every process and thread of the user, so a fixed small number would fail
        # for a user who already runs many; allow a small margin above the current count instead.
        limits.append((resource.RLIMIT_NPROC, _user_task_count() + NPROC_MARGIN))
    capped = []
    for which, value in limits:  # never ask for more than the hard limit we run under (setrlimit would fail)
        hard = resource.getrlimit(which)[1]
        capped.append((which, value if hard == resource.RLIM_INFINITY else min(value, hard)))
    return capped


def _user_task_count() -> int:
    uid, count = os.getuid(), 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{pid}/task"))
            except OSError:
                continue
    return count


def _child_setup(limits: list[tuple[int, int]]) -> None:
    """In the child between fork and exec: only async-signal-tolerant work, no imports or allocation-heavy code."""
    for which, value in limits:
        try:  # CPU: SIGXCPU at the soft limit (reported as timeout), SIGKILL one second later
            resource.setrlimit(which, (value, value + 1) if which == resource.RLIMIT_CPU else (value, value))
        except (ValueError, OSError):
            resource.setrlimit(which, (value, value))
    if _LIBC is not None:
        # Fails without permission (some containers); the audit hook still refuses sockets.
        _LIBC.unshare(_CLONE_NEWUSER | _CLONE_NEWNET)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: str, limit: int, tail: bool = False) -> str:
    try:
        with open(path, "rb") as f:
            if tail:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def _result(returncode: int, timed_out: bool, status_text: str, stdout: str, stderr: str, elapsed: float,
            time_limit: float) -> SandboxResult:
    if timed_out:
        return SandboxResult(False, "timeout", f"no result within {time_limit:g} s (killed)", elapsed)
    report = None
    if status_text.strip():
        try:
            report = json.loads(status_text)
        except json.JSONDecodeError:
            report = None
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return SandboxResult(False, "timeout", "CPU time limit exceeded", elapsed)
        if sig == signal.SIGXFSZ:
            return SandboxResult(False, "error", f"output larger than {MAX_OUTPUT_BYTES >> 20} MiB", elapsed)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if report is None and "MemoryError" in stderr:
            return SandboxResult(False, "memory", f"out of memory ({name})", elapsed)
        return SandboxResult(False, "killed", f"killed by {name}", elapsed)
    if not isinstance(report, dict) or report.get("status") not in STATUSES:
        last = stderr.strip().splitlines()[-1:] or [f"exit status {returncode}"]
        if "MemoryError" in stderr:
            return SandboxResult(False, "memory", "MemoryError", elapsed)
        return SandboxResult(False, "error", f"exited before the tests finished: {last[0][:300]}", elapsed)
    status, detail = report["status"], str(report.get("detail", ""))
    if status == "ok":
        return SandboxResult(True, "ok", stdout, elapsed)  # stdio mode compares this output
    return SandboxResult(False, status, detail, elapsed)


# ---------------------------------------------------------------------------------------------- bootstrap
# Runs in the child (`python -I -B -c`). Everything it needs is opened or imported before the audit hook
# goes in; after that the program runs under the hook. It reports one JSON object to the status file.
_BOOTSTRAP = r'''
import json, os, sys, traceback
cfg = json.loads(sys.argv[1])
ROOT = os.path.realpath(cfg["root"])
status_file = open(cfg["status"], "w", encoding="utf-8")
with open(cfg["program"], encoding="utf-8") as f:
    source = f.read()
refused = []

def report(status, detail=""):
    if refused and status == "ok" or refused and status == "wrong":
        status = "error"
    if refused:
        detail = ("refused by the sandbox: " + ", ".join(dict.fromkeys(refused)) + ("; " + detail if detail else ""))
    status_file.write(json.dumps({"status": status, "detail": detail[:2000]}))
    status_file.flush()
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    os._exit(0)

# Modules that reach the OS without audit events, or start interpreters without our hook.
# ctypes itself may load (numpy imports it), but any ctypes event except dlopen(None) is refused below.
DENIED_MODULES = {"_posixsubprocess", "subprocess", "multiprocessing",
                  "_multiprocessing", "_xxsubinterpreters", "_xxinterpchannels", "_testcapi",
                  "_testinternalcapi", "_testmultiphase", "_testbuffer", "_testclinic", "cffi"}
for name in list(sys.modules):
    if name.split(".")[0] in DENIED_MODULES:
        del sys.modules[name]
DENIED_EVENTS = ("socket.", "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                 "subprocess.", "pty.", "os.startfile", "os.killpg", "urllib.Request",
                 "cpython.PyInterpreterState_New", "os.chroot", "os.setxattr", "os.removexattr")
# event -> (indices of paths it changes, indices of dir_fd arguments)
PATH_EVENTS = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
               "os.link": ((0, 1), (2, 3)), "os.symlink": ((1,), (2,)), "os.mkdir": ((0,), (2,)),
               "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
               "os.truncate": ((0,), ()), "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)),
               "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "shutil.rmtree": ((0,), (1,))}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
MY_PID = os.getpid()
realpath, fspath, fsdecode, sep = os.path.realpath, os.fspath, os.fsdecode, os.sep

def inside(path):
    if isinstance(path, int):
        return False  # an fd (or dir_fd-relative call) could point anywhere
    p = realpath(fsdecode(fspath(path)))
    return p == ROOT or p.startswith(ROOT + sep) or p == "/dev/null"

def refuse(what):
    refused.append(what)
    raise PermissionError("sandbox: " + what + " is not allowed")

def hook(event, args):
    if event == "import":
        if args[0] and args[0].split(".")[0] in DENIED_MODULES:
            refuse("import " + args[0])
        return
    if event.startswith(DENIED_EVENTS):
        refuse(event)
    if event.startswith("ctypes.") and not (event == "ctypes.dlopen" and args[0] is None):
        refuse(event)  # symbol lookups, foreign calls, raw memory: all ways around this hook
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        writes = (isinstance(flags, int) and flags & WRITE_FLAGS) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
        if writes and not isinstance(path, int):
            relative = not os.path.isabs(fsdecode(fspath(path)))
            if not inside(path) or (mode is None and relative):  # os.open ignores cwd under dir_fd
                refuse("writing " + str(path))
    elif event in PATH_EVENTS:
        paths, dir_fds = PATH_EVENTS[event]
        for i in dir_fds:
            if i < len(args) and args[i] is not None and args[i] != -1:
                refuse(event + " with dir_fd")
        for i in paths:
            if i < len(args) and not inside(args[i]):
                refuse(event + " " + str(args[i]))
    elif event in ("os.kill", "signal.pthread_kill"):
        if event == "signal.pthread_kill" or args[0] != MY_PID:
            refuse(event)

sys.addaudithook(hook)
sys.argv = ["solution.py"]
namespace = {"__name__": "__main__" if cfg["mode"] == "stdio" else "solution", "__builtins__": __builtins__}

def failure(exc):
    if isinstance(exc, MemoryError):
        report("memory", "MemoryError")
    lines = traceback.format_exception_only(type(exc), exc)
    report("error", "".join(lines).strip())

try:
    code = compile(source, "solution.py", "exec")
except BaseException as exc:
    failure(exc)
try:
    exec(code, namespace)
except SystemExit as exc:  # a normal end for stdio programs; the asserts still run after it
    if exc.code not in (None, 0):
        report("error", "exit status " + str(exc.code))
except BaseException as exc:
    failure(exc)
for i, test in enumerate(cfg["asserts"]):
    try:
        if test.get("entry_point"):
            namespace["candidate"] = namespace[test["entry_point"]]
        exec(compile(test["assert"], "<test " + str(i) + ">", "exec"), namespace)
    except AssertionError:
        report("wrong", "test " + str(i) + " failed: " + test["assert"].strip().splitlines()[-1][:300])
    except BaseException as exc:
        if isinstance(exc, MemoryError):
            report("memory", "test " + str(i) + ": MemoryError")
        report("error", "test " + str(i) + ": " + "".join(traceback.format_exception_only(type(exc), exc)).strip())
report("ok")
'''
