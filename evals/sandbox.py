"""Run untrusted generated code (python, javascript, go, cpp) and say how it ended.

Every run: its own temp directory (removed after), its own session and process group, stdin from
/dev/null, a wall-clock timeout, rlimits (CPU seconds, memory, file size, process count, no core
files) and a cap on captured stdout+stderr, read incrementally: the run is killed when exceeded.
Who runs it, its network, and how stragglers die is `evals/isolation.py` (its docstring lists the
modes and their guarantees); the per-language commands are `evals/toolchains.py`. Compiled
languages are built first under their own, larger limits; compilers run as the caller (they never
execute the submitted code: CGO is off, no go:generate).

Memory: the limit is RLIMIT_DATA, which (Linux >= 4.7) counts heap and private writable mappings
but not address space that is only reserved. RLIMIT_AS alone would kill go (~650 MiB of arena
reservations at start) and node (~750 MiB for V8) before they run a line, so AS is only a
backstop at memory + per-language headroom; it bounds MAP_SHARED memory, which DATA ignores.
"""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from evals import isolation, toolchains
from evals.process import Outcome, execute

MiB = 1 << 20
STATUSES = ("passed", "failed", "timeout", "memory", "output_limit", "compile_error", "error")
COMPILE_OUTPUT_BYTES = 1 * MiB
COMPILE_FILE_BYTES = 512 * MiB
MEMORY_MARKERS = (b"MemoryError", b"std::bad_alloc", b"out of memory", b"Cannot allocate memory")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 1024
    max_output_bytes: int = 1 * MiB
    max_file_bytes: int = 16 * MiB
    max_processes: int = 64  # tasks, threads included: node needs ~5, a go binary ~6
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


def _status(outcome: Outcome, limits: Limits) -> str:
    if outcome.is_timed_out:
        return "timeout"
    if outcome.is_output_exceeded:
        return "output_limit"
    if outcome.returncode == 0:
        return "passed"
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


def _compile(spec: toolchains.LanguageSpec, workdir: str, limits: Limits) -> Outcome:
    rlimits = isolation.RLimits(int(limits.compile_timeout_s) + 1, limits.compile_memory_mb * MiB, None,
                                COMPILE_FILE_BYTES, None)
    return execute(isolation.wrap(list(spec.compile_argv), rlimits, None, is_untrusted=False), workdir,
                   toolchains.environment(workdir, limits.memory_mb, is_compile=True), limits.compile_timeout_s,
                   COMPILE_OUTPUT_BYTES, kill=lambda pid: isolation.kill_run(pid, None))


def run_program(language: str, source: str, limits: Limits = Limits()) -> ExecResult:
    missing = toolchains.toolchain_missing(language)
    if missing:
        return ExecResult("error", None, "", missing, 0.0)
    start = time.monotonic()
    try:
        spec = toolchains.language_spec(language)
        with isolation.sandbox_uid() as uid, toolchains.workdir() as workdir:
            Path(workdir, spec.filename).write_text(source)
            if spec.compile_argv:
                built = _compile(spec, workdir, limits)
                if built.returncode != 0 or built.is_timed_out or built.is_output_exceeded:
                    note = "\n[sandbox] compile timed out" if built.is_timed_out else ""
                    return ExecResult("compile_error", built.returncode, _text(built.stdout),
                                      _text(built.stderr) + note, time.monotonic() - start)
            if uid is not None:  # the program's uid owns its directory and nothing else
                for path in [workdir, *map(str, Path(workdir).rglob("*"))]:
                    os.lchown(path, uid, uid)
            rlimits = isolation.RLimits(limits.cpu_s, limits.memory_mb * MiB,
                                        (limits.memory_mb + spec.as_headroom_mb) * MiB,
                                        limits.max_file_bytes, limits.max_processes)
            outcome = execute(isolation.wrap(list(spec.run_argv), rlimits, uid), workdir,
                              toolchains.environment(workdir, limits.memory_mb, is_compile=False),
                              limits.timeout_s, limits.max_output_bytes, kill=lambda pid: isolation.kill_run(pid, uid))
    except Exception as exc:  # the sandbox itself failed; one bad run must not end an evaluation
        return ExecResult("error", None, "", f"[sandbox] {type(exc).__name__}: {exc}", time.monotonic() - start)
    status = _status(outcome, limits)
    # One convention for callers: negative = killed by that signal, -SIGKILL when the sandbox
    # killed the run (through `sh` a signal shows as 128 + n, through a killed `unshare` as 1).
    if outcome.is_timed_out or outcome.is_output_exceeded:
        returncode = -signal.SIGKILL
    else:
        sig = isolation.exit_signal(outcome.returncode)
        returncode = -sig if sig else outcome.returncode
    note = {"timeout": f"\n[sandbox] killed: time limit ({limits.timeout_s}s wall, {limits.cpu_s}s cpu)",
            "output_limit": f"\n[sandbox] killed: output over {limits.max_output_bytes} bytes"}.get(status, "")
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
