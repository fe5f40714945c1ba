"""Per-language commands for the sandbox: where each toolchain is, how to build and run a program.

- python: an interpreter the sandbox uid can execute (ours may sit under a 0700 home, e.g. pyenv in
  /root), run isolated (-I: no user site, no PYTHON* env) and without writing .pyc files.
- javascript: node with lodash on NODE_PATH (every MBJSP test requires it).
- go: `go build` in GOPATH mode, CGO off, with a GOCACHE (~/.cache/codefast/go-build) that we
  warm once with the standard packages MBGP programs import (`go build` of them, trusted input)
  and that runs see read-only, so no run can plant an entry for the next one. A package that is
  not in it is compiled per run (slower, still correct).
- cpp: g++ -O0 -std=c++17, with a precompiled <bits/stdc++.h> (every MBCPP prompt includes it):
  built once into ~/.cache/codefast/cpp-pch, it cuts a compile from ~0.75 s to ~0.2 s.

Compilers run in the sandbox like the program (they read whatever the source names), so the
caches they use are handed to a run read-only (`shared_dirs`), at a path of the run's own.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from evals import isolation
from evals.process import execute

MiB = 1 << 20
CACHE_DIR = Path(os.environ.get("CODEFAST_CACHE", Path.home() / ".cache" / "codefast"))
GO_CACHE_DIR = Path(os.environ.get("CODEFAST_GO_CACHE", CACHE_DIR / "go-build"))
# Debian's node-lodash, then npm's global roots.
NODE_MODULE_DIRS = tuple(p for p in (os.environ.get("CODEFAST_NODE_PATH"), "/usr/share/nodejs",
                                     "/usr/lib/node_modules", "/usr/local/lib/node_modules") if p)
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
CPP_FLAGS = ("-O0", "-std=c++17")
LANGUAGES = ("python", "javascript", "go", "cpp")  # its own copy: the sandbox imports nothing of guard/
# Standard packages compiled into the shared GOCACHE once (MBGP's prompts and tests import the
# first four; the rest are what completions commonly add).
WARM_GO_PACKAGES = ("encoding/json", "reflect", "sort", "math", "fmt", "strings", "strconv",
                    "unicode", "bytes", "errors", "regexp", "math/big", "container/heap", "os")


@dataclass(frozen=True)
class LanguageSpec:
    filename: str
    compile_argv: tuple[str, ...] | None  # None: interpreted
    run_argv: tuple[str, ...]
    as_headroom_mb: int  # address space reserved but never touched (see evals/sandbox.py)


def _go() -> str | None:
    return shutil.which("go") or ("/usr/lib/go/bin/go" if os.access("/usr/lib/go/bin/go", os.X_OK) else None)


def _runs_sandboxed(argv: list[str]) -> bool:
    with isolation.sandbox_uid() as uid, isolation.run_space(uid, 16 * MiB) as space:
        rlimits = isolation.RLimits(10, 256 * MiB, None, MiB, 64)
        outcome = execute(isolation.wrap(argv, rlimits, uid, space), space.popen_cwd, {"PATH": BASE_PATH},
                          10.0, MiB, kill=lambda pid: isolation.kill_run(pid, uid))
        return outcome.returncode == 0


@lru_cache(maxsize=None)
def python_interpreter() -> str | None:
    candidates = [os.environ.get("CODEFAST_SANDBOX_PYTHON"), sys.executable, "/usr/bin/python3",
                  "/usr/local/bin/python3"]
    for path in dict.fromkeys(filter(None, candidates)):
        if os.access(path, os.X_OK) and _runs_sandboxed([path, "-c", "pass"]):
            return path
    return None


@lru_cache(maxsize=None)
def cpp_pch_dir() -> str | None:
    """A directory holding bits/stdc++.h.gch for CPP_FLAGS, built once (flock'd) per g++ version.
    Passed as -I, so GCC finds the .gch before the real header; None (no speedup) if it fails."""
    try:
        version = subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout
        deps = subprocess.run(["g++", *CPP_FLAGS, "-M", "-x", "c++", "-"], input="#include <bits/stdc++.h>\n",
                              capture_output=True, text=True, check=True).stdout
        header = next(d for d in deps.split(":", 1)[1].split() if d.endswith("bits/stdc++.h"))
    except (OSError, subprocess.CalledProcessError, IndexError, StopIteration):
        return None
    key = hashlib.sha256((version + " ".join(CPP_FLAGS) + header).encode()).hexdigest()[:16]
    pch_dir = CACHE_DIR / "cpp-pch" / key
    target = pch_dir / "bits" / "stdc++.h.gch"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(pch_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = target.with_suffix(".partial")
            built = subprocess.run(["g++", *CPP_FLAGS, "-x", "c++-header", header, "-o", str(partial)],
                                   capture_output=True, timeout=300)
            if built.returncode != 0:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                return None
            partial.rename(target)
    return str(pch_dir)


def _go_environment(directory: str, go_cache: str) -> dict[str, str]:
    """GOPATH mode, no cgo: `go build` reads only the standard library and its cache."""
    return {"GOCACHE": go_cache, "GO111MODULE": "off", "CGO_ENABLED": "0", "GOTOOLCHAIN": "local",
            "GOPATH": os.path.join(directory, "gopath"), "GOFLAGS": ""}


@lru_cache(maxsize=None)
def go_cache_dir() -> str | None:
    """GO_CACHE_DIR with WARM_GO_PACKAGES compiled in, once (flock'd) per go version; None if
    that fails (runs then compile the standard packages they use themselves)."""
    go = _go()
    if go is None:
        return None
    try:
        version = subprocess.run([go, "version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    key = hashlib.sha256((version + " ".join(WARM_GO_PACKAGES)).encode()).hexdigest()[:16]
    GO_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    marker = GO_CACHE_DIR / f"warmed-{key}"
    with open(GO_CACHE_DIR.parent / "go-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            with tempfile.TemporaryDirectory(prefix="codefast-go-warm-") as directory:
                env = {"PATH": BASE_PATH, "HOME": directory, "TMPDIR": directory,
                       **_go_environment(directory, str(GO_CACHE_DIR))}
                built = subprocess.run([go, "build", *WARM_GO_PACKAGES], env=env, cwd=directory,
                                       capture_output=True, timeout=600)
            if built.returncode != 0:
                return None
            marker.touch()
    return str(GO_CACHE_DIR)


def shared_dirs(language: str) -> tuple[str, ...]:
    """Host folders a run of `language` reads (build caches), to hand it read-only."""
    if language == "cpp":
        return tuple(filter(None, [cpp_pch_dir()]))
    if language == "go":
        return tuple(filter(None, [go_cache_dir()]))
    return ()


def language_spec(language: str, path_of: Callable[[str], str | None] = lambda path: path) -> LanguageSpec:
    """`path_of` maps a host folder of `shared_dirs` to where the run sees it (None: it cannot)."""
    if language == "python":
        return LanguageSpec("main.py", None, (python_interpreter() or "python3", "-I", "-B", "main.py"), 256)
    if language == "javascript":
        return LanguageSpec("main.js", None, (shutil.which("node") or "node", "--v8-pool-size=1", "main.js"), 2048)
    if language == "go":
        return LanguageSpec("main.go", (_go() or "go", "build", "-o", "main", "main.go"), ("./main",), 2048)
    if language == "cpp":
        pch = cpp_pch_dir()
        pch = path_of(pch) if pch else None
        include = ("-I", pch) if pch else ()
        return LanguageSpec("main.cpp", ("g++", *CPP_FLAGS, *include, "-o", "main", "main.cpp"), ("./main",), 256)
    raise ValueError(f"unknown language {language!r}; choose from {LANGUAGES}")


def toolchain_missing(language: str) -> str | None:
    """Why `language` cannot run here (None when it can); tests skip on this."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose from {LANGUAGES}")
    if language == "python" and python_interpreter() is None:
        return "no python3 that an unprivileged sandbox uid can execute (set CODEFAST_SANDBOX_PYTHON)"
    if language == "javascript":
        if shutil.which("node") is None:
            return "node not found (run scripts/setup_system.sh)"
        if not any(Path(d, "lodash").is_dir() for d in NODE_MODULE_DIRS):
            return f"lodash not found in {NODE_MODULE_DIRS} (run scripts/setup_system.sh)"
    if language == "go" and _go() is None:
        return "go not found (run scripts/setup_system.sh)"
    if language == "cpp" and shutil.which("g++") is None:
        return "g++ not found (run scripts/setup_system.sh)"
    return None


def environment(space: isolation.RunSpace, memory_mb: int, is_compile: bool) -> dict[str, str]:
    """A minimal environment: nothing of the caller's leaks into the program."""
    directory = space.dir
    env = {"PATH": BASE_PATH, "HOME": directory, "TMPDIR": directory, "LANG": "C.UTF-8",
           "GOMAXPROCS": "2", "NODE_PATH": ":".join(NODE_MODULE_DIRS),
           # V8 then fails with a clean "heap out of memory" before RLIMIT_DATA bites.
           "NODE_OPTIONS": f"--max-old-space-size={max(16, memory_mb * 3 // 4)}"}
    if is_compile:
        # The shared cache is read-only in the run (go then skips writing its entries); without
        # one, a cache of the run's own, which goes with the run.
        shared = go_cache_dir()
        go_cache = (space.path_of(shared) if shared else None) or os.path.join(directory, ".gocache")
        env.update(_go_environment(directory, go_cache))
    return env
