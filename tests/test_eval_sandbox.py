"""run_tests: correct and wrong programs, and every attack contained and reported as a failure."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile

import pytest

from stepflow_ext.eval import SandboxResult, run_tests
from stepflow_ext.eval import sandbox as sandbox_module

LIMIT = 2.0  # seconds per run: the attack tests must stay fast
SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6"}]
SQUARE_TESTS = [{"assert": "assert square(3) == 9"}, {"assert": "assert square(-2) == 4"}]


@pytest.fixture
def sandbox_pids(monkeypatch):
    """Records the pid (= process group id) of every sandboxed process started during the test."""
    pids = []
    real_popen = subprocess.Popen

    class RecordingPopen(real_popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pids.append(self.pid)

    monkeypatch.setattr(sandbox_module.subprocess, "Popen", RecordingPopen)
    return pids


def processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # fields after "pid (comm)": state ppid pgrp ...
                found.append(int(entry))
    return found


def assert_contained(result: SandboxResult, status: str, *words: str) -> None:
    assert isinstance(result, SandboxResult)
    assert not result.passed and result.status == status, result
    for word in words:
        assert word in result.detail, result


def test_correct_stdin_program_passes():
    result = run_tests("a, b = map(int, input().split())\nprint(a + b)\n", SUM_TESTS, time_limit=LIMIT)
    assert result.passed and result.status == "ok" and result.detail == "2 tests passed"
    assert 0 < result.elapsed < 2 * LIMIT


def test_output_lines_compare_stripped():
    program = "print('  3  ')\nprint()\n"
    assert run_tests(program, [{"input": "", "output": "3\n"}], time_limit=LIMIT).passed
    wrong = run_tests("print(3)\nprint(4)", [{"input": "", "output": "3\n"}], time_limit=LIMIT)
    assert_contained(wrong, "wrong", "test 0", "'4'")


def test_wrong_program_fails_and_names_the_test():
    result = run_tests("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)\n", SUM_TESTS,
                       time_limit=LIMIT)
    assert_contained(result, "wrong", "test 1", "expected ['6'], got ['0']")


def test_assert_tests_pass_and_fail():
    assert run_tests("def square(x):\n    return x * x\n", SQUARE_TESTS, time_limit=LIMIT).passed
    result = run_tests("def square(x):\n    return x * abs(x)\n", SQUARE_TESTS, time_limit=LIMIT)
    assert_contained(result, "wrong", "test 1 failed", "square(-2)")


def test_entry_point_and_functional_class_tests():
    tests = [{"assert": "assert candidate(4) == 16", "entry_point": "sq"},
             {"assert": "assert Solution().twoSum(*[[2, 7, 11, 15], 9]) == [0, 1]"}]
    program = ("def sq(x):\n    return x * x\n\nclass Solution:\n    def twoSum(self, nums, target):\n"
               "        seen = {}\n        for i, n in enumerate(nums):\n            if target - n in seen:\n"
               "                return [seen[target - n], i]\n            seen[n] = i\n")
    assert run_tests(program, tests, time_limit=LIMIT).passed


def test_sys_exit_does_not_skip_the_asserts_and_os_exit_is_an_error():
    result = run_tests("import sys\ndef square(x):\n    return 0\nsys.exit(0)\n", SQUARE_TESTS, time_limit=LIMIT)
    assert_contained(result, "wrong", "test 0 failed")
    result = run_tests("import os\ndef square(x):\n    return 0\nos._exit(0)\n", SQUARE_TESTS, time_limit=LIMIT)
    assert_contained(result, "error", "exited before the tests finished")


def test_exceptions_syntax_errors_and_exit_codes_are_errors():
    assert_contained(run_tests("print(1/0)", SUM_TESTS, time_limit=LIMIT), "error", "ZeroDivisionError")
    assert_contained(run_tests("print(", SUM_TESTS, time_limit=LIMIT), "error", "SyntaxError")
    assert_contained(run_tests("import sys; sys.exit(3)", SUM_TESTS, time_limit=LIMIT), "error", "exit status 3")


def test_infinite_loop_times_out_and_is_killed(sandbox_pids):
    result = run_tests("while True:\n    pass\n", SUM_TESTS, time_limit=1.0)
    assert_contained(result, "timeout")
    assert result.elapsed < 5
    assert processes_in_group(sandbox_pids[0]) == []


def test_sleeping_forever_hits_the_wall_clock_limit_not_cpu(sandbox_pids):
    result = run_tests("import time\ntime.sleep(60)\n", SUM_TESTS, time_limit=1.0)
    assert_contained(result, "timeout", "1 s")
    assert result.elapsed < 5 and processes_in_group(sandbox_pids[0]) == []


@pytest.mark.parametrize("program", ["x = bytearray(2 << 30)\n",
                                     "chunks = []\nwhile True:\n    chunks.append(' ' * 10**7)\n"])
def test_memory_hog_is_stopped_by_the_memory_limit(program):
    result = run_tests(program, SUM_TESTS, time_limit=LIMIT, memory_mb=200)
    assert_contained(result, "memory")


def test_fork_bomb_is_refused_and_leaves_no_process(sandbox_pids):
    # Bounded on purpose: even if containment failed, at most 20 sleeping children, killed with the group.
    bomb = "import os, time\nfor _ in range(20):\n    if os.fork() == 0:\n        time.sleep(30)\n"
    result = run_tests(bomb, SUM_TESTS, time_limit=LIMIT)
    assert_contained(result, "error", "refused by the sandbox: os.fork")
    assert processes_in_group(sandbox_pids[0]) == []


@pytest.mark.parametrize("program, refused", [
    ("import subprocess\nsubprocess.run(['sleep', '30'])\n", "import subprocess"),
    ("import os\nos.system('sleep 30')\n", "os.system"),
    ("import os\nos.execv('/bin/sleep', ['sleep', '30'])\n", "os.exec"),
    ("import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {})\n", "os.posix_spawn"),
    ("import multiprocessing\n", "import multiprocessing"),
    ("import _posixsubprocess\n", "import _posixsubprocess"),  # forks without any audit event
    ("import ctypes\nctypes.CDLL(None).fork()\n", "ctypes.dlsym"),
    ("import ctypes\nctypes.string_at(id(1), 8)\n", "ctypes.string_at"),
    ("import os\nos.kill(os.getppid(), 0)\n", "os.kill"),
])
def test_process_creation_and_escapes_are_refused(program, refused, sandbox_pids):
    result = run_tests(program, SUM_TESTS, time_limit=LIMIT)
    assert_contained(result, "error", f"refused by the sandbox: {refused}")
    assert processes_in_group(sandbox_pids[0]) == []


def test_writing_outside_its_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    attacks = [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
        f"os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.rename({str(victim)!r}, 'mine.txt')\n",
        f"import os\nos.chmod({str(victim)!r}, 0o777)\n",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'w').write('x')\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
    ]
    for program in attacks:
        result = run_tests(program, SUM_TESTS, time_limit=LIMIT)
        assert_contained(result, "error", "refused by the sandbox")
    assert not target.exists()
    assert victim.read_text() == "keep me" and oct(victim.stat().st_mode & 0o777) != "0o777"


def test_writing_inside_its_directory_is_allowed_and_removed_afterwards():
    before = set(os.listdir(tempfile.gettempdir()))
    program = ("import os, tempfile\nopen('scratch.txt', 'w').write('3')\nos.mkdir('d')\n"
               "fd, name = tempfile.mkstemp()\nos.close(fd)\nprint(open('scratch.txt').read())\n")
    result = run_tests(program, [{"input": "", "output": "3"}], time_limit=LIMIT)
    assert result.passed, result
    left = {n for n in set(os.listdir(tempfile.gettempdir())) - before if n.startswith("stepflow-sandbox-")}
    assert left == set()


def test_opening_a_socket_is_refused_and_nothing_connects():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        program = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\ns.sendall(b'hi')\n"
        assert_contained(run_tests(program, SUM_TESTS, time_limit=LIMIT), "error", "refused by the sandbox: socket")
        with pytest.raises(socket.timeout):
            listener.accept()
        program = "import socket\nsocket.getaddrinfo('example.com', 80)\n"
        assert_contained(run_tests(program, SUM_TESTS, time_limit=LIMIT), "error", "socket.getaddrinfo")
    finally:
        listener.close()


def test_a_caught_refusal_still_fails_the_run():
    program = "try:\n    import socket\n    socket.socket()\nexcept OSError:\n    pass\nprint(3)\n"
    result = run_tests(program, [{"input": "", "output": "3"}], time_limit=LIMIT)
    assert_contained(result, "error", "socket.__new__")


def test_environment_is_stripped_and_cwd_is_private(monkeypatch):
    monkeypatch.setenv("STEPFLOW_SECRET_TOKEN", "hunter2")
    program = "import os\nprint('STEPFLOW_SECRET_TOKEN' in os.environ)\nprint(os.path.basename(os.path.dirname(os.getcwd()))[:17])\n"
    result = run_tests(program, [{"input": "", "output": "False\nstepflow-sandbox-"}], time_limit=LIMIT)
    assert result.passed, result


def test_numpy_still_imports():
    pytest.importorskip("numpy")
    program = "import numpy as np\nprint(int(np.arange(4).sum()))\n"
    assert run_tests(program, [{"input": "", "output": "6"}], time_limit=10.0).passed


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="tests"):
        run_tests("print(1)", [])
    with pytest.raises(ValueError, match=r"tests\[0\]"):
        run_tests("print(1)", [{"input": 1, "output": "1"}])
    with pytest.raises(ValueError, match="time_limit"):
        run_tests("print(1)", SUM_TESTS, time_limit=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_tests("print(1)", SUM_TESTS, memory_mb=8)
    with pytest.raises(ValueError, match="program"):
        run_tests(None, SUM_TESTS)


def test_process_group_scan_sees_live_processes():
    assert os.getpid() in processes_in_group(os.getpgrp())  # so an empty scan above means something
