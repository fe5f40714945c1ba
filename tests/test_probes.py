"""Probe suite: hostile programs against the sandbox, bad requests against the engine.

Every probe tries one way out (issue 15 and beyond) and asserts it is contained: reading a file
the run may not read, at compile or build time too (C++ `#include`, Go `//go:embed`, JS `require`
of an absolute path, /proc of other processes); writing or deleting outside the run; filling
RAM-backed /dev/shm or the disk; exhausting inodes, file descriptors or timers; a signal storm;
setting the clock. The hostile programs run concurrently once (module fixture) and each test
checks one. Requests the engine cannot serve (a seed past int64, a tiny temperature, text the
tokenizer cannot take) come last. Probes over HTTP (bad bodies, a raising and a hanging engine
step under Ray Serve) live in tests/test_serve.py, which owns the deployments.

A check that needs root (per-run uid) or a private root skips with the reason where this
machine cannot give one: those guarantees do not hold there (README, "Reliability and security").
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from backends.codefast import CodefastBackend
from engine import PromptError, SamplingParams
from evals import isolation
from evals.sandbox import Job, Limits, run_many
from evals.toolchains import toolchain_missing
from tests.helpers import tiny_engine

KiB, MiB = 1 << 10, 1 << 20
LIMITS = Limits(timeout_s=5, cpu_s=3, memory_mb=256, max_output_bytes=64 * KiB, max_file_bytes=1 * MiB,
                max_processes=32, max_open_files=64, max_disk_mb=16)
SLACK_S = 3.0  # kill + cleanup on a busy 2-core machine
SECRET = f"codefast-probe-secret-{uuid.uuid4().hex}"
# Outside /tmp on purpose: the run must find the host read-only there, not merely hidden.
PROBE_DIR = Path("/var/cache") / f"codefast-probes-{uuid.uuid4().hex[:12]}"
SECRET_FILE = PROBE_DIR / "secret.txt"  # root only (0600), in a folder anyone may enter
OPEN_DIR = PROBE_DIR / "open"  # 0777 without the sticky bit, like a Ray session's log folder
VICTIM = OPEN_DIR / "victim.log"  # root's file in it
MARKER = f"codefast-probe-{uuid.uuid4().hex[:12]}"
CALLER_PID = os.getpid()

WRITE_EVERYWHERE = f"""
import os
for path in ["{OPEN_DIR}/planted", "/tmp/{MARKER}/deep/planted", "/dev/shm/{MARKER}", "/var/tmp/{MARKER}"]:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as e:
        print("refused", path, e.errno)
try:
    os.unlink("{VICTIM}")
    print("deleted victim")
except OSError as e:
    print("victim kept", e.errno)
"""
FILL = """
import errno, os
written = 0
try:
    for i in range(10_000):
        with open(os.path.join("{folder}", f"f{{i}}"), "wb") as f:
            f.write(b"x" * {chunk})
        written += {chunk}
except OSError as e:
    print(written, e.errno == errno.ENOSPC)
    raise
print(written, "never full")
"""
HOSTILE = {
    # Reading what the run may not read, at build time.
    "cpp_include_shadow": ("cpp", '#include "/etc/shadow"\nint main() {}\n'),
    "cpp_include_secret": ("cpp", f'#include "{SECRET_FILE}"\nint main() {{}}\n'),
    "cpp_include_caller_environ": ("cpp", f'#include "/proc/{CALLER_PID}/environ"\nint main() {{}}\n'),
    "go_embed_secret": ("go", 'package main\nimport _ "embed"\nimport "fmt"\n'
                              f'//go:embed {SECRET_FILE}\nvar s string\nfunc main() {{ fmt.Print(s) }}\n'),
    "js_require_secret": ("javascript", f"try {{ console.log(require('{SECRET_FILE}')); }}"
                                        " catch (e) { console.log(e.code); }\n"),
    "python_read_secret": ("python", f"try:\n    print(open('{SECRET_FILE}').read())\n"
                                     "except OSError as e:\n    print('denied', e.errno)\n"),
    "proc_of_others": ("python", "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                                 f"print(len(pids), '{CALLER_PID}' in pids)\n"),
    # Writing outside the run; filling memory or disk.
    "write_everywhere": ("python", WRITE_EVERYWHERE),
    "fill_dev_shm": ("python", FILL.format(folder="/dev/shm", chunk=LIMITS.max_file_bytes)),
    "fill_work_dir": ("python", FILL.format(folder=".", chunk=LIMITS.max_file_bytes)),
    "inode_bomb": ("python", FILL.format(folder="/tmp", chunk=0).replace("range(10_000)", "range(1_000_000)")),
    # Exhausting what the kernel hands out.
    "fd_exhaustion": ("python", "import os\nfds = []\ntry:\n    while len(fds) < 100_000:\n"
                                "        fds.append(os.open('/dev/null', os.O_RDONLY))\n"
                                "except OSError as e:\n    print(len(fds), e.errno)\n"),
    "timer_bomb": ("cpp", "#include <csignal>\n#include <cstdio>\n#include <ctime>\nint main() {\n"
                          "  long n = 0; timer_t t; sigevent ev{}; ev.sigev_notify = SIGEV_SIGNAL;"
                          " ev.sigev_signo = SIGRTMIN;\n"
                          "  while (n < 1000000 && timer_create(CLOCK_MONOTONIC, &ev, &t) == 0) n++;\n"
                          "  printf(\"%ld\\n\", n);\n}\n"),
    "set_clock": ("python", "import time\ntry:\n    time.clock_settime(time.CLOCK_REALTIME, 0)\n    print('set')\n"
                            "except OSError as e:\n    print('denied', e.errno)\n"),
    # Every process of the run signals everything it can reach, for a second.
    "signal_storm": ("python", "import os, signal, time\nfor _ in range(3):\n    os.fork()\n"
                               "end = time.time() + 1\nwhile time.time() < end:\n"
                               "    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGSTOP):\n"
                               "        for pid in (-1, 1, os.getppid()):\n"
                               "            try:\n                os.kill(pid, sig)\n"
                               "            except OSError:\n                pass\n"),
    # Runs beside the storm: it must finish untouched.
    "canary": ("python", "import time\ntime.sleep(1.5)\nprint('alive')\n"),
}


def require_uid_mode() -> None:
    if isolation.isolation().mode != "uid":
        pytest.skip(f"needs root for a per-run uid: {isolation.isolation().reason}")


def require_private_root() -> None:
    if not isolation.isolation().has_private_root:
        pytest.skip(f"no private root here: {isolation.isolation().reason}")


def require_probe_files() -> None:
    if os.geteuid() != 0:
        pytest.skip("the probe files are root's (a secret, a victim in an open folder): needs root")


@pytest.fixture(scope="module")
def probe_files():
    if os.geteuid() != 0:  # the probes that need them skip (require_probe_files); the rest run
        yield
        return
    OPEN_DIR.mkdir(parents=True)
    PROBE_DIR.chmod(0o755)
    OPEN_DIR.chmod(0o777)
    SECRET_FILE.write_text(SECRET + "\n")
    SECRET_FILE.chmod(0o600)
    VICTIM.write_text("root's log\n")
    os.environ["CODEFAST_PROBE_SECRET"] = SECRET  # the caller's environment must not leak either
    yield
    del os.environ["CODEFAST_PROBE_SECRET"]
    shutil.rmtree(PROBE_DIR, ignore_errors=True)
    for leftover in (Path("/tmp") / MARKER, Path("/dev/shm") / MARKER, Path("/var/tmp") / MARKER):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def probes(probe_files):
    with pytest.MonkeyPatch.context() as patch:  # a uid range of our own (see test_sandbox.py)
        patch.setattr(isolation, "UID_BASE", 64000 + (os.getpid() % 8) * isolation.NUM_UIDS)
        names = [n for n, (language, _) in HOSTILE.items() if not toolchain_missing(language)]
        results = run_many([Job(HOSTILE[n][0], HOSTILE[n][1], LIMITS) for n in names], num_workers=2)
        alive = [pid for uid in range(isolation.UID_BASE, isolation.UID_BASE + isolation.NUM_UIDS)
                 for pid in isolation.pids_of_uid(uid)]
    return dict(zip(names, results)), alive


def probe(probes, name):
    results, _ = probes
    if name not in results:
        language = HOSTILE[name][0]
        pytest.skip(f"{language} toolchain missing: {toolchain_missing(language)}")
    result = results[name]
    # Whatever the probe did, the run ended within its limits and showed no secret.
    assert result.duration_s < LIMITS.timeout_s + LIMITS.compile_timeout_s + SLACK_S
    assert SECRET not in result.stdout + result.stderr
    return result


# ---- reading -------------------------------------------------------------------------------------
def test_compiler_cannot_include_root_only_files(probes):
    require_uid_mode()
    with open("/etc/shadow") as f:
        shadow_first_line = f.readline().strip()
    for name in ("cpp_include_shadow", "cpp_include_secret"):
        result = probe(probes, name)
        assert result.status == "compile_error" and "Permission denied" in result.stderr, (name, result.stderr)
        assert not shadow_first_line or shadow_first_line not in result.stderr


def test_compiler_cannot_read_the_callers_environment(probes):
    require_uid_mode()
    result = probe(probes, "cpp_include_caller_environ")
    assert result.status == "compile_error"
    assert "No such file" in result.stderr or "Permission denied" in result.stderr, result.stderr


def test_go_embed_and_js_require_and_python_open_cannot_read_the_secret(probes):
    require_uid_mode()
    assert probe(probes, "go_embed_secret").status == "compile_error"
    assert probe(probes, "js_require_secret").stdout.strip() == "EACCES"
    assert probe(probes, "python_read_secret").stdout.split()[0] == "denied"


def test_other_processes_are_invisible(probes):
    require_private_root()
    if not isolation.isolation().has_pid_namespace:
        pytest.skip("no pid namespace here")
    num_pids, sees_caller = probe(probes, "proc_of_others").stdout.split()
    assert int(num_pids) <= LIMITS.max_processes and sees_caller == "False"


# ---- writing -------------------------------------------------------------------------------------
def test_nothing_outside_the_run_can_be_written_or_deleted_and_nothing_is_left(probes):
    require_private_root()
    require_probe_files()
    lines = probe(probes, "write_everywhere").stdout.splitlines()
    assert f"refused {OPEN_DIR}/planted 30" in lines  # EROFS: the host is read-only
    assert any(line.startswith("victim kept") for line in lines) and VICTIM.read_text() == "root's log\n"
    assert f"wrote /dev/shm/{MARKER}" in lines  # the run's own tmpfs takes it ...
    for path in (OPEN_DIR / "planted", Path("/tmp") / MARKER, Path("/dev/shm") / MARKER, Path("/var/tmp") / MARKER):
        assert not path.exists(), path  # ... and it is gone with the run


@pytest.mark.parametrize("name", ["fill_dev_shm", "fill_work_dir", "inode_bomb"])
def test_total_disk_and_shm_use_is_bounded_with_a_clear_status(probes, name):
    require_private_root()
    result = probe(probes, name)
    written, is_enospc = result.stdout.split()
    assert result.status == "disk_limit" and is_enospc == "True", result
    assert int(written) <= LIMITS.max_disk_mb * MiB
    assert "disk limit" in result.stderr and f"{LIMITS.max_disk_mb} MiB" in result.stderr


# ---- exhausting kernel resources, signals, the clock -----------------------------------------------
def test_open_files_stop_at_the_limit(probes):
    num_open, errno_name = probe(probes, "fd_exhaustion").stdout.split()
    assert int(num_open) <= LIMITS.max_open_files and int(errno_name) == 24  # EMFILE


def test_timers_are_bounded(probes):
    result = probe(probes, "timer_bomb")
    assert result.status == "passed" and int(result.stdout) <= isolation.MAX_PENDING_SIGNALS


def test_the_clock_cannot_be_set(probes):
    result = probe(probes, "set_clock")
    assert result.stdout.split()[0] == "denied"


def test_a_signal_storm_hurts_nothing_outside_the_run(probes):
    probe(probes, "signal_storm")
    canary = probe(probes, "canary")
    assert (canary.status, canary.stdout) == ("passed", "alive\n")
    os.kill(CALLER_PID, 0)  # and we are here to check it


def test_no_process_of_any_probe_outlives_it(probes):
    require_uid_mode()
    _, alive = probes
    assert alive == []


# ---- without root ---------------------------------------------------------------------------------
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # one an unprivileged user can run (ours may sit under /root)
AS_NOBODY = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
from evals import isolation
from evals.sandbox import Limits, run_program
limits = Limits(timeout_s=10, max_disk_mb=8, max_file_bytes=1 << 20)
escape = run_program("python", "open('{PROBE_DIR}/nobody/planted', 'w')", limits)
fill = run_program("python", {FILL.format(folder="/dev/shm", chunk=1 << 20)!r}, limits)
mode = isolation.isolation()
print(json.dumps([mode.mode, mode.has_private_root, mode.reason, escape.stderr, fill.status]))
"""


def test_without_root_user_namespaces_still_give_a_private_root(probe_files):
    """The "userns" mode, checked as an unprivileged user (we are root here, so we can be one)."""
    require_probe_files()
    if not os.access(SYSTEM_PYTHON, os.X_OK) or not shutil.which("setpriv"):
        pytest.skip(f"needs {SYSTEM_PYTHON} and setpriv to run as an unprivileged user")
    home = PROBE_DIR / "nobody"  # writable by that user on the host, so only the sandbox can refuse
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "CODEFAST_CACHE": str(home / ".cache")}
    done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                           SYSTEM_PYTHON, "-c", AS_NOBODY], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    mode, has_private_root, reason, escape_stderr, fill_status = json.loads(done.stdout.splitlines()[-1])
    if mode != "userns" or not has_private_root:
        pytest.skip(f"no user namespaces with a private root for an unprivileged user here: {mode}, {reason}")
    assert "Read-only file system" in escape_stderr and not (home / "planted").exists()
    assert fill_status == "disk_limit"


# ---- requests the engine cannot serve --------------------------------------------------------------
def test_bad_requests_fail_alone_at_the_edge_of_the_engine():
    backend = CodefastBackend(tiny_engine())
    with pytest.raises(PromptError, match="lone surrogate"):
        backend.encode_prompt("def f():\n    return '\ud800'\n", SamplingParams())
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64)

    async def main():
        good = backend.generate("def f():", SamplingParams(max_new_tokens=8, ignore_eos=True))
        tiny = backend.generate("def f():", SamplingParams(max_new_tokens=8, temperature=1e-300, ignore_eos=True))
        return await asyncio.gather(good, tiny)

    good, tiny = asyncio.run(main())
    assert good.token_ids == tiny.token_ids and len(good.token_ids) == 8
    backend.check_health()
    backend.shutdown()
