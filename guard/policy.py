"""GenGuard stop rules as pure functions over a small immutable vote state.

The guard emits, for every generated token, the probability that the code now being written is
excess (p_stop). A policy turns that stream of probabilities into one decision: stop or go on.

- line voting (the default): every token of the current line casts a vote (stop when
  p_stop >= threshold). When the line ends (a token whose text contains a newline), the sequence
  stops if a strict majority of that line's votes say stop; a tie continues.
- line-start rule (with line voting): the first token of a line that is not only whitespace
  decides alone when the guard is sure either way (indentation says little: the guard can be
  unsure on the indentation before a nested `}` and sure on the brace itself). Excess code
  starts a new top-level unit (`def check`, `# Test`, `print(`, `int main`, prose), and the
  guard is surest on that unit's first token: p_stop >= `line_start_threshold` stops at once,
  since waiting for the line's end would decode the whole first excess line for nothing (the
  stop-word heuristic stops on that same token, `\ndef`). Some first tokens cannot know yet
  (`func` may start a helper or the test driver; ` main` settles it), so the stop looks at the
  mean p_stop of the line's code tokens so far while there are at most `line_start_window` of
  them. A sure continue on the first code token, p_stop <= `line_keep_threshold` (`return` in
  the function body), keeps the line whatever its other tokens vote: prose inside a string
  literal (`return "All tuples have same length";`) looks like excess token by token. `None`
  disables either side (the plain end-of-line vote).
- done rule (guards with a done head, both policies): at a line end that the votes keep, a
  p_done >= `done_threshold` from the hidden state that produced the line's last token stops
  the sequence after that line, keeping it (the function's closing `}`, its last `return`). It
  saves the decode step the stop head needs to see the first excess token.
  With `done_needs_blank_line` the line end must also open a blank line (its token holds a
  second newline). Models whose tokenizer merges newlines (Qwen: `}\n\n`, `)\n\n`) end a
  finished unit that way, so every done line end of the held-out completions opens one, while a
  body line that only looks final (`print(sum)` before the `return`) ends in a single newline:
  without a closing bracket a Python line end is a guess, and a wrong guess cuts the body.
  `guard build` turns it on when the training data says the model works that way.
- token voting: stop as soon as `num_consecutive` tokens in a row vote stop.
- minimum code (all votes above): the guard stops only once the output it keeps holds at least
  `min_code_lines` lines with code. The prompt opened a unit whose body is expected, so an empty
  body is never the answer; a probe wrongly sure on the very first line (seen: `return` after a
  2-space indent at p_stop 0.999) would otherwise cut the whole answer, while one more line
  costs a few tokens. 0 turns it off (the paper's rule).
- blank-line rule (both policies): stop after `max_blank_lines` consecutive empty lines, because a
  run of blank lines means the model has finished the unit it was writing and is drifting.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace


class PolicyKind(str, enum.Enum):
    LINE = "line"
    TOKEN = "token"


@dataclass(frozen=True)
class StopPolicy:
    kind: PolicyKind = PolicyKind.LINE
    stop_threshold: float = 0.5
    num_consecutive: int = 3  # token voting only
    max_blank_lines: int = 3  # 0 disables the blank-line rule
    keep_stop_line: bool = False  # keep the text of the line that triggered the stop
    # Line voting only; None: the line's end decides alone (see the line-start rule above).
    line_start_threshold: float | None = 0.8
    line_keep_threshold: float | None = 0.001
    # The line-start stop looks at the mean p_stop of the line's first this-many code tokens.
    line_start_window: int = 3
    done_threshold: float | None = None  # None: the done rule is off (see above)
    min_code_lines: int = 0  # 0: the guard may stop before any line of code is kept
    done_needs_blank_line: bool = False  # the done rule fires only on a line end opening a blank line

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", PolicyKind(self.kind))
        if not 0 < self.stop_threshold < 1:
            raise ValueError(f"stop_threshold must be in (0, 1), got {self.stop_threshold}")
        if self.line_start_threshold is not None and not 0 < self.line_start_threshold <= 1:
            raise ValueError(f"line_start_threshold must be in (0, 1] or None, got {self.line_start_threshold}")
        if self.line_keep_threshold is not None and not 0 <= self.line_keep_threshold < 1:
            raise ValueError(f"line_keep_threshold must be in [0, 1) or None, got {self.line_keep_threshold}")
        if self.done_threshold is not None and not 0 < self.done_threshold <= 1:
            raise ValueError(f"done_threshold must be in (0, 1] or None, got {self.done_threshold}")
        if (self.line_start_threshold is not None and self.line_keep_threshold is not None
                and self.line_keep_threshold >= self.line_start_threshold):
            raise ValueError("line_keep_threshold must be below line_start_threshold")
        if self.line_start_window < 1:
            raise ValueError("line_start_window must be >= 1")
        if self.num_consecutive < 1:
            raise ValueError("num_consecutive must be >= 1")
        if self.max_blank_lines < 0:
            raise ValueError("max_blank_lines must be >= 0")
        if self.min_code_lines < 0:
            raise ValueError("min_code_lines must be >= 0")


@dataclass(frozen=True)
class VoteState:
    num_line_stop_votes: int = 0
    num_line_continue_votes: int = 0
    num_consecutive_stop_votes: int = 0
    num_blank_lines: int = 0
    is_line_kept: bool = False  # the line-start rule decided this line continues
    is_line_started: bool = False  # a token other than whitespace was seen in this line
    num_line_code_tokens: int = 0  # tokens of this line that are not only whitespace
    line_code_stop_mass: float = 0.0  # sum of their p_stop
    num_code_lines: int = 0  # completed lines with code so far (not blank), all kept


@dataclass(frozen=True)
class Decision:
    state: VoteState
    is_stop: bool
    is_line_end: bool
    keeps_line: bool = False  # a done-rule stop: the line just ended is expected code, keep it


def count_blank_lines(num_blank_lines: int, line_text: str) -> int:
    """Update the run of consecutive empty lines with the lines that `line_text` completes.

    `line_text` is the text since the previous line end, ending in the token that holds a newline;
    whatever follows its last newline belongs to the next line and is not counted yet.
    """
    for completed_line in line_text.split("\n")[:-1]:
        num_blank_lines = num_blank_lines + 1 if not completed_line.strip() else 0
    return num_blank_lines


def update_votes(
    state: VoteState, p_stop: float, line_text: str | None, policy: StopPolicy,
    stop_threshold: float | None = None, is_whitespace: bool = False, p_done: float | None = None,
) -> Decision:
    """Fold one token's guard probability into the vote state.

    `line_text` is None for a token inside a line, else the full text of the line this token ends.
    `stop_threshold` overrides the policy's threshold (a per-request setting). `is_whitespace`:
    the token's text is only whitespace (indentation), so it does not start the line's code.
    `p_done`: the done head's probability for this token (None without a done head).
    """
    threshold = policy.stop_threshold if stop_threshold is None else stop_threshold
    votes_stop = p_stop >= threshold
    is_line_start = not state.is_line_started and not is_whitespace
    state = replace(
        state,
        num_line_stop_votes=state.num_line_stop_votes + int(votes_stop),
        num_line_continue_votes=state.num_line_continue_votes + int(not votes_stop),
        num_consecutive_stop_votes=state.num_consecutive_stop_votes + 1 if votes_stop else 0,
        is_line_started=state.is_line_started or not is_whitespace,
        num_line_code_tokens=state.num_line_code_tokens + int(not is_whitespace),
        line_code_stop_mass=state.line_code_stop_mass + (0.0 if is_whitespace else p_stop),
    )
    # A vote stop drops the current line: it may fire once enough code lines are kept before it.
    may_drop_line = state.num_code_lines >= policy.min_code_lines
    is_stop = (policy.kind is PolicyKind.TOKEN and may_drop_line
               and state.num_consecutive_stop_votes >= policy.num_consecutive)
    if policy.kind is PolicyKind.LINE and is_line_start and policy.line_keep_threshold is not None \
            and p_stop <= policy.line_keep_threshold:
        state = replace(state, is_line_kept=True)
    if (policy.kind is PolicyKind.LINE and may_drop_line and not is_whitespace and not state.is_line_kept
            and policy.line_start_threshold is not None
            and state.num_line_code_tokens <= policy.line_start_window):
        mean_p_stop = state.line_code_stop_mass / state.num_line_code_tokens
        is_stop = is_stop or mean_p_stop >= max(threshold, policy.line_start_threshold)
    is_line_end = line_text is not None
    keeps_line = False
    if is_line_end:
        if (policy.kind is PolicyKind.LINE and may_drop_line and not state.is_line_kept
                and state.num_line_stop_votes > state.num_line_continue_votes):
            is_stop = True
        # The done rule keeps the line that just ended: that line counts toward the minimum.
        num_code_lines = state.num_code_lines + int(state.is_line_started)
        if (not is_stop and policy.done_threshold is not None and p_done is not None
                and p_done >= policy.done_threshold and num_code_lines >= policy.min_code_lines
                and (not policy.done_needs_blank_line or count_blank_lines(0, line_text) > 0)):
            is_stop = keeps_line = True
        num_blank_lines = count_blank_lines(state.num_blank_lines, line_text)
        if policy.max_blank_lines and num_blank_lines >= policy.max_blank_lines:
            is_stop = True
        state = replace(state, num_line_stop_votes=0, num_line_continue_votes=0,
                        num_blank_lines=num_blank_lines, is_line_kept=False, is_line_started=False,
                        num_line_code_tokens=0, line_code_stop_mass=0.0, num_code_lines=num_code_lines)
    return Decision(state=state, is_stop=is_stop, is_line_end=is_line_end, keeps_line=keeps_line)


def find_stop(p_stops: list[float], token_texts: list[str], policy: StopPolicy,
              p_dones: list[float] | None = None) -> tuple[int, int] | None:
    """Replay a policy over a whole completion, as the engine applies it token by token.

    Returns (index of the token whose vote stops the sequence, number of tokens the completion
    keeps), or None when the policy never stops it. A stop drops the line it fires in (the
    tokens from that line's start) unless the policy keeps it or the done rule fired. Used
    offline: to measure a trained guard and to compare policies on the same completions.
    """
    state, line_start, line_text = VoteState(), 0, ""
    for i, (p_stop, text) in enumerate(zip(p_stops, token_texts)):
        line_text += text
        is_line_end = "\n" in text
        decision = update_votes(state, p_stop, line_text if is_line_end else None, policy,
                                is_whitespace=bool(text) and not text.strip(),
                                p_done=None if p_dones is None else p_dones[i])
        state = decision.state
        if decision.is_stop:
            return i, i + 1 if decision.keeps_line or policy.keep_stop_line else line_start
        if is_line_end:
            line_start, line_text = i + 1, ""
    return None
