"""The sandbox: real MBXP problems pass/fail per language, and hostile programs are contained.

Small limits keep the file fast; the hostile programs run concurrently once (module fixture) and
each test then checks one of them. A language's tests skip only when its toolchain is missing
(CI runs scripts/setup_system.sh first).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid

import pytest

from evals import isolation
from evals.mbxp import build_program, load_problems
from evals.sandbox import Job, Limits, run_many, run_program
from evals.toolchains import toolchain_missing

KiB, MiB = 1 << 10, 1 << 20
SMALL = Limits(timeout_s=3, cpu_s=2, memory_mb=256, max_output_bytes=64 * KiB, max_file_bytes=1 * MiB,
               max_processes=32)
SLACK_S = 2.0  # kill + cleanup on a busy 2-core machine

# MBXP task 502 ("find remainder of two numbers") exists in every language.
REMAINDER = {
    "python": ("MBPP/502", "  return n % m\n", "  return n // m\n"),
    "javascript": ("MBJSP/502", "  return n % m;\n}\n", "  return Math.floor(n / m);\n}\n"),
    "go": ("MBGP/502", "\treturn n % m\n}\n", "\treturn n / m\n}\n"),
    "cpp": ("MBCPP/502", "  return n % m;\n}\n", "  return n / m;\n}\n"),
    "java": ("MBJP/502", "        return n % m;\n    }\n}\n", "        return n / m;\n    }\n}\n"),
    "typescript": ("MBTSP/502", "  return n % m;\n}\n", "  return Math.floor(n / m);\n}\n"),
    "php": ("MBPHP/502", "    return $n % $m;\n}\n", "    return intdiv($n, $m);\n}\n"),
    "ruby": ("MBRBP/502", "\n  n % m\nend\n", "\n  n / m\nend\n"),
    "csharp": ("MBCSP/502", "\n            return n % m;\n        }", "\n            return n / m;\n        }"),
}
# A program the compiler rejects; for the interpreted languages a syntax error, which fails the run.
NOT_A_PROGRAM = {"go": "compile_error", "cpp": "compile_error", "java": "compile_error",
                 "typescript": "compile_error", "csharp": "compile_error", "python": "failed", "php": "failed",
                 "ruby": "failed"}
MEMORY_HOGS = {
    "python": "x = []\nwhile True:\n    x.append(bytearray(1 << 20))\n",
    "javascript": "const a = [];\nwhile (true) a.push(new Array(1 << 17).fill(1.5));\n",
    "go": "package main\nfunc main() {\n\tvar s [][]byte\n\tfor {\n\t\tb := make([]byte, 1<<20)\n"
          "\t\tfor i := range b {\n\t\t\tb[i] = 1\n\t\t}\n\t\ts = append(s, b)\n\t}\n}\n",
    "cpp": "#include <cstring>\n#include <vector>\nint main() {\n  std::vector<char*> v;\n"
           "  while (true) { char* p = new char[1 << 20]; memset(p, 1, 1 << 20); v.push_back(p); }\n}\n",
    "java": "import java.util.*;\nclass Main {\n  public static void main(String[] args) {\n"
            "    List<long[]> v = new ArrayList<>();\n    while (true) v.add(new long[1 << 17]);\n  }\n}\n",
    "typescript": "const a: number[][] = [];\nwhile (true) a.push(new Array(1 << 17).fill(1.5));\n",
    "php": "<?php\n$a = [];\nwhile (true) { $a[] = str_repeat('x', 1 << 20); }\n",
    "ruby": "a = []\nloop { a << ('x' * (1 << 20)) }\n",
    "csharp": "using System.Collections.Generic;\nclass P {\n  static void Main() {\n"
              "    var v = new List<long[]>();\n    while (true) v.Add(new long[1 << 17]);\n  }\n}\n",
}
SHM_MARKER = f"/dev/shm/codefast-test-{uuid.uuid4().hex}"
HOSTILE = {
    "fork_bomb": ("python", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
    "fork_bomb_cpp": ("cpp", "#include <unistd.h>\nint main() { while (true) fork(); }\n"),
    "infinite_loop": ("python", "while True:\n    pass\n"),
    "sleep_forever": ("python", "import time\ntime.sleep(10**6)\n"),
    "unbounded_output": ("python", "while True:\n    print('x' * 1000)\n"),
    "read_stdin": ("python", "import sys\nprint(len(sys.stdin.read()))\n"),
    "huge_file": ("python", "import errno\nwritten = 0\ntry:\n    with open('big', 'wb') as f:\n"
                            "        while True:\n            f.write(b'x' * 65536)\n            f.flush()\n"
                            "            written += 65536\nexcept OSError as e:\n"
                            "    print(written, e.errno == errno.EFBIG)\n"),
    # The child leaves the process group and would sleep forever; the parent exits at once.
    "setsid_escape": ("python", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(10**6)\n"
                                "print('parent done')\n"),
    "leave_files": ("python", f"import os\nopen('{SHM_MARKER}', 'w').write('x')\nprint(os.getcwd())\n"),
    "identity": ("python", "import os\nprint(os.getuid())\ntry:\n    open(os.path.expanduser('~root/x'), 'w')\n"
                           "    print('wrote')\nexcept OSError:\n    print('denied')\n"),
}


def require(language: str) -> None:
    reason = toolchain_missing(language)
    if reason:
        pytest.skip(f"{language} toolchain missing: {reason}")


def sandbox_uids_alive() -> list[int]:
    return [pid for uid in range(isolation.UID_BASE, isolation.UID_BASE + isolation.NUM_UIDS)
            for pid in isolation.pids_of_uid(uid)]


@pytest.fixture(scope="module")
def private_uids():
    """A uid range of our own, so `sandbox_uids_alive` cannot see a concurrent evaluation's runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(isolation, "UID_BASE", 63000 + (os.getpid() % 16) * isolation.NUM_UIDS)
        yield


@pytest.fixture(scope="module")
def hostile(private_uids):
    names = [n for n, (lang, _) in HOSTILE.items() if not toolchain_missing(lang)]
    results = run_many([Job(HOSTILE[n][0], HOSTILE[n][1], SMALL) for n in names], num_workers=2)
    return dict(zip(names, results))


def get(hostile, name):
    if name not in hostile:
        pytest.skip(f"{HOSTILE[name][0]} toolchain missing: {toolchain_missing(HOSTILE[name][0])}")
    return hostile[name]


@pytest.mark.parametrize("language", list(REMAINDER))
def test_mbxp_correct_solution_passes_and_wrong_one_fails(language):
    require(language)
    task_id, correct, wrong = REMAINDER[language]
    problem = next(p for p in load_problems(language) if p.task_id == task_id)
    good, bad = run_many([Job(language, build_program(problem, c), SMALL) for c in (correct, wrong)], 2)
    assert good.status == "passed", good.stderr
    assert bad.status == "failed" and bad.returncode != 0, bad


@pytest.mark.parametrize("language", list(NOT_A_PROGRAM))
def test_compile_error(language):
    require(language)
    opening = "<?php\n" if language == "php" else ""  # else PHP echoes the text as a template
    result = run_program(language, opening + "this is not a program {\n", SMALL)
    assert result.status == NOT_A_PROGRAM[language] and result.stderr, result


@pytest.mark.parametrize("language", list(MEMORY_HOGS))
def test_memory_hog_ends_with_memory_status(language):
    require(language)
    result = run_program(language, MEMORY_HOGS[language], SMALL)
    assert result.status == "memory", result.stderr[-500:]
    assert result.duration_s < SMALL.timeout_s + SLACK_S


@pytest.mark.parametrize("name", ["fork_bomb", "fork_bomb_cpp"])
def test_fork_bomb_is_contained(hostile, name):
    result = get(hostile, name)
    assert result.status == "timeout"
    assert result.duration_s < SMALL.timeout_s + SLACK_S
    if isolation.isolation().mode == "uid":
        assert sandbox_uids_alive() == []
    assert subprocess.run(["true"]).returncode == 0  # this process can still fork


def test_infinite_loop_hits_cpu_limit(hostile):
    result = hostile["infinite_loop"]
    assert result.status == "timeout"
    assert result.returncode == -signal.SIGXCPU  # the CPU limit, not the wall clock
    assert SMALL.cpu_s <= result.duration_s < SMALL.timeout_s + SLACK_S


def test_sleep_forever_hits_wall_clock(hostile):
    result = hostile["sleep_forever"]
    assert result.status == "timeout"
    assert SMALL.timeout_s <= result.duration_s < SMALL.timeout_s + SLACK_S


def test_unbounded_output_is_cut_at_the_cap(hostile):
    result = hostile["unbounded_output"]
    assert result.status == "output_limit"
    assert 0 < len(result.stdout.encode()) <= SMALL.max_output_bytes
    assert result.duration_s < SMALL.timeout_s


def test_stdin_is_empty(hostile):
    result = hostile["read_stdin"]
    assert (result.status, result.stdout) == ("passed", "0\n")


def test_huge_file_stops_at_file_size_limit(hostile):
    result = hostile["huge_file"]
    written, is_efbig = result.stdout.split()
    assert result.status == "passed" and is_efbig == "True"
    assert int(written) <= SMALL.max_file_bytes


def test_process_that_leaves_the_group_is_killed(hostile):
    result = hostile["setsid_escape"]
    assert result.status == "passed" and result.stdout == "parent done\n"
    if isolation.isolation().mode != "uid":
        pytest.skip("surviving processes are countable only in uid mode (pid namespace elsewhere)")
    assert sandbox_uids_alive() == []


def test_work_dir_and_stray_files_are_removed(hostile):
    result = hostile["leave_files"]
    assert result.status == "passed"
    assert not os.path.exists(result.stdout.strip())
    if isolation.isolation().mode == "uid":
        assert not os.path.exists(SHM_MARKER)


def test_runs_as_an_unprivileged_uid(hostile):
    if isolation.isolation().mode != "uid":
        pytest.skip(f"not root: {isolation.isolation().reason}")
    uid, wrote = hostile["identity"].stdout.split()
    assert int(uid) >= isolation.UID_BASE and wrote == "denied"


def test_network_is_unreachable_even_loopback():
    require("python")
    if not isolation.isolation().is_network_isolated:
        pytest.skip(f"no network namespace here, the program could reach the network: {isolation.isolation().reason}")
    with socket.socket() as listener:  # a real server on the host's loopback
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        program = ("import socket\nprint([name for _, name in socket.if_nameindex()])\n"
                   f"try:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    print('connected')\n"
                   "except OSError as e:\n    print(type(e).__name__, e.errno)\n")
        result = run_program("python", program, SMALL)
        interfaces, outcome = result.stdout.splitlines()
        assert interfaces == "['lo']"  # nothing but a loopback that is down
        assert outcome.startswith("OSError") and outcome != "connected"
        with pytest.raises(socket.timeout):
            listener.accept()


def test_run_many_keeps_job_order():
    require("python")
    results = run_many([Job("python", f"print({i})", SMALL) for i in range(6)], num_workers=3)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]


def test_limits_are_validated():
    with pytest.raises(ValueError):
        Limits(timeout_s=0)
    with pytest.raises(ValueError):
        run_program("cobol", "", SMALL)
