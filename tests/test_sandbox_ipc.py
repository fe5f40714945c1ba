"""Probes for shared memory and IPC: what a run leaves behind, what it can reach, what it can hold.

A run must leave no SysV object (shared memory, semaphores, message queues) and no POSIX queue
behind for the host or the next run to read; it must not reach a Unix socket the host listens on
in the abstract namespace; and memory it holds outside its heap (memfd, /dev/shm, SysV) counts
against its memory limit. Each guarantee holds only in some isolation modes (evals/isolation.py);
a check skips with the reason where this machine cannot give it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import socket
import subprocess
import uuid

import pytest

from evals import isolation, memory_cgroup
from evals.sandbox import Job, Limits, run_many, run_program
from evals.toolchains import toolchain_missing

KiB, MiB = 1 << 10, 1 << 20
LIMITS = Limits(timeout_s=8, cpu_s=4, memory_mb=128, max_output_bytes=64 * KiB, max_file_bytes=1 * MiB,
                max_processes=32, max_open_files=64, max_disk_mb=16)
# Room for everything the probes hold beside memory, so the disk limit is never what stops them.
ROOMY_DISK = dataclasses.replace(LIMITS, max_disk_mb=512)
HOLD_MB = 320  # well over LIMITS.memory_mb, under its address-space cap (memory + python's headroom)
SECRET = f"codefast-ipc-secret-{uuid.uuid4().hex}"
KEY = 0x5C000000 | (uuid.uuid4().int & 0xFFFFFF)  # SysV key of this test session
NAME = f"codefast-ipc-{uuid.uuid4().hex[:12]}"  # POSIX queue, semaphore and /dev/shm file
IPC_CREAT, IPC_NOWAIT, IPC_RMID = 0o1000, 0o4000, 0
O_RDONLY, O_RDWR, O_CREAT, O_NONBLOCK = 0, 2, 0o100, 0o4000

# Shared by the probes: libc's IPC calls through ctypes (the sandbox's python has no other way).
PRELUDE = f"""
import ctypes, json, mmap, os
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.sem_open.restype = ctypes.c_void_p
KEY, NAME, SECRET = {KEY}, {NAME!r}, {SECRET!r}
class Msg(ctypes.Structure):
    _fields_ = [("mtype", ctypes.c_long), ("mtext", ctypes.c_char * 128)]
"""
LEAVE_BEHIND = PRELUDE + f"""
left = {{}}
shm = libc.shmget(KEY, 1 << 20, {IPC_CREAT} | 0o666)
if shm >= 0:
    ctypes.memmove(libc.shmat(shm, None, 0), SECRET.encode(), len(SECRET))
left["sysv_shm"] = shm >= 0
left["sysv_sem"] = libc.semget(KEY, 1, {IPC_CREAT} | 0o666) >= 0
queue = libc.msgget(KEY, {IPC_CREAT} | 0o666)
msg = Msg(1, SECRET.encode())
left["sysv_msg"] = queue >= 0 and libc.msgsnd(queue, ctypes.byref(msg), len(SECRET), 0) == 0
mq = libc.mq_open(("/" + NAME).encode(), {O_CREAT | O_RDWR}, 0o666, None)
left["posix_mq"] = mq >= 0 and libc.mq_send(mq, SECRET.encode(), len(SECRET), 0) == 0
left["posix_sem"] = libc.sem_open(("/" + NAME).encode(), {O_CREAT}, 0o666, 1) not in (None, 0)
with open("/dev/shm/" + NAME, "w") as f:
    f.write(SECRET)
print(json.dumps(left))
"""
READ_LEFTOVERS = PRELUDE + f"""
found = {{}}
shm = libc.shmget(KEY, 0, 0)
found["sysv_shm"] = shm >= 0 and ctypes.string_at(libc.shmat(shm, None, 0), len(SECRET)).decode()
found["sysv_sem"] = libc.semget(KEY, 0, 0) >= 0
queue, msg = libc.msgget(KEY, 0), Msg()
found["sysv_msg"] = queue >= 0 and libc.msgrcv(queue, ctypes.byref(msg), 128, 0, {IPC_NOWAIT}) > 0 \\
    and msg.mtext.decode()
mq, text = libc.mq_open(("/" + NAME).encode(), {O_RDONLY | O_NONBLOCK}), ctypes.create_string_buffer(8192)
found["posix_mq"] = mq >= 0 and libc.mq_receive(mq, text, 8192, None) > 0 and text.value.decode()
found["posix_sem"] = libc.sem_open(("/" + NAME).encode(), 0) not in (None, 0)
found["dev_shm"] = os.path.exists("/dev/shm/" + NAME)
print(json.dumps(found))
"""
# 1 MiB files (the per-file cap), mapped shared, written, their fds closed: only the mappings
# keep them (libc's mmap: Python's mmap module keeps a duplicate fd open).
MEMFD = PRELUDE + f"""
libc.mmap.restype = ctypes.c_void_p
held = 0
while held < {HOLD_MB}:
    fd = os.memfd_create("hold")
    os.ftruncate(fd, 1 << 20)
    address = libc.mmap(None, 1 << 20, 3, 1, fd, 0)  # PROT_READ | PROT_WRITE, MAP_SHARED
    os.close(fd)
    ctypes.memset(address, 1, 1 << 20)
    held += 1
    print(held, flush=True)
"""
DEV_SHM = f"""
held = 0
while held < {HOLD_MB}:
    with open(f"/dev/shm/hold{{held}}", "wb") as f:
        f.write(b"x" * (1 << 20))
    held += 1
    print(held, flush=True)
"""
# The program: segments made, filled, detached, never removed; nothing of them is mapped.
SYSV_SHM = PRELUDE + f"""
held = 0
while held < {HOLD_MB}:
    shm = libc.shmget({KEY + 1} + held, 32 << 20, {IPC_CREAT} | 0o600)
    if shm < 0:
        print("refused", ctypes.get_errno(), flush=True)
        raise SystemExit(3)
    address = libc.shmat(shm, None, 0)
    ctypes.memset(address, 1, 32 << 20)
    libc.shmdt(ctypes.c_void_p(address))
    held += 32
    print(held, flush=True)
"""
HOLDERS = {"memfd": MEMFD, "dev_shm": DEV_SHM, "sysv_shm": SYSV_SHM}


def require_python() -> None:
    reason = toolchain_missing("python")
    if reason:
        pytest.skip(f"python toolchain missing: {reason}")


def host_sysv_keys() -> set[int]:
    keys = set()
    for kind in ("shm", "sem", "msg"):
        with open(f"/proc/sysvipc/{kind}") as table:
            keys.update(int(line.split()[0]) for line in list(table)[1:])
    return keys


def host_mq_exists(name: str) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    mq = libc.mq_open(f"/{name}".encode(), O_RDONLY)
    if mq >= 0:
        os.close(mq)
    return mq >= 0


def remove_host_leftovers() -> None:
    """The runs' leftovers, removed from the host whatever the verdict (before the fix there are)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for flag, find in (("-m", lambda key: libc.shmget(key, 0, 0)), ("-s", lambda key: libc.semget(key, 0, 0)),
                       ("-q", lambda key: libc.msgget(key, 0))):
        for key in range(KEY, KEY + 1 + HOLD_MB):
            ident = find(key)
            if ident >= 0:
                subprocess.run(["ipcrm", flag, str(ident)], capture_output=True)
    libc.mq_unlink(f"/{NAME}".encode())


@pytest.fixture(scope="module", autouse=True)
def private_uids():
    """A uid range of our own (see tests/test_sandbox.py), and nothing left on the host after."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(isolation, "UID_BASE", 62000 + (os.getpid() % 8) * isolation.NUM_UIDS)
        yield
    remove_host_leftovers()


def leave_then_read(limits: Limits = LIMITS) -> tuple[dict, dict]:
    """One run leaves every kind of IPC object holding a secret; the next looks for them."""
    left = run_program("python", LEAVE_BEHIND, limits)
    assert left.status == "passed", left.stderr[-1000:]
    assert KEY not in host_sysv_keys() and not host_mq_exists(NAME)  # nothing on the host ...
    found = run_program("python", READ_LEFTOVERS, limits)
    assert found.status == "passed", found.stderr[-1000:]
    return json.loads(left.stdout), json.loads(found.stdout)


def test_ipc_objects_of_a_run_die_with_it():
    require_python()
    if isolation.isolation().mode == "plain":
        pytest.skip(f"plain mode shares the caller's uid and IPC namespace: {isolation.isolation().reason}")
    left, found = leave_then_read()
    assert all(left.values()), left  # the run could make each of them ...
    assert not any(found.values()), found  # ... and the next run finds none (nor its secret)


def test_without_an_ipc_namespace_the_uids_objects_are_removed(monkeypatch):
    """uid mode where `unshare -i` is refused: the sweep after the run, not the namespace."""
    require_python()
    if isolation.isolation().mode != "uid":
        pytest.skip(f"needs root for a per-run uid: {isolation.isolation().reason}")
    weaker = dataclasses.replace(isolation.isolation(), has_ipc_namespace=False, has_ipc_limits=False)
    monkeypatch.setattr(isolation, "isolation", lambda: weaker)
    left, found = leave_then_read()
    assert left["sysv_shm"] and left["posix_mq"]
    assert not found["sysv_shm"] and not found["sysv_msg"] and not found["posix_mq"], found


def test_sweep_removes_sysv_objects_of_a_uid_and_keeps_others():
    if isolation.isolation().mode != "uid":
        pytest.skip(f"needs root to act as another uid: {isolation.isolation().reason}")
    uid = isolation.UID_BASE + isolation.NUM_UIDS - 1
    make = PRELUDE + f"libc.shmget(KEY, 4096, {IPC_CREAT} | 0o600); libc.semget(KEY, 1, {IPC_CREAT} | 0o600)\n" \
                     f"libc.msgget(KEY, {IPC_CREAT} | 0o600)\n"
    libc = ctypes.CDLL(None, use_errno=True)
    ours = libc.shmget(KEY + 1, 4096, IPC_CREAT | 0o600)  # root's, not the uid's: it stays
    try:
        subprocess.run(isolation._drop_privileges(uid) + ["/usr/bin/python3", "-c", make], check=True)
        assert KEY in host_sysv_keys()
        isolation.remove_ipc_of_uid(uid)
        assert KEY not in host_sysv_keys() and KEY + 1 in host_sysv_keys()
    finally:
        libc.shmctl(ours, IPC_RMID, None)


@pytest.fixture(scope="module")
def holders():
    require_python()
    names = list(HOLDERS)
    return dict(zip(names, run_many([Job("python", HOLDERS[n], ROOMY_DISK) for n in names], num_workers=2)))


@pytest.mark.parametrize("name", list(HOLDERS))
def test_shared_memory_counts_against_the_memory_limit(holders, name):
    why_not = memory_cgroup.problem()
    if why_not:
        pytest.skip(f"no memory cgroup here, so only RLIMIT_AS and per-file caps bound it: {why_not}")
    result = holders[name]
    last = (result.stdout.split() or ["0"])[-1]
    assert result.status == "memory", (result.status, last, result.stderr[-500:])
    assert int(last) <= LIMITS.memory_mb, result.stdout[-200:]


def test_sysv_shm_is_bounded_even_without_a_memory_cgroup(monkeypatch):
    """The IPC namespace's shmall is the step's memory limit: segments stop there, cgroup or not."""
    require_python()
    if not isolation.isolation().has_ipc_limits:
        pytest.skip(f"the run's IPC namespace limits cannot be set here: {isolation.isolation().reason}")
    monkeypatch.setattr(memory_cgroup, "hierarchy", lambda: None)
    result = run_program("python", SYSV_SHM, ROOMY_DISK)
    *held, refused = result.stdout.splitlines()
    assert refused == "refused 28", result.stdout[-200:]  # ENOSPC: shmall reached
    assert int(held[-1]) <= LIMITS.memory_mb and result.status == "failed"


def test_an_abstract_unix_socket_of_the_host_is_unreachable():
    require_python()
    if not isolation.isolation().is_network_isolated:
        pytest.skip("abstract sockets live in the network namespace, and there is none:"
                    f" {isolation.isolation().reason}")
    address = f"\0{NAME}-listener"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(address)
        listener.listen()
        listener.settimeout(0.5)
        program = (f"import socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect({address!r})\n"
                   "    print('connected')\nexcept OSError as e:\n    print(e.errno)\n")
        result = run_program("python", program, LIMITS)
        assert result.stdout.strip() == "111", result  # ECONNREFUSED: no such name where it runs
        with pytest.raises(socket.timeout):
            listener.accept()


def test_dev_mqueue_shows_no_queue_of_the_host():
    """Where the host mounts /dev/mqueue (containers usually do), its queues must not show there."""
    require_python()
    if not isolation.isolation().has_private_root:
        pytest.skip(f"no private root here: {isolation.isolation().reason}")
    mounted_here = not os.path.ismount("/dev/mqueue")
    if mounted_here:  # containers usually mount it; where the host does not, mount it as they do
        os.makedirs("/dev/mqueue", exist_ok=True)
        subprocess.run(["mount", "-t", "mqueue", "mqueue", "/dev/mqueue"], check=True)
    libc = ctypes.CDLL(None, use_errno=True)
    host_queue = f"/{NAME}-host"
    mq = libc.mq_open(host_queue.encode(), O_CREAT | O_RDWR, 0o644, None)
    assert mq >= 0 and libc.mq_send(mq, SECRET.encode(), len(SECRET), 0) == 0
    try:
        program = ("import os\nprint(os.listdir('/dev/mqueue'))\ntry:\n"
                   f"    print(open('/dev/mqueue{host_queue}').read())\nexcept OSError as e:\n    print(e.errno)\n")
        result = run_program("python", program, LIMITS)
        assert result.stdout.splitlines() == ["[]", "2"], result  # ENOENT
    finally:
        os.close(mq)
        libc.mq_unlink(host_queue.encode())
        if mounted_here:
            subprocess.run(["umount", "/dev/mqueue"], check=True)


def test_plain_mode_removes_the_sysv_objects_a_run_made(monkeypatch):
    """No uid, no namespaces: what is new after the run and the caller's goes."""
    require_python()
    if os.geteuid() != 0:
        pytest.skip("as root, the plain fallback can be forced here without harm to other users")
    plain = isolation.Isolation("plain", False, False, "forced by the test")
    monkeypatch.setattr(isolation, "isolation", lambda: plain)
    monkeypatch.setattr(memory_cgroup, "hierarchy", lambda: None)
    result = run_program("python", LEAVE_BEHIND, LIMITS)
    assert result.status == "passed" and json.loads(result.stdout)["sysv_shm"], result
    assert KEY not in host_sysv_keys()
