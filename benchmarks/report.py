"""Every benchmark's report, under one header: when it ran, on what machine, at which commit and by
which command, so a figure can be traced back to the run that made it."""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REPORTS = REPO_ROOT / "reports"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def gpus() -> str:
    """The GPUs torch sees, or "none"."""
    try:
        import torch
    except ImportError:
        return "none"
    if not torch.cuda.is_available():
        return "none"
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def machine() -> str:
    return f"{platform.platform()}; {cpu_model()}, {os.cpu_count()} cores; GPU: {gpus()}"


def commit() -> str:
    """HEAD, with "+dirty" when the working tree differs from it (the run used code no commit holds)."""
    def git(*args: str) -> subprocess.CompletedProcess:
        # --no-optional-locks: reading the status must not write the index of a tree others edit
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO_ROOT, capture_output=True, text=True)

    try:
        head = git("rev-parse", "HEAD")
    except OSError:
        return "unknown (no git)"
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return head.stdout.strip() + ("+dirty" if git("status", "--porcelain").stdout.strip() else "")


def command_line(argv: Sequence[str]) -> str:
    """The command as typed: a benchmark run with `python -m` has its file as argv[0]."""
    first = Path(argv[0]) if argv else None
    if first is not None and first.suffix == ".py" and first.resolve().parent == REPO_ROOT / "benchmarks":
        return shlex.join(["python", "-m", f"benchmarks.{first.stem}", *argv[1:]])
    return shlex.join(argv)


def header(name: str, command: Sequence[str]) -> str:
    return "\n".join([f"# benchmarks.{name}", "",
                      f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
                      f"- machine: {machine()}",
                      f"- commit: {commit()}",
                      f"- command: `{command_line(command)}`", "", ""])


def write_report(name: str, body_markdown: str, command: Sequence[str] | None = None,
                 folder: Path | str | None = None) -> Path:
    """Writes `reports/<name>/report.md` (or `<folder>/report.md`, a benchmark's own `--out`): the
    header, then the body. Returns its path."""
    folder = Path(folder) if folder is not None else REPORTS / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.md"
    path.write_text(header(name, sys.argv if command is None else command) + body_markdown.rstrip("\n") + "\n")
    return path
