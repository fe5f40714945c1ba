"""Per-language commands for the sandbox: where each toolchain is, how to build and run a program.

- python: an interpreter the sandbox uid can execute (ours may sit under a 0700 home, e.g. pyenv in
  /root), run isolated (-I: no user site, no PYTHON* env) and without writing .pyc files.
- javascript: node with lodash on NODE_PATH (every MBJSP test requires it).
- go: `go build` in GOPATH mode, CGO off, with a GOCACHE (~/.cache/codefast/go-build) that we
  warm once with the standard packages MBGP programs import (`go build` of them, trusted input)
  and that runs see read-only, so no run can plant an entry for the next one. A package that is
  not in it is compiled per run (slower, still correct).
- cpp: g++ -O0 -std=c++17, with a precompiled <bits/stdc++.h> (every MBCPP prompt includes it):
  built once into ~/.cache/codefast/cpp-pch, it spares each compile parsing the whole library.
- java: javac, then java -cp . Main (MBJP tests are `class Main`), the JVM capped (JVM_FLAGS).
- typescript: transpiled in the sandbox by the typescript package (TS_TRANSPILE), run by node;
  MBTSP prompts import mathjs and heap-js, so those are installed too.
- php, ruby: the interpreters (`php`, `ruby`), PHP's memory_limit under the run's memory.
- csharp: mcs, then mono; MBCSP's test helper library is stood in for (toolchain_files/).

A language is one row of TOOLCHAINS; scripts/setup_system.sh installs what its `tools` and
`node_modules` name.

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
# Where tools are looked up: golang-go keeps `go` in /usr/lib/go/bin when no symlink is made.
TOOL_PATH = BASE_PATH + ":/usr/lib/go/bin"
CPP_FLAGS = ("-O0", "-std=c++17")
# Standard packages compiled into the shared GOCACHE once (MBGP's prompts and tests import the
# first four; the rest are what completions commonly add).
WARM_GO_PACKAGES = ("encoding/json", "reflect", "sort", "math", "fmt", "strings", "strconv",
                    "unicode", "bytes", "errors", "regexp", "math/big", "container/heap", "os")


@dataclass(frozen=True)
class LanguageSpec:
    """What one run executes, as its language's Toolchain row builds it."""
    filename: str
    compile_argv: tuple[str, ...] | None  # None: interpreted
    run_argv: tuple[str, ...]
    as_headroom_mb: int  # address space reserved but never touched (see evals/sandbox.py)
    env: tuple[tuple[str, str], ...] = ()  # on top of `environment`, both steps
    extra_files: tuple[tuple[str, str], ...] = ()  # (name, text) written beside the program


@dataclass(frozen=True)
class Step:
    """What a row's argv builders see: the run's memory and where its tools and caches are."""
    memory_mb: int
    path_of: Callable[[str], str | None]

    @property
    def heap_mb(self) -> int:
        """A managed runtime's heap cap: under the memory limit, so running out of it ends in the
        runtime's own out-of-memory error (see sandbox.MEMORY_MARKERS) instead of a kill."""
        return max(16, self.memory_mb * 3 // 4)

    @staticmethod
    def tool(name: str) -> str:
        return find_tool(name) or name


@dataclass(frozen=True)
class Toolchain:
    """One row of TOOLCHAINS: everything the harness knows about a language."""
    filename: str  # the program's file in the run's work dir
    run: Callable[[Step], tuple[str, ...]]
    compile: Callable[[Step], tuple[str, ...]] | None = None  # run in the sandbox like the program
    tools: tuple[str, ...] = ()  # executables both steps use (see find_tool); missing: an `error`
    node_modules: tuple[str, ...] = ()  # packages that must be in one of NODE_MODULE_DIRS
    as_headroom_mb: int = 256
    env: Callable[[Step], dict[str, str]] = lambda step: {}
    extra_files: tuple[str, ...] = ()  # files of evals/toolchain_files/ put beside the program
    shared_dir: Callable[[], str | None] = lambda: None  # a host build cache, handed in read-only
    # MXEval's program is prompt + completion + test + this ({entry_point} filled in).
    program_suffix: str = ""


def find_tool(name: str) -> str | None:
    """Where an executable the sandbox uid can run is, looked up on TOOL_PATH (not the caller's
    PATH: the run only has BASE_PATH); python3 is special (see python_interpreter)."""
    if name == "python3":
        return python_interpreter()
    return shutil.which(name, path=TOOL_PATH)


def _go() -> str | None:
    return find_tool("go")


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


# A JVM reserves ~1 GiB of compressed class space and ~240 MiB of code cache at start; these
# caps (and the serial GC's few threads) let it run under the AS backstop. C1 only: MBJP programs
# are short, so a fast start beats peak speed.
JVM_FLAGS = ("-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:CompressedClassSpaceSize=64m",
             "-XX:ReservedCodeCacheSize=64m", "-XX:MaxMetaspaceSize=256m", "-Xss8m")
JVM_NON_HEAP_MB = 128  # what the JVM commits beside its heap (metaspace, code, CDS, stacks), rounded up
# TypeScript is transpiled, not type-checked: MXEval runs tsc's output whatever the type errors
# (MBTSP prompts import modules without their typings). Unlike MXEval, a syntax error is a compile
# error: tsc still emits code for it, and a function left open swallows the test, which then
# "passes" without running. ES5 is MXEval's target (`const` becomes `var`: MBTSP's canonical
# solutions that reassign a const pass only there).
TS_TARGET = "ES5"
TS_TRANSPILE = (
    "const ts = require('typescript'), fs = require('fs');"
    "const [source, target] = process.argv.slice(1);"
    "const out = ts.transpileModule(fs.readFileSync(source, 'utf8'), {fileName: source,"
    f" reportDiagnostics: true, compilerOptions: {{target: ts.ScriptTarget.{TS_TARGET},"
    " module: ts.ModuleKind.CommonJS}});"
    "const host = {getCanonicalFileName: f => f, getCurrentDirectory: () => '.', getNewLine: () => '\\n'};"
    "if (out.diagnostics.length) {"
    " process.stderr.write(ts.formatDiagnostics(out.diagnostics, host)); process.exit(1); }"
    "fs.writeFileSync(target, out.outputText);")
TOOLCHAIN_FILES = Path(__file__).resolve().parent / "toolchain_files"


def _java_run(step: Step) -> tuple[str, ...]:
    heap_mb = max(step.memory_mb // 2, step.memory_mb - JVM_NON_HEAP_MB)
    return (step.tool("java"), f"-Xmx{heap_mb}m", *JVM_FLAGS, "-cp", ".", "Main")


def _javac(step: Step) -> tuple[str, ...]:
    return (step.tool("javac"), *(f"-J{flag}" for flag in JVM_FLAGS), "-encoding", "UTF-8", "-nowarn", "Main.java")


def _cpp_compile(step: Step) -> tuple[str, ...]:
    pch = cpp_pch_dir()
    pch = step.path_of(pch) if pch else None
    include = ("-I", pch) if pch else ()
    return (step.tool("g++"), *CPP_FLAGS, *include, "-o", "main", "main.cpp")


# One row per language. Headroom: what the runtime reserves at start beyond what it touches.
TOOLCHAINS: dict[str, Toolchain] = {
    "python": Toolchain("main.py", lambda s: (s.tool("python3"), "-I", "-B", "main.py"), tools=("python3",),
                        program_suffix="\ncheck({entry_point})\n"),
    "javascript": Toolchain("main.js", lambda s: (s.tool("node"), "--v8-pool-size=1", "main.js"),
                            tools=("node",), node_modules=("lodash",), as_headroom_mb=2048),
    "go": Toolchain("main.go", lambda s: ("./main",), lambda s: (s.tool("go"), "build", "-o", "main", "main.go"),
                    tools=("go",), as_headroom_mb=2048, shared_dir=lambda: go_cache_dir()),
    "cpp": Toolchain("main.cpp", lambda s: ("./main",), _cpp_compile, tools=("g++",),
                     shared_dir=lambda: cpp_pch_dir()),
    "java": Toolchain("Main.java", _java_run, _javac, tools=("javac", "java"), as_headroom_mb=1024),
    "typescript": Toolchain("main.ts", lambda s: (s.tool("node"), "--v8-pool-size=1", "main.js"),
                            lambda s: (s.tool("node"), "--v8-pool-size=1", "-e", TS_TRANSPILE, "main.ts", "main.js"),
                            tools=("node",), node_modules=("typescript", "mathjs", "heap-js"), as_headroom_mb=2048),
    "php": Toolchain("main.php", lambda s: (s.tool("php"), "-d", f"memory_limit={s.heap_mb}M",
                                            "-d", "display_errors=stderr", "main.php"), tools=("php",)),
    "ruby": Toolchain("main.rb", lambda s: (s.tool("ruby"), "main.rb"), tools=("ruby",)),
    # Every MBCSP test compares with KellermanSoftware.CompareNetObjects (NuGet, not in Debian):
    # toolchain_files/CompareNetObjects.cs stands in for it (see there).
    "csharp": Toolchain("main.cs", lambda s: (s.tool("mono"), "main.exe"),
                        lambda s: (s.tool("mcs"), "-nologo", "-r:System.Numerics", "-out:main.exe", "main.cs",
                                   "CompareNetObjects.cs"),
                        tools=("mcs", "mono"), extra_files=("CompareNetObjects.cs",),
                        env=lambda s: {"MONO_GC_PARAMS": f"max-heap-size={s.heap_mb}m"}),
}
LANGUAGES = tuple(TOOLCHAINS)  # its own copy: the sandbox imports nothing of guard/


def toolchain(language: str) -> Toolchain:
    if language not in TOOLCHAINS:
        raise ValueError(f"unknown language {language!r}; choose from {LANGUAGES}")
    return TOOLCHAINS[language]


def shared_dirs(language: str) -> tuple[str, ...]:
    """Host folders a run of `language` reads (build caches), to hand it read-only."""
    return tuple(filter(None, [toolchain(language).shared_dir()]))


def language_spec(language: str, path_of: Callable[[str], str | None] = lambda path: path,
                  memory_mb: int = 1024) -> LanguageSpec:
    """`path_of` maps a host folder of `shared_dirs` to where the run sees it (None: it cannot)."""
    row, step = toolchain(language), Step(memory_mb, path_of)
    return LanguageSpec(row.filename, row.compile(step) if row.compile else None, row.run(step), row.as_headroom_mb,
                        tuple(row.env(step).items()),
                        tuple((name, (TOOLCHAIN_FILES / name).read_text()) for name in row.extra_files))


def toolchain_missing(language: str) -> str | None:
    """Why `language` cannot run here (None when it can): runs then end in an `error` that says
    so, never in a pass or fail; tests skip on it."""
    row = toolchain(language)
    for tool in row.tools:
        if find_tool(tool) is None:
            if tool == "python3":
                return "no python3 that an unprivileged sandbox uid can execute (set CODEFAST_SANDBOX_PYTHON)"
            return f"{tool} not found on {TOOL_PATH} (run scripts/setup_system.sh)"
    for module in row.node_modules:
        if not any(Path(d, module).is_dir() for d in NODE_MODULE_DIRS):
            return f"node module {module} not found in {NODE_MODULE_DIRS} (run scripts/setup_system.sh)"
    for name in row.extra_files:
        if not (TOOLCHAIN_FILES / name).is_file():
            return f"{TOOLCHAIN_FILES / name} missing (install the repository's evals/ whole)"
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
