"""The holder of one sandbox run's private root: run as a script, in a fresh mount namespace.

    unshare -m --propagation private -- python -I private_root.py SIZE_BYTES MAX_INODES OWNER_UID [HOST_DIR ...]

(`evals.isolation.run_space` starts it; as root in uid mode, as the fake root of a new user
namespace in userns mode.) In its own mount namespace, which nothing outside sees, it

1. makes every mount it inherited read-only, recursively (mount_setattr, AT_RECURSIVE): the run
   can write nowhere on the host, not even in world-writable directories;
2. mounts one tmpfs of SIZE_BYTES (and at most MAX_INODES files) on /tmp, with the work dir
   /tmp/work (owned by OWNER_UID, -1: leave it to us), and binds /dev/shm and /var/tmp to
   directories of that same tmpfs: everything the run writes (sources, build output, temp files,
   shared memory) counts against one limit, and the kernel answers ENOSPC beyond it;
3. covers the host's /dev/mqueue, where mounted, with an empty read-only folder: that mount shows
   the host's POSIX message queues, which the run could otherwise read through it (the run's own
   queues live in its IPC namespace, reached by mq_open without any mount);
4. binds each HOST_DIR read-only at /tmp/.shared/<index> (toolchain caches the build only reads:
   the C++ precompiled header, Go's build cache, which may sit under a home the run cannot
   traverse);
5. moves into the work dir (where `nsenter --wd` starts each step), prints "ready" and waits
   for EOF on stdin.

Every step of the run (compile, then the program) enters this namespace. When the holder exits
(its caller closed stdin, or died and so closed it), the namespace and the tmpfs vanish with the
last process in it: nothing is left behind, even if the caller is SIGKILLed. Standard library only.
"""
import ctypes
import os
import sys

WORK_DIR = "/tmp/work"
SHARED_DIR = "/tmp/.shared"
MQUEUE_DIR = "/dev/mqueue"
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (asm-generic table)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 0x1, 0x2, 0x4, 0x20, 0x1000
ST_RDONLY = 0x1

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = (lambda s: None if s is None else s.encode())
    _check(libc.mount(encode(source), encode(target), encode(fstype), flags, encode(data)), f"mount {target}")


def make_everything_read_only() -> None:
    attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                        ctypes.sizeof(attr)), "mount_setattr(/, AT_RECURSIVE, RDONLY)")
    if not os.statvfs("/").f_flag & ST_RDONLY:
        raise OSError("/ is still writable after mount_setattr")


def bind(source: str, target: str, is_read_only: bool) -> None:
    mount(source, target, None, MS_BIND)
    if is_read_only:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def main(size_bytes: int, max_inodes: int, owner_uid: int, host_dirs: list[str]) -> None:
    # Opened before /tmp is covered: a host dir may itself live under the host's /tmp.
    host_fds = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in host_dirs]
    make_everything_read_only()
    mount("codefast-sandbox", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          f"size={size_bytes},nr_inodes={max_inodes},mode=1777")
    os.mkdir(WORK_DIR, 0o700)
    if owner_uid >= 0:
        os.chown(WORK_DIR, owner_uid, owner_uid)
    for host_path, private in (("/dev/shm", "/tmp/.shm"), ("/var/tmp", "/tmp/.var-tmp")):
        if os.path.isdir(host_path):
            os.mkdir(private)
            os.chmod(private, 0o1777)  # mkdir's mode is filtered by the umask
            bind(private, host_path, is_read_only=False)
    if os.path.ismount(MQUEUE_DIR):
        os.mkdir("/tmp/.mqueue", 0o555)
        bind("/tmp/.mqueue", MQUEUE_DIR, is_read_only=True)
    if host_fds:
        os.mkdir(SHARED_DIR, 0o755)
    for index, fd in enumerate(host_fds):
        target = f"{SHARED_DIR}/{index}"
        os.mkdir(target, 0o755)
        bind(f"/proc/self/fd/{fd}", target, is_read_only=True)
        os.close(fd)
    os.chdir(WORK_DIR)  # `nsenter --wd` starts every step here
    print("ready", flush=True)
    sys.stdin.read()  # EOF: the caller is done with this run (or gone)


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    except Exception as exc:  # the caller reads this line and falls back or fails the run
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
