"""The stop-word heuristic that evaluation harnesses use, per language (the baseline to beat).

Lists follow the usual HumanEval / MXEval / MultiPL-E practice: stop when a new top-level unit
starts. C++ stops at a top-level closing brace `\n}`; since that brace ends the function itself,
it is put back after truncation (as MultiPL-E does).
"""
from __future__ import annotations

STOP_WORDS: dict[str, tuple[str, ...]] = {
    "python": ("\ndef ", "\nclass ", "\nif ", "\nprint", "\n#", "\nassert", "\n```"),
    "javascript": ("\nfunction", "\n/*", "\n//", "\nconsole.log", "\nmodule.exports", "\n```"),
    "go": ("\nfunc", "\n// ", "\ntype ", "\n```"),
    "cpp": ("\n}",),
}
RESTORE_AFTER_STOP: dict[str, str] = {"cpp": "\n}\n"}


def finish_completion(language: str, completion: str, stopped_by_word: bool) -> str:
    """Text to execute after a stop-word stop (puts back the closing brace the stop removed)."""
    if stopped_by_word:
        return completion + RESTORE_AFTER_STOP.get(language, "")
    return completion
