"""Who runs an untrusted program, in which namespaces, under which rlimits, and how it all dies.

Every step of a run is untrusted, the compile included (a compiler reads whatever the source names:
`#include "/etc/shadow"`), so every step gets the same isolation. One mode is detected once per
process (`isolation()`), the strongest that works here:

- "uid" (we are root): every run gets its own unused uid from a pool (`CODEFAST_SANDBOX_UID_BASE`,
  default 61000, 128 uids), held with an flock so concurrent runs, threads or processes, never
  share one. The chain is [a memory cgroup] -> [`nsenter` into the run's private root] ->
  `unshare -n -i --pid --fork --kill-child --mount-proc` (an empty network namespace: no
  interface is up, so even 127.0.0.1 is unreachable; an IPC namespace; a pid namespace whose
  teardown kills and reaps everything in it, with its own /proc: no other process is visible)
  -> [IPC limits] -> `prlimit` -> `setpriv` (drop to the run's uid: no groups,
  no capabilities, no_new_privs) -> `sh` as pid 1, so the program never gets pid 1's immunity to
  default signals. RLIMIT_NPROC counts tasks per uid and the uid is the run's alone, so a fork
  bomb stops at `max_processes`. Afterwards `kill -KILL -1` run *as that uid* reaches every
  process it owns, a second net under the pid namespace.
- "userns" (not root, unprivileged user namespaces allowed): the same chain inside a user
  namespace where we are a fake root, with `setpriv` clearing every capability instead of
  changing uid: the program runs with the caller's file permissions (it can read what the caller
  can read). In a fresh user namespace RLIMIT_NPROC counts from zero (kernel >= 5.14); killing
  the process group kills pid 1 and so the whole namespace.
- "plain" (neither works): rlimits and killpg only. The network is NOT isolated, the filesystem
  is the caller's (a program can write wherever the caller can), a process that calls setsid()
  can outlive the run, and RLIMIT_NPROC (per real uid) is set to the caller's current task count
  + `max_processes`, so a fork bomb is bounded but competes with the caller's own forks;
  `isolation().reason` says why we fell back.

IPC and shared memory: where `unshare -i` works (uid and userns modes, `has_ipc_namespace`) every
step gets a fresh IPC namespace: SysV segments, semaphores, message queues and POSIX queues are
its own and die with it, and (`has_ipc_limits`) its sysctls cap SysV shm at the step's memory
limit and the number of objects of each kind (IPC_LIMITS_SCRIPT). After every uid-mode run the
uid's SysV objects are removed (and, without the namespace, its POSIX queues); in plain mode the
SysV objects made during the run. A per-step memory cgroup, where one can be made, counts memfd,
/dev/shm and SysV pages with the heap (evals/memory_cgroup.py); without one, mapped shared memory
is bounded by RLIMIT_AS, SysV shm by shmall, /dev/shm by the private root's tmpfs, and memfd files
that are not mapped only per file (RLIMIT_FSIZE) and per descriptor (RLIMIT_NOFILE).

The private root (`run_space`, uid and userns modes where mount namespaces work: kernel >= 5.12
for a recursive read-only remount): each run gets a mount namespace in which the whole host
filesystem is read-only and /tmp, /var/tmp and /dev/shm are one fresh tmpfs of `disk_bytes`
holding the work dir: writes anywhere else fail (EROFS), the total written is bounded (ENOSPC),
and everything vanishes with the namespace (evals/private_root.py). Without it (`has_private_root`
False) the work dir is a host temp dir, total disk use is bounded only per file (RLIMIT_FSIZE),
and in uid mode the top level of /tmp, /var/tmp and /dev/shm is swept of the uid's files after
the run; anything it wrote deeper in other world-writable directories stays.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import shutil
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from evals import memory_cgroup

UID_BASE = int(os.environ.get("CODEFAST_SANDBOX_UID_BASE", "61000"))
NUM_UIDS = 128
LOCK_DIR = Path.home() / ".cache" / "codefast" / "sandbox-uids"
# World-writable places a sandbox uid can leave files in without a private root; swept after a run.
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
PID_NS = ["--pid", "--fork", "--kill-child"]
IPC_NS = ["-i"]
SH_WRAPPER = ['/bin/sh', '-c', '"$@"; exit $?', 'sh']
# userns mode: the program is the namespace's root; with no capabilities it cannot undo the
# read-only mounts or the network namespace (a remount needs CAP_SYS_ADMIN).
DROP_CAPABILITIES = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
PRIVATE_ROOT_SCRIPT = Path(__file__).with_name("private_root.py")
PRIVATE_WORK_DIR = "/tmp/work"  # as the program sees it, in its private root
PRIVATE_SHARED_DIR = "/tmp/.shared"  # read-only toolchain caches, one numbered folder each
PRIVATE_MAX_INODES = 16384  # files in the run's tmpfs: empty files cost kernel memory, not bytes
HOLDER_START_S = 20.0  # the holder is a python that mounts three things: far longer only on a loaded host
PROBE_DISK_BYTES = 1 << 20
# Queued signals and POSIX timers (each holds one preallocated): without a bound a program can
# pin kernel memory with a million timers. Go and node use a handful.
MAX_PENDING_SIGNALS = 1024
# POSIX message queue bytes per uid (RLIMIT_MSGQUEUE): under the usual hard limit (800 KiB),
# which only CAP_SYS_RESOURCE may raise.
MAX_MSGQUEUE_BYTES = 512 << 10
# Run as root of the run's fresh IPC namespace, before the program: its SysV segments may hold at
# most the step's memory limit in all ($1 bytes, $2 pages), and few objects of each kind. The
# namespace's sysctls are its own; the host's stay as they are.
IPC_LIMITS_SCRIPT = ('k=/proc/sys/kernel && echo "$1" > $k/shmmax && echo "$2" > $k/shmall'
                     ' && echo 64 > $k/shmmni && echo 32 > $k/msgmni && echo "64 1024 64 32" > $k/sem'
                     ' && echo 16 > /proc/sys/fs/mqueue/queues_max && shift 2 && exec "$@"')
SYSV_KINDS = ("shm", "sem", "msg")  # /proc/sysvipc/<kind>
IPC_RMID = 0


@dataclass(frozen=True)
class Isolation:
    mode: str  # "uid" | "userns" | "plain"
    is_network_isolated: bool
    has_pid_namespace: bool
    reason: str
    has_private_root: bool = False  # read-only host, one size-limited tmpfs per run (run_space)
    has_ipc_namespace: bool = False  # SysV objects and POSIX queues die with the run
    has_ipc_limits: bool = False  # that namespace's shm/msg/sem/mqueue sysctls set (IPC_LIMITS_SCRIPT)


@dataclass(frozen=True)
class RLimits:
    cpu_s: int
    data_bytes: int
    as_bytes: int | None
    file_bytes: int
    max_processes: int | None
    max_open_files: int | None = None

    def prlimit_args(self) -> list[str]:
        # Soft CPU limit sends SIGXCPU; the hard one a second later SIGKILLs a program that ignores it.
        args = [f"--cpu={self.cpu_s}:{self.cpu_s + 1}", f"--data={self.data_bytes}",
                f"--fsize={self.file_bytes}", "--core=0", f"--sigpending={MAX_PENDING_SIGNALS}",
                f"--msgqueue={MAX_MSGQUEUE_BYTES}"]
        if self.max_open_files is not None:
            args.append(f"--nofile={self.max_open_files}")
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
    tools = {name: shutil.which(name) for name in ("unshare", "prlimit", "setpriv", "nsenter")}
    if not tools["prlimit"]:
        raise RuntimeError("prlimit (util-linux) not found; run scripts/setup_system.sh")
    if os.geteuid() == 0 and tools["setpriv"]:
        drop = _drop_privileges(UID_BASE + NUM_UIDS - 1) + SH_WRAPPER + ["true"]
        if not _works(drop):
            return Isolation("plain", False, False, "setpriv could not drop to an unprivileged uid")
        is_net = bool(tools["unshare"]) and _works(["unshare", "-n", "--"] + drop)
        has_pid = bool(tools["unshare"]) and _works(["unshare", *PID_NS, "--"] + drop)
        has_ipc, has_ipc_limits = _ipc_namespace_works(tools, [], drop)
        mode = Isolation("uid", is_net, has_pid, "", has_ipc_namespace=has_ipc, has_ipc_limits=has_ipc_limits)
        why_no_root = _private_root_problem(mode, tools, UID_BASE + NUM_UIDS - 1)
        return dataclasses.replace(mode, has_private_root=why_no_root is None, reason=(
            f"root: per-run uid, network namespace: {is_net}, pid namespace: {has_pid},"
            f" ipc namespace: {has_ipc} (limits: {has_ipc_limits}), private root: {why_no_root or True}"))
    if tools["unshare"] and tools["setpriv"] and \
            _works(["unshare", "-rn", *PID_NS, "--"] + DROP_CAPABILITIES + SH_WRAPPER + ["true"]):
        has_ipc, has_ipc_limits = _ipc_namespace_works(tools, ["-r"], DROP_CAPABILITIES + SH_WRAPPER + ["true"])
        mode = Isolation("userns", True, True, "", has_ipc_namespace=has_ipc, has_ipc_limits=has_ipc_limits)
        why_no_root = _private_root_problem(mode, tools, None)
        return dataclasses.replace(mode, has_private_root=why_no_root is None, reason=(
            f"user + network + pid namespace, ipc namespace: {has_ipc} (limits: {has_ipc_limits}),"
            f" private root: {why_no_root or True}"))
    return Isolation("plain", False, False, "no user namespaces and not root: network and filesystem NOT isolated")


def _ipc_namespace_works(tools: dict, userns: list[str], then: list[str]) -> tuple[bool, bool]:
    """(a fresh IPC namespace works, its limits can be set in it) for a step that runs `then`."""
    if not tools["unshare"]:
        return False, False
    has_ipc = _works(["unshare", *userns, *IPC_NS, "--"] + then)
    return has_ipc, has_ipc and _works(["unshare", *userns, *IPC_NS, "--", *_ipc_limits(64 << 20)] + then)


def _ipc_limits(memory_bytes: int) -> list[str]:
    return ["/bin/sh", "-c", IPC_LIMITS_SCRIPT, "sh", str(memory_bytes),
            str(max(1, memory_bytes // os.sysconf("SC_PAGE_SIZE")))]


def _private_root_problem(mode: Isolation, tools: dict, uid: int | None) -> str | None:
    """None when a run can get a private root here, else why not (for `reason`)."""
    if not (tools["nsenter"] and tools["unshare"]):
        return "no nsenter/unshare"
    try:
        with _holder(mode, PROBE_DISK_BYTES, uid, ()) as (_, enter_argv):
            step = wrap(["touch", f"{PRIVATE_WORK_DIR}/x", "/dev/shm/x"],
                        RLimits(10, 256 << 20, None, 1 << 20, 64), uid,
                        RunSpace(PRIVATE_WORK_DIR, "", "/", enter_argv, {}, None), mode)
            if not _works(step):
                return "a step in it failed"
    except (OSError, RuntimeError) as exc:
        return str(exc)
    return None


def _drop_privileges(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--"]


@dataclass(frozen=True)
class RunSpace:
    """Where one run's files live and how its commands get there (see `run_space`)."""

    dir: str  # the work dir as the program sees it: its cwd, HOME and TMPDIR
    host_dir: str  # the same folder as this process sees it: write the sources here
    popen_cwd: str  # cwd to start the command line from (nsenter sets the real one)
    enter_argv: tuple[str, ...]  # command prefix into the run's mount namespace; () without one
    shared_dirs: dict[str, str]  # host folder -> where the run sees it, read-only
    disk_path: str | None  # the run's tmpfs, seen from here; None: disk use bounded per file only

    def path_of(self, host_dir: str | Path) -> str | None:
        """Where the run sees a host folder given to `run_space`; None if it cannot see it."""
        return self.shared_dirs.get(str(host_dir))

    def free_bytes(self) -> int | None:
        if self.disk_path is None:
            return None
        stats = os.statvfs(self.disk_path)
        return stats.f_bavail * stats.f_frsize


@contextlib.contextmanager
def run_space(uid: int | None, disk_bytes: int, shared_dirs: tuple[str, ...] = ()) -> Iterator[RunSpace]:
    """One run's files: a private root (read-only host, a tmpfs of `disk_bytes` for /tmp,
    /var/tmp, /dev/shm and the work dir, `shared_dirs` bound read-only) where this machine allows
    it, else a host temp dir owned by the run's uid. Gone, with all the run wrote, on exit."""
    mode = isolation()
    if mode.has_private_root:
        with _holder(mode, disk_bytes, uid, shared_dirs) as (holder_pid, enter_argv):
            root = f"/proc/{holder_pid}/root"  # the tree as the holder sees it, from here
            shared = {path: f"{PRIVATE_SHARED_DIR}/{index}" for index, path in enumerate(shared_dirs)}
            yield RunSpace(PRIVATE_WORK_DIR, root + PRIVATE_WORK_DIR, "/", enter_argv, shared, root + "/tmp")
        return
    with tempfile.TemporaryDirectory(prefix="codefast-", dir=os.environ.get("CODEFAST_SANDBOX_TMP")) as directory:
        if uid is not None:
            os.chown(directory, uid, uid)
        # A run uid cannot be assumed to traverse to the caller's caches (often under a 0700 home).
        shared = {} if uid is not None else {path: path for path in shared_dirs}
        yield RunSpace(directory, directory, directory, (), shared, None)


@contextlib.contextmanager
def _holder(mode: Isolation, disk_bytes: int, uid: int | None,
            shared_dirs: tuple[str, ...]) -> Iterator[tuple[int, tuple[str, ...]]]:
    """Start evals/private_root.py in a new mount namespace; yield its pid and the nsenter
    prefix into that namespace."""
    userns = ["-r"] if mode.mode == "userns" else []
    argv = ["unshare", *userns, "-m", "--propagation", "private", "--", sys.executable, "-I",
            str(PRIVATE_ROOT_SCRIPT), str(disk_bytes), str(PRIVATE_MAX_INODES),
            str(-1 if uid is None else uid), *map(str, shared_dirs)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        line = _first_line(proc, HOLDER_START_S)
        if line != "ready":
            raise RuntimeError(f"private root not set up: {line or 'no answer'}")
        # userns: entering the holder's user namespace makes us its root (our uid maps to 0 there;
        # --preserve-credentials: setgroups is denied in it), whose capabilities the step needs
        # for its own network/pid namespaces; setpriv drops them before the program runs.
        into_userns = ["--user", "--preserve-credentials"] if mode.mode == "userns" else []
        yield proc.pid, ("nsenter", f"--target={proc.pid}", *into_userns, "--mount", "--wd", "--")
    finally:
        proc.stdin.close()  # EOF: the holder exits, and the namespace goes with its last process
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
        proc.stdout.close()


def _first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout_s):
            return f"no answer in {timeout_s}s"
    return proc.stdout.readline().decode(errors="replace").strip()


def wrap(argv: list[str], rlimits: RLimits, uid: int | None, space: RunSpace,
         mode: Isolation | None = None, cgroup_procs: str | None = None) -> list[str]:
    """The full command line of one step (compile or run): into the step's memory cgroup (its
    cgroup.procs, see evals/memory_cgroup.py), the run's private root, new network, pid and IPC
    namespaces with the IPC limits set, rlimits, then the unprivileged uid (uid mode) or no
    capabilities (userns mode). `mode` defaults to `isolation()`."""
    mode = mode or isolation()
    if mode.mode == "plain":
        rlimits = _plain_nproc(rlimits)
    limits = ["prlimit", *rlimits.prlimit_args(), "--"]
    is_private = bool(space.enter_argv)
    flags = (["-n"] if mode.is_network_isolated else []) + (PID_NS if mode.has_pid_namespace else []) \
        + (IPC_NS if mode.has_ipc_namespace else [])
    if is_private and mode.has_pid_namespace:
        flags.append("--mount-proc")  # a /proc of the run's pid namespace: no other process visible
    if mode.mode == "userns" and not is_private:
        flags = ["-r"] + flags  # else nsenter already put us in the holder's user namespace
    unshare = ["unshare", *flags, "--"] if flags else []
    if mode.mode == "uid":
        if uid is None:
            raise ValueError("uid mode runs untrusted programs under a sandbox uid")
        drop = _drop_privileges(uid)
    else:
        drop = DROP_CAPABILITIES if mode.mode == "userns" else []
    ipc_limits = _ipc_limits(rlimits.data_bytes) if mode.has_ipc_namespace and mode.has_ipc_limits else []
    join = memory_cgroup.join_argv(cgroup_procs) if cgroup_procs else []
    return [*join, *space.enter_argv, *unshare, *ipc_limits, *limits, *drop, *SH_WRAPPER, *argv]


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
    """Yield a uid no other run holds (uid mode), else None. Stale leftovers are killed first,
    and what the run leaves (processes, files, IPC objects) is removed after it."""
    if isolation().mode != "uid":
        with _new_sysv_objects_removed():
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
            if not isolation().has_private_root:  # a private root took all it wrote with it
                remove_files_of_uid(uid)
            remove_ipc_of_uid(uid)  # an IPC namespace took them with it; this is the net below
            if not isolation().has_ipc_namespace:
                remove_mqueues_of_uid(uid)
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


def sysv_objects(uid: int) -> set[tuple[str, int]]:
    """(kind, id) of the SysV objects `uid` owns or created, in our IPC namespace."""
    found = set()
    for kind in SYSV_KINDS:
        with contextlib.suppress(FileNotFoundError):
            header, *rows = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
            columns = header.split()
            for row in rows:
                fields = dict(zip(columns, row.split()))
                if uid in (int(fields["uid"]), int(fields["cuid"])):
                    found.add((kind, int(row.split()[1])))
    return found


def remove_ipc_of_uid(uid: int, keep: set[tuple[str, int]] = frozenset()) -> None:
    """IPC_RMID every SysV object of `uid` but those in `keep`: a segment still attached goes
    when its last user detaches (the run's processes are dead by now)."""
    libc = ctypes.CDLL(None, use_errno=True)
    remove = {"shm": lambda ident: libc.shmctl(ident, IPC_RMID, None),
              "sem": lambda ident: libc.semctl(ident, 0, IPC_RMID),
              "msg": lambda ident: libc.msgctl(ident, IPC_RMID, None)}
    for kind, ident in sysv_objects(uid) - set(keep):
        remove[kind](ident)  # fails only if it is gone already


def remove_mqueues_of_uid(uid: int) -> None:
    """POSIX message queues of `uid`: unlinked through an mqueue mount of our IPC namespace, the
    host's /dev/mqueue if mounted, else one of our own in a throwaway mount namespace."""
    if os.path.ismount("/dev/mqueue"):
        _delete_owned_by(uid, "/dev/mqueue")
        return
    with tempfile.TemporaryDirectory(prefix="codefast-mqueue-") as mount_point:
        subprocess.run(["unshare", "-m", "--propagation", "private", "--", "/bin/sh", "-c",
                        'mount -t mqueue none "$0" && find "$0" -mindepth 1 -maxdepth 1 -uid "$1" -delete',
                        mount_point, str(uid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _delete_owned_by(uid: int, directory: str) -> None:
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_uid == uid:
                os.unlink(entry.path)


@contextlib.contextmanager
def _new_sysv_objects_removed() -> Iterator[None]:
    """Without a per-run uid the run's SysV objects are the caller's: those made during the run
    are removed after it (a concurrent run's too; the caller itself makes none). With an IPC
    namespace there are none to remove."""
    if isolation().has_ipc_namespace:
        yield
        return
    before = sysv_objects(os.getuid())
    try:
        yield
    finally:
        remove_ipc_of_uid(os.getuid(), keep=before)
