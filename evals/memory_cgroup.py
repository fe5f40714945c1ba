"""One memory cgroup per sandbox step, where this machine lets us make them.

RLIMIT_DATA counts a run's heap but not its shared memory: memfd files, /dev/shm and SysV
segments are tmpfs pages, which only a memory cgroup charges to the run. Each step (compile, then
the program) gets a fresh cgroup whose limit is the step's memory limit: the kernel then counts
heap, stack, page tables, tmpfs and shared pages together and OOM-kills the run beyond it (the
sandbox reports status "memory").

Where the cgroups go (`parent()`), the first that works:
1. CODEFAST_SANDBOX_CGROUP: a directory delegated to us (cgroup v2 with the memory controller in
   its cgroup.subtree_control, or a cgroup v1 memory directory);
2. cgroup v2: our own cgroup, if the memory controller is already enabled for its children (we
   do not enable it: that fails anyway while our cgroup holds processes, the v2 "no internal
   processes" rule, and would change the host's setup);
3. cgroup v1: our own cgroup in the memory hierarchy.
Else `problem()` says why, and runs fall back to rlimits (see evals/isolation.py).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ENV_PARENT = "CODEFAST_SANDBOX_CGROUP"
RMDIR_GIVE_UP_S = 5.0
# Writes the step's first process into the cgroup, then becomes the step: all it starts inherits it.
JOIN_SCRIPT = 'echo $$ > "$0" && exec "$@"'
_names = itertools.count()


@dataclass(frozen=True)
class Hierarchy:
    parent: str  # directory to create the run cgroups in
    is_v2: bool

    def limit_files(self, limit_bytes: int) -> list[tuple[str, str, bool]]:
        """(file, value, is_required) to write, in order; swap may not add to the limit (the swap
        files are missing where the kernel has no swap accounting)."""
        if self.is_v2:
            return [("memory.max", str(limit_bytes), True), ("memory.swap.max", "0", False)]
        return [("memory.limit_in_bytes", str(limit_bytes), True),
                ("memory.memsw.limit_in_bytes", str(limit_bytes), False)]


def _own_cgroups() -> dict[str, str]:
    """Controller ("" for v2) -> our cgroup path, from /proc/self/cgroup."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _mount_of(is_v2: bool) -> tuple[str, str] | None:
    """(mount root, mount point) of the v2 hierarchy, or of the v1 one holding the memory controller."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
        if (is_v2 and fstype == "cgroup2") or (not is_v2 and fstype == "cgroup" and "memory" in options):
            return fields[3], fields[4]
    return None


def _own_dir(is_v2: bool) -> str | None:
    path = _own_cgroups().get("" if is_v2 else "memory")
    mount = _mount_of(is_v2)
    if path is None or mount is None:
        return None
    root, point = mount
    if root != "/" and not (path + "/").startswith(root.rstrip("/") + "/"):
        return None
    return os.path.join(point, os.path.relpath(path, root).lstrip("."))


def _v2_delegates_memory(directory: str) -> bool:
    """Enabled for children already: we do not change the host's controller setup ourselves."""
    return "memory" in Path(directory, "cgroup.subtree_control").read_text().split()


def _candidates() -> Iterator[Hierarchy]:
    configured = os.environ.get(ENV_PARENT)
    if configured:
        yield Hierarchy(configured, Path(configured, "cgroup.controllers").exists())
        return
    own_v2 = _own_dir(is_v2=True)
    with contextlib.suppress(OSError):
        if own_v2 and _v2_delegates_memory(own_v2):
            yield Hierarchy(own_v2, True)
    own_v1 = _own_dir(is_v2=False)
    if own_v1:
        yield Hierarchy(own_v1, False)


@lru_cache(maxsize=None)
def _detect() -> tuple[Hierarchy | None, str]:
    tried = []
    for hierarchy in _candidates():
        try:
            with step_cgroup(hierarchy, 64 << 20):
                return hierarchy, ""
        except OSError as exc:
            tried.append(f"{hierarchy.parent}: {exc.strerror or exc}")
    return None, "; ".join(tried) or \
        "no cgroup v2 with the memory controller delegated, no cgroup v1 memory hierarchy"


def hierarchy() -> Hierarchy | None:
    return _detect()[0]


def problem() -> str | None:
    """None when each step gets a memory cgroup here, else why not."""
    return None if _detect()[0] else _detect()[1]


@contextlib.contextmanager
def step_cgroup(where: Hierarchy, limit_bytes: int) -> Iterator[str]:
    """A fresh cgroup limited to `limit_bytes`; yields its cgroup.procs. On exit, whatever is
    still in it is SIGKILLed and the cgroup removed."""
    directory = os.path.join(where.parent, f"codefast-{os.getpid()}-{next(_names)}")
    os.mkdir(directory)
    try:
        for name, value, is_required in where.limit_files(limit_bytes):
            path = os.path.join(directory, name)
            if is_required or os.path.exists(path):
                Path(path).write_text(value)
        yield os.path.join(directory, "cgroup.procs")
    finally:
        _remove(directory)


def join_argv(procs_path: str) -> list[str]:
    """Prefix of a step's command line that puts it in the cgroup (before it enters any namespace)."""
    return ["/bin/sh", "-c", JOIN_SCRIPT, procs_path]


def _remove(directory: str) -> None:
    """Kill what is left (a second net beside kill_run: a process cannot leave the cgroup), then
    rmdir, which succeeds once the last task has exited."""
    deadline = time.monotonic() + RMDIR_GIVE_UP_S
    while True:
        for pid in _pids(directory):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.rmdir(directory)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _pids(directory: str) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return [int(pid) for pid in Path(directory, "cgroup.procs").read_text().split()]
    return []
