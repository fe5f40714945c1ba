"""Who runs an untrusted program, in which namespaces, under which rlimits, and how it all dies.

One mode is detected once per process (`isolation()`), the strongest that works here:

- "uid" (we are root): every run gets its own unused uid from a pool (`CODEFAST_SANDBOX_UID_BASE`,
  default 61000, 128 uids), held with an flock so concurrent runs, threads or processes, never
  share one. The chain is `unshare -n --pid --fork --kill-child` (an empty network namespace: no
  interface is up, so even 127.0.0.1 is unreachable; a pid namespace whose teardown kills and
  reaps everything in it) -> `prlimit` -> `setpriv` (drop to the run's uid: no groups, no
  capabilities, no_new_privs) -> `sh` as pid 1, so the program never gets pid 1's immunity to
  default signals. RLIMIT_NPROC counts tasks per uid and the uid is the run's alone, so a fork
  bomb stops at `max_processes`. Afterwards `kill -KILL -1` run *as that uid* reaches every
  process it owns, a second net under the pid namespace. The uid can write only its work dir and
  world-writable temp dirs, which are swept of its files after the run.
- "userns" (not root, unprivileged user namespaces allowed): `unshare -rn --pid --fork
  --kill-child` -> `prlimit` -> `sh` -> program. In a fresh user namespace RLIMIT_NPROC counts
  from zero (kernel >= 5.14); killing the process group kills pid 1 and so the whole namespace.
  The program runs with the caller's file permissions.
- "plain" (neither works): rlimits and killpg only. The network is NOT isolated, a process that
  calls setsid() can outlive the run, and RLIMIT_NPROC (per real uid) is set to the caller's
  current task count + `max_processes`, so a fork bomb is bounded but competes with the caller's
  own forks; `isolation().reason` says why we fell back.
Compilers (trusted tools) run as the caller, in the network namespace when there is one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

UID_BASE = int(os.environ.get("CODEFAST_SANDBOX_UID_BASE", "61000"))
NUM_UIDS = 128
LOCK_DIR = Path.home() / ".cache" / "codefast" / "sandbox-uids"
# World-writable places a sandbox uid can leave files in; swept after every run.
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
PID_NS = ["--pid", "--fork", "--kill-child"]
SH_WRAPPER = ['/bin/sh', '-c', '"$@"; exit $?', 'sh']


@dataclass(frozen=True)
class Isolation:
    mode: str  # "uid" | "userns" | "plain"
    is_network_isolated: bool
    has_pid_namespace: bool
    reason: str


@dataclass(frozen=True)
class RLimits:
    cpu_s: int
    data_bytes: int
    as_bytes: int | None
    file_bytes: int
    max_processes: int | None

    def prlimit_args(self) -> list[str]:
        # Soft CPU limit sends SIGXCPU; the hard one a second later SIGKILLs a program that ignores it.
        args = [f"--cpu={self.cpu_s}:{self.cpu_s + 1}", f"--data={self.data_bytes}",
                f"--fsize={self.file_bytes}", "--core=0"]
        if self.as_bytes is not None:
            args.append(f"--as={self.as_bytes}")
        if self.max_processes is not None:
            args.append(f"--nproc={self.max_processes}")
        return args


def _works(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@lru_cache(maxsize=None)
def isolation() -> Isolation:
    tools = {name: shutil.which(name) for name in ("unshare", "prlimit", "setpriv")}
    if not tools["prlimit"]:
        raise RuntimeError("prlimit (util-linux) not found; run scripts/setup_system.sh")
    if os.geteuid() == 0 and tools["setpriv"]:
        drop = _drop_privileges(UID_BASE + NUM_UIDS - 1) + SH_WRAPPER + ["true"]
        if not _works(drop):
            return Isolation("plain", False, False, "setpriv could not drop to an unprivileged uid")
        is_net = bool(tools["unshare"]) and _works(["unshare", "-n", "--"] + drop)
        has_pid = bool(tools["unshare"]) and _works(["unshare", *PID_NS, "--"] + drop)
        return Isolation("uid", is_net, has_pid, f"root: per-run uid, network namespace: {is_net}, "
                                                 f"pid namespace: {has_pid}")
    if tools["unshare"] and _works(["unshare", "-rn", *PID_NS, "--"] + SH_WRAPPER + ["true"]):
        return Isolation("userns", True, True, "user + network + pid namespace")
    return Isolation("plain", False, False, "no user namespaces and not root: network NOT isolated")


def _drop_privileges(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--"]


def wrap(argv: list[str], rlimits: RLimits, uid: int | None, is_untrusted: bool = True) -> list[str]:
    """The full command line: namespaces, then rlimits, then (uid mode) the unprivileged uid.
    `is_untrusted=False` (compilers): network namespace and rlimits only."""
    mode = isolation()
    if mode.mode == "plain":
        rlimits = _plain_nproc(rlimits)
    limits = ["prlimit", *rlimits.prlimit_args(), "--"]
    flags = (["-n"] if mode.is_network_isolated else []) + (PID_NS if is_untrusted and mode.has_pid_namespace else [])
    if mode.mode == "userns":
        flags = ["-r"] + flags
    unshare = ["unshare", *flags, "--"] if flags else []
    if mode.mode == "uid" and is_untrusted:
        if uid is None:
            raise ValueError("uid mode runs untrusted programs under a sandbox uid")
        return unshare + limits + _drop_privileges(uid) + SH_WRAPPER + argv
    return unshare + limits + (SH_WRAPPER if is_untrusted else []) + argv


def _plain_nproc(rlimits: RLimits) -> RLimits:
    """RLIMIT_NPROC counts all tasks of the real uid: leave room for what the caller already runs."""
    if rlimits.max_processes is None or os.geteuid() == 0:
        return rlimits
    return dataclasses.replace(rlimits, max_processes=rlimits.max_processes + num_tasks_of_uid(os.getuid()))


def exit_signal(returncode: int | None) -> int | None:
    """The signal that ended the program, seen through the `sh` wrapper (exit status 128 + n)."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if 128 < returncode < 128 + signal.NSIG:
        return returncode - 128
    return None


@contextlib.contextmanager
def sandbox_uid():
    """Yield a uid no other run holds (uid mode), else None. Stale leftovers are killed first."""
    if isolation().mode != "uid":
        yield None
        return
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for uid in range(UID_BASE, UID_BASE + NUM_UIDS):
        fd = os.open(LOCK_DIR / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        kill_uid(uid)
        if pids_of_uid(uid, include_zombies=True):  # unreaped tasks still count against RLIMIT_NPROC
            os.close(fd)
            continue
        try:
            yield uid
        finally:
            kill_uid(uid)
            remove_files_of_uid(uid)
            os.close(fd)  # releases the flock
        return
    raise RuntimeError(f"all {NUM_UIDS} sandbox uids are busy")


def _process_status() -> dict[int, dict[str, str]]:
    """/proc/<pid>/status of every process. Its Uid line, not the owner of /proc/<pid>, because a
    process can make itself non-dumpable to look root-owned."""
    statuses = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                text = Path(entry.path, "status").read_text()
            except OSError:
                continue  # exited meanwhile
            statuses[int(entry.name)] = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return statuses


def pids_of_uid(uid: int, include_zombies: bool = False) -> list[int]:
    """Processes whose real uid is `uid`; zombies still count against RLIMIT_NPROC."""
    return [pid for pid, fields in _process_status().items()
            if int(fields["Uid"].split()[0]) == uid
            and (include_zombies or not fields["State"].strip().startswith("Z"))]


def num_tasks_of_uid(uid: int) -> int:
    return sum(int(fields.get("Threads", "1")) for fields in _process_status().values()
               if int(fields["Uid"].split()[0]) == uid)


def kill_uid(uid: int, give_up_s: float = 10.0) -> None:
    """SIGKILL everything `uid` owns: kill(-1) run as that uid signals exactly its processes, in
    every pid namespace below ours. Killed tasks may need a moment on a busy CPU to actually exit
    (they show as R with SIGKILL pending), hence the rounds with a growing pause."""
    deadline = time.monotonic() + give_up_s
    pause_s = 0.002
    while True:
        subprocess.run(_drop_privileges(uid) + ["kill", "-KILL", "--", "-1"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not pids_of_uid(uid):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of sandbox uid {uid} survived {give_up_s}s of SIGKILLs")
        time.sleep(pause_s)
        pause_s = min(2 * pause_s, 0.1)


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def kill_run(pid: int, uid: int | None) -> None:
    """End a run whose first process is `pid` (a session leader, not yet reaped). uid mode kills the
    uid's processes first (pid 1 of the namespace among them), so `unshare` reaps its child and
    exits by itself instead of leaving a zombie for the host init; then the whole process group."""
    if uid is not None:
        kill_uid(uid)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and \
                os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            time.sleep(0.005)
    kill_group(pid)


def remove_files_of_uid(uid: int) -> None:
    for directory in SHARED_TMP_DIRS:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                try:
                    if entry.stat(follow_symlinks=False).st_uid != uid:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                except OSError:
                    pass
