"""MBXP problems in nine languages, CC BY 4.0 (C# is for measuring only: never train or choose on it).

Data: Athiwaratkun et al., "Multi-lingual Evaluation of Code Generation Models", ICLR 2023.
Read from the repository's `data/mbxp/` (its README and LICENSE keep the attribution), or from
`$CODEFAST_MBXP_DIR` when set. The test split is
the last 500 records of each file, as the CodeFast paper held them out; the rest is train.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from evals.toolchains import toolchain

FILES = {"python": "mbpp_release_v1.jsonl", "javascript": "mbjsp_release_v1.2.jsonl",
         "go": "mbgp_release_v1.1.jsonl", "cpp": "mbcpp_release_v1.2.jsonl",
         "java": "mbjp_release_v1.2.jsonl", "typescript": "mbtsp_release_v1.2.jsonl",
         "php": "mbphp_release_v1.2.jsonl", "ruby": "mbrbp_release_v1.2.jsonl",
         "csharp": "mbcsp_release_v1.2.jsonl"}
NUM_TEST = 500
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "mbxp"


@dataclass(frozen=True)
class Problem:
    task_id: str
    language: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str | None = None  # None for every MBGP record, 75 MBCPP and 28 MBJSP ones


def data_dir() -> Path:
    return Path(os.environ.get("CODEFAST_MBXP_DIR", DEFAULT_DATA_DIR))


@lru_cache(maxsize=None)
def _load(language: str) -> tuple[Problem, ...]:
    if language not in FILES:
        raise ValueError(f"unknown language {language!r}; choose from {sorted(FILES)}")
    path = data_dir() / FILES[language]
    if not path.is_file():
        raise FileNotFoundError(f"MBXP file {path} not found; set CODEFAST_MBXP_DIR")
    with path.open() as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple(Problem(r["task_id"], language, r["prompt"], r["entry_point"], r["test"],
                         r.get("canonical_solution")) for r in rows)


def load_problems(language: str) -> list[Problem]:
    return list(_load(language))


def split_problems(problems: list[Problem], split: str = "test") -> list[Problem]:
    if split not in ("test", "train"):
        raise ValueError(f"split must be 'test' or 'train', got {split!r}")
    return problems[-NUM_TEST:] if split == "test" else problems[:-NUM_TEST]


def build_program(problem: Problem, completion: str) -> str:
    """The program to execute, as MXEval builds it: prompt + completion + test, then the language's
    `program_suffix` (evals/toolchains.py). MBPP tests only define `check(candidate)`, so for
    Python MXEval appends the call; the other languages' tests are a main program (JS and TS
    top-level asserts, Go `func main`, C++ `int main`, Java `class Main`, C# `Main` inside the
    prompt's class, PHP and Ruby top-level code)."""
    suffix = toolchain(problem.language).program_suffix.format(entry_point=problem.entry_point)
    return problem.prompt + completion + problem.test + suffix
