"""Run untrusted generated code (every language of evals/toolchains.TOOLCHAINS) and say how it ended.

Every run: its own files (a private root where the machine allows it: the host read-only, one
tmpfs of `max_disk_mb` for the work dir, /tmp, /var/tmp and /dev/shm; else a temp directory), its
own session and process group, stdin from /dev/null, a wall-clock timeout, rlimits (CPU seconds,
memory, file size, open files, process count, no core files) and a cap on captured stdout+stderr,
read incrementally: the run is killed when exceeded. Nothing it wrote survives it.
Who runs it, its network, and how stragglers die is `evals/isolation.py` (its docstring lists the
modes and their guarantees); the per-language commands are `evals/toolchains.py`. Compiled
languages are built first, under their own, larger limits but with the same isolation as the
program: a compiler reads whatever the source names (`#include "/etc/shadow"`), so it runs as the
run's uid, without network, in the run's private root.

Memory: where a memory cgroup can be made (evals/memory_cgroup.py), each step gets one limited to
its memory limit, which counts everything the step holds: heap, memfd files, /dev/shm and SysV
segments, the tmpfs of its private root. Everywhere, RLIMIT_DATA (Linux >= 4.7) counts heap and
private writable mappings but not address space that is only reserved. RLIMIT_AS alone would
kill go (~650 MiB of arena reservations at start) and node (~750 MiB for V8) before they run a
line, so AS is only a backstop at memory + per-language headroom; without a cgroup it is what
bounds mapped shared memory (memfd, shm), which DATA ignores. Managed runtimes (JVM, mono, PHP,
V8) get a heap cap under the memory limit, so they end in their own out-of-memory error.
"""
from __future__ import annotations

import contextlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from evals import isolation, memory_cgroup, toolchains
from evals.process import Outcome, execute

MiB = 1 << 20
STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "disk_limit", "compile_error", "error")
COMPILE_OUTPUT_BYTES = 1 * MiB
COMPILE_FILE_BYTES = 512 * MiB  # still within max_disk_mb where there is a private root
COMPILE_MAX_PROCESSES = 256  # tasks: go build runs a compiler per package, each with threads
COMPILE_MAX_OPEN_FILES = 1024
# A run that failed with less than this free in its tmpfs ran out of disk: a write that does not
# fit fails whole or in part, so the last one can leave up to its own size unused.
DISK_FULL_MARGIN_BYTES = 1 * MiB
DISK_FULL_MARKERS = (b"No space left on device", b"ENOSPC")
MEMORY_MARKERS = (b"MemoryError", b"std::bad_alloc", b"out of memory", b"Cannot allocate memory",
                  b"java.lang.OutOfMemoryError", b"System.OutOfMemoryException",  # JVM, mono
                  b"error='Not enough space' (errno=12)",  # the JVM failing to commit beside its heap
                  b"Allowed memory size of", b"failed to allocate memory (NoMemoryError)")  # PHP, ruby


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_output_bytes: int = 1 * MiB
    max_file_bytes: int = 16 * MiB
    max_processes: int = 64  # tasks, threads included: node needs ~5, a go binary ~6
    max_open_files: int = 256
    # Everything the run writes, compile output included: work dir, /tmp, /var/tmp, /dev/shm
    # (one tmpfs, so RAM). Without a private root only max_file_bytes per file holds.
    max_disk_mb: int = 256
    compile_timeout_s: float = 60.0
    compile_memory_mb: int = 2048

    def __post_init__(self):
        for name, value in vars(self).items():
            if value <= 0:
                raise ValueError(f"Limits.{name} must be positive, got {value}")


@dataclass(frozen=True)
class ExecResult:
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float  # wall clock, compile included

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Job:
    language: str
    source: str
    limits: Limits = field(default_factory=Limits)


def _is_disk_full(space: isolation.RunSpace, stderr: bytes) -> bool:
    free_bytes = space.free_bytes()
    if free_bytes is None:
        return False
    return free_bytes < DISK_FULL_MARGIN_BYTES or any(marker in stderr for marker in DISK_FULL_MARKERS)


def _status(outcome: Outcome, limits: Limits, is_disk_full: bool = False) -> str:
    if outcome.is_timed_out:
        return "timeout"
    if outcome.is_output_exceeded:
        return "output_limit"
    if outcome.returncode == 0:
        return "passed"
    if is_disk_full:
        return "disk_limit"
    sig = isolation.exit_signal(outcome.returncode)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and outcome.cpu_s >= limits.cpu_s):
        return "timeout"  # the soft CPU limit, or the hard one a second later
    if sig == signal.SIGKILL or any(marker in outcome.stderr for marker in MEMORY_MARKERS):
        return "memory"  # a SIGKILL we did not send: the OOM killer
    return "failed"


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _program_stderr(data: bytes) -> str:
    """Drop the line `unshare` prints when we SIGKILL its child; it is ours, not the program's."""
    return "".join(line for line in _text(data).splitlines(keepends=True)
                   if not line.startswith("unshare: sigprocmask"))


def _disk_note(limits: Limits) -> str:
    return (f"\n[sandbox] disk limit: the run's files (work dir, /tmp, /var/tmp, /dev/shm) reached"
            f" {limits.max_disk_mb} MiB or {isolation.PRIVATE_MAX_INODES} files")


def _step(argv: tuple[str, ...], rlimits: isolation.RLimits, uid: int | None, space: isolation.RunSpace,
          env: dict[str, str], timeout_s: float, max_output_bytes: int) -> Outcome:
    """One step (compile or run) in a memory cgroup of its own limited to rlimits.data_bytes,
    where the machine gives one: shared memory then counts too."""
    where = memory_cgroup.hierarchy()
    with memory_cgroup.step_cgroup(where, rlimits.data_bytes) if where else contextlib.nullcontext() as procs:
        return execute(isolation.wrap(list(argv), rlimits, uid, space, cgroup_procs=procs), space.popen_cwd,
                       env, timeout_s, max_output_bytes, kill=lambda pid: isolation.kill_run(pid, uid))


def _compile(spec: toolchains.LanguageSpec, space: isolation.RunSpace, uid: int | None,
             limits: Limits) -> Outcome:
    rlimits = isolation.RLimits(int(limits.compile_timeout_s) + 1, limits.compile_memory_mb * MiB, None,
                                COMPILE_FILE_BYTES, COMPILE_MAX_PROCESSES, COMPILE_MAX_OPEN_FILES)
    return _step(spec.compile_argv, rlimits, uid, space, _environment(spec, space, limits, is_compile=True),
                 limits.compile_timeout_s, COMPILE_OUTPUT_BYTES)


def _environment(spec: toolchains.LanguageSpec, space: isolation.RunSpace, limits: Limits,
                 is_compile: bool) -> dict[str, str]:
    return {**toolchains.environment(space, limits.memory_mb, is_compile), **dict(spec.env)}


def _write(space: isolation.RunSpace, name: str, text: str) -> None:
    path = Path(space.host_dir, name)
    path.write_text(text)
    path.chmod(0o644)  # ours, readable by the run's uid, which owns the folder


def run_program(language: str, source: str, limits: Limits = Limits()) -> ExecResult:
    missing = toolchains.toolchain_missing(language)
    if missing:
        return ExecResult("error", None, "", missing, 0.0)
    start = time.monotonic()
    try:
        shared_dirs = toolchains.shared_dirs(language)
        with isolation.sandbox_uid() as uid, \
                isolation.run_space(uid, limits.max_disk_mb * MiB, shared_dirs) as space:
            spec = toolchains.language_spec(language, space.path_of, limits.memory_mb)
            for name, text in ((spec.filename, source), *spec.extra_files):
                _write(space, name, text)
            if spec.compile_argv:
                built = _compile(spec, space, uid, limits)
                if built.returncode != 0 or built.is_timed_out or built.is_output_exceeded:
                    note = "\n[sandbox] compile timed out" if built.is_timed_out else ""
                    if _is_disk_full(space, built.stderr):
                        note += _disk_note(limits)
                    return ExecResult("compile_error", built.returncode, _text(built.stdout),
                                      _text(built.stderr) + note, time.monotonic() - start)
            rlimits = isolation.RLimits(limits.cpu_s, limits.memory_mb * MiB,
                                        (limits.memory_mb + spec.as_headroom_mb) * MiB,
                                        limits.max_file_bytes, limits.max_processes, limits.max_open_files)
            outcome = _step(spec.run_argv, rlimits, uid, space, _environment(spec, space, limits, is_compile=False),
                            limits.timeout_s, limits.max_output_bytes)
            is_disk_full = _is_disk_full(space, outcome.stderr)
    except Exception as exc:  # the sandbox itself failed; one bad run must not end an evaluation
        return ExecResult("error", None, "", f"[sandbox] {type(exc).__name__}: {exc}", time.monotonic() - start)
    status = _status(outcome, limits, is_disk_full)
    # One convention for callers: negative = killed by that signal, -SIGKILL when the sandbox
    # killed the run (through `sh` a signal shows as 128 + n, through a killed `unshare` as 1).
    if outcome.is_timed_out or outcome.is_output_exceeded:
        returncode = -signal.SIGKILL
    else:
        sig = isolation.exit_signal(outcome.returncode)
        returncode = -sig if sig else outcome.returncode
    note = {"timeout": f"\n[sandbox] killed: time limit ({limits.timeout_s}s wall, {limits.cpu_s}s cpu)",
            "output_limit": f"\n[sandbox] killed: output over {limits.max_output_bytes} bytes",
            "disk_limit": _disk_note(limits)}.get(status, "")
    return ExecResult(status, returncode, _text(outcome.stdout), _program_stderr(outcome.stderr) + note,
                      time.monotonic() - start)


def run_many(jobs: list[Job], num_workers: int = 2) -> list[ExecResult]:
    """Results in job order. Threads suffice: each worker only waits on its child process."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        return list(pool.map(lambda job: run_program(job.language, job.source, job.limits), jobs))


if __name__ == "__main__":
    print(isolation.isolation())
    for lang in toolchains.LANGUAGES:
        print(f"{lang:10s}", toolchains.toolchain_missing(lang) or "ok")
