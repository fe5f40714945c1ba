"""Run one command to completion under a wall clock and an output cap, then kill what is left.

Output is read incrementally from both pipes, so a program printing forever is stopped as soon as
it crosses the cap instead of filling memory. When the main process exits, anything it left
behind (background children still holding the pipes) is killed too: a run never outlives its call.
"""
from __future__ import annotations

import os
import selectors
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

READ_CHUNK = 64 * 1024
POLL_S = 0.05
DRAIN_S = 2.0  # after the kill, pipes reach EOF at once; this only bounds a pathological case


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # negative: killed by that signal (subprocess convention)
    stdout: bytes
    stderr: bytes
    is_timed_out: bool
    is_output_exceeded: bool
    cpu_s: float  # user + system time of the main process and its reaped children
    wall_s: float


def _has_exited(pid: int) -> bool:
    """Without reaping (WNOWAIT): the pid, and so its process group id, stays ours until the kill."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _reap(proc: subprocess.Popen) -> float:
    """wait4 instead of Popen.wait: its rusage tells a CPU-limit SIGKILL from an OOM kill."""
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return rusage.ru_utime + rusage.ru_stime


def execute(argv: list[str], cwd: str, env: dict[str, str], timeout_s: float, max_output_bytes: int,
            kill: Callable[[int], None]) -> Outcome:
    """`kill(pid)` must end the process group and everything else the run owns (isolation.kill_run)."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    num_bytes = 0
    is_timed_out = is_output_exceeded = is_main_done = False
    selector = selectors.DefaultSelector()
    for pipe in (proc.stdout, proc.stderr):
        selector.register(pipe, selectors.EVENT_READ, "output")
    # A pidfd turns readable when the process exits: no polling latency on the common fast path.
    pidfd = os.pidfd_open(proc.pid) if hasattr(os, "pidfd_open") else None
    if pidfd is not None:
        selector.register(pidfd, selectors.EVENT_READ, "exit")

    def read_ready(wait_s: float) -> None:
        nonlocal num_bytes, is_output_exceeded, is_main_done
        for key, _ in selector.select(timeout=wait_s):
            if key.data == "exit":
                is_main_done = True
                selector.unregister(key.fd)
                continue
            data = os.read(key.fd, READ_CHUNK)
            if not data:
                selector.unregister(key.fileobj)
                continue
            buffers[key.fd] += data[:max(0, max_output_bytes - num_bytes)]
            num_bytes += len(data)
            is_output_exceeded = is_output_exceeded or num_bytes > max_output_bytes

    try:
        while not is_main_done and not is_output_exceeded:
            remaining = start + timeout_s - time.monotonic()
            if remaining <= 0:
                is_timed_out = True
                break
            read_ready(min(remaining, POLL_S))
            is_main_done = is_main_done or _has_exited(proc.pid)
    finally:
        kill(proc.pid)  # always: also ends stragglers of a program that exited normally
        drain_until = time.monotonic() + DRAIN_S
        while any(k.data == "output" for k in selector.get_map().values()) and not is_output_exceeded \
                and time.monotonic() < drain_until:
            read_ready(POLL_S)
        selector.close()
        if pidfd is not None:
            os.close(pidfd)
        cpu_s = _reap(proc)
        stdout, stderr = bytes(buffers[proc.stdout.fileno()]), bytes(buffers[proc.stderr.fileno()])
        proc.stdout.close()
        proc.stderr.close()
    return Outcome(proc.returncode, stdout, stderr, is_timed_out, is_output_exceeded, cpu_s,
                   time.monotonic() - start)
