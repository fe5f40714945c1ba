"""The stop-word heuristic that evaluation harnesses use, per language (the baseline to beat).

Lists follow the usual HumanEval / MXEval / MultiPL-E practice: stop when a new top-level unit
starts. C++ stops at a top-level closing brace `\n}`; since that brace ends the function itself,
it is put back after truncation (as MultiPL-E does). MBXP's prompts differ from MultiPL-E's where
the function sits inside a class, so the same rule is applied at MBXP's nesting:
- java: MBJP's method is in a class the completion must close, so `\n}` ends the class (as C++).
- csharp: MBCSP's test is `Main` inside the prompt's class, so the completion ends at the method's
  closing brace, MultiPL-E's `\n    }\n` at MBCSP's eight-space indent; put back too.
- ruby: MultiPL-E's list without its blank-line stop: MBRBP's own solutions put a blank line
  before `end`, which that stop would cut.
- typescript: MultiPL-E's list plus what the JavaScript list adds; `\nexport` is TS's
  `module.exports`.
"""
from __future__ import annotations

STOP_WORDS: dict[str, tuple[str, ...]] = {
    "python": ("\ndef ", "\nclass ", "\nif ", "\nprint", "\n#", "\nassert", "\n```"),
    "javascript": ("\nfunction", "\n/*", "\n//", "\nconsole.log", "\nmodule.exports", "\n```"),
    "go": ("\nfunc", "\n// ", "\ntype ", "\n```"),
    "cpp": ("\n}",),
    "java": ("\n}",),
    "typescript": ("\nfunction", "\n/*", "\n//", "\nclass", "\nconsole.log", "\nexport", "\n```"),
    "php": ("\nfunction", "\n?>", "\n//", "\n#", "\n```"),
    "ruby": ("\nclass", "\ndef", "\n#", "\n```"),
    "csharp": ("\n        }\n",),
}
RESTORE_AFTER_STOP: dict[str, str] = {"cpp": "\n}\n", "java": "\n}\n", "csharp": "\n        }\n"}


def finish_completion(language: str, completion: str, stopped_by_word: bool) -> str:
    """Text to execute after a stop-word stop (puts back the closing brace the stop removed)."""
    if stopped_by_word:
        return completion + RESTORE_AFTER_STOP.get(language, "")
    return completion
