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
- syntax gate (`syntax_gate`, any policy): every stop the rules above propose is put to the
  language's parser (guard/syntax.py) with the text the stop would keep, and goes through only
  if that text is complete code (no open bracket, string or block; the opened function has a
  statement, or with `syntax_gate_allows_stub`, is a stub its `}` closed). A refused stop
  changes nothing else: the votes go on as folded. The gate is bounded: from its first refusal
  in a sequence it may refuse for `syntax_gate_max_lines` line ends, after which every stop goes
  through as without the gate, so a completion that never parses still ends under the rules
  above, at most that many lines later. `gate_step` is the whole rule; the engines call it, in
  Python, only on a token whose fold proposed a stop.

One definition, three kinds of numbers. `_fold` is the whole rule set, written with operators
and `where` only, so the same function folds one token of one sequence on Python scalars (our
engine, `find_stop`), a batch of rows on NumPy arrays (the vLLM logits processor on a CPU) or on
torch tensors that stay on the GPU (no host-device sync). What the rules need to know of a token
beyond its probabilities comes from its text alone (`TokenFeatures`), so a table over the
vocabulary, built once, replaces any decoding while generating.
"""
from __future__ import annotations

import enum
import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np


class PolicyKind(str, enum.Enum):
    LINE = "line"
    TOKEN = "token"


class PolicyError(ValueError):
    """A stop policy field of the wrong type or out of range; `field` names it ("" for the whole)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}" if field else problem)
        self.field, self.problem = field, problem

    @property
    def json_field(self) -> str:
        """The field as guard.json and the vLLM export name it."""
        return f"policy.{self.field}" if self.field else "policy"


_TYPE_NAMES = {"bool": "true or false", "int": "an integer", "float": "a finite number",
               "PolicyKind": f"one of {[kind.value for kind in PolicyKind]}"}


def _checked_value(name: str, value: Any, annotation: str):
    """`value` as the plain Python type its annotation names, or PolicyError. No coercion across
    types: the string "false" is truthy, and a JSON typo must not flip a rule."""
    base = annotation.removesuffix(" | None")
    if value is None and base != annotation:
        return None
    wanted = _TYPE_NAMES[base] + (" or null" if base != annotation else "")
    is_bool = isinstance(value, (bool, np.bool_))
    if base == "bool" and is_bool:
        return bool(value)
    if base == "int" and isinstance(value, numbers.Integral) and not is_bool:
        return int(value)
    if base == "float" and isinstance(value, numbers.Real) and not is_bool and math.isfinite(value):
        return float(value)
    if base == "PolicyKind" and isinstance(value, str) and value in {kind.value for kind in PolicyKind}:
        return PolicyKind(value)  # a PolicyKind is a str too
    raise PolicyError(name, f"must be {wanted}, got {value!r}")


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
    syntax_gate: bool = False  # a stop goes through only where the kept code parses (see above)
    syntax_gate_max_lines: int = 8  # line ends after the gate's first refusal that it may still refuse
    # The gate lets a stop through after a function the model closed with an empty body (a stub,
    # guard/syntax.py `allows_stub`); False: the body needs a statement, closed or not.
    syntax_gate_allows_stub: bool = False

    def __post_init__(self) -> None:
        for field in fields(self):  # the annotations are the schema: checked for every source
            object.__setattr__(self, field.name, _checked_value(field.name, getattr(self, field.name), field.type))
        if not 0 < self.stop_threshold < 1:
            raise PolicyError("stop_threshold", f"must be in (0, 1), got {self.stop_threshold}")
        if self.line_start_threshold is not None and not 0 < self.line_start_threshold <= 1:
            raise PolicyError("line_start_threshold", f"must be in (0, 1] or null, got {self.line_start_threshold}")
        if self.line_keep_threshold is not None and not 0 <= self.line_keep_threshold < 1:
            raise PolicyError("line_keep_threshold", f"must be in [0, 1) or null, got {self.line_keep_threshold}")
        if self.done_threshold is not None and not 0 < self.done_threshold <= 1:
            raise PolicyError("done_threshold", f"must be in (0, 1] or null, got {self.done_threshold}")
        if (self.line_start_threshold is not None and self.line_keep_threshold is not None
                and self.line_keep_threshold >= self.line_start_threshold):
            raise PolicyError("line_keep_threshold", f"must be below line_start_threshold"
                                                     f" ({self.line_start_threshold}), got {self.line_keep_threshold}")
        for name, minimum in (("line_start_window", 1), ("num_consecutive", 1), ("max_blank_lines", 0),
                              ("min_code_lines", 0), ("syntax_gate_max_lines", 0)):
            if getattr(self, name) < minimum:
                raise PolicyError(name, f"must be >= {minimum}, got {getattr(self, name)}")

    @classmethod
    def from_json(cls, data: Any) -> "StopPolicy":
        """The policy a JSON object describes (guard.json's and the vLLM export's "policy").
        Unknown fields are refused: a misspelt one would otherwise leave its rule at the default.
        Absent fields take their defaults, so guards saved before a rule existed keep loading."""
        if not isinstance(data, dict):
            raise PolicyError("", f"must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {field.name for field in fields(cls)})
        if unknown:
            raise PolicyError(unknown[0], "is not a stop policy field (misspelt?)")
        return cls(**data)

    def to_json(self) -> dict:
        return {**asdict(self), "kind": self.kind.value}

    @property
    def has_line_start_stop(self) -> bool:
        return self.kind is PolicyKind.LINE and self.line_start_threshold is not None


@dataclass(frozen=True)
class VoteState:
    """One sequence's votes. The same fields, as arrays, hold a batch (`VoteArrays`)."""

    num_line_stop_votes: int = 0
    num_line_continue_votes: int = 0
    num_consecutive_stop_votes: int = 0
    num_blank_lines: int = 0
    is_line_kept: bool = False  # the line-start rule decided this line continues
    is_line_started: bool = False  # a token other than whitespace was seen in this line
    num_line_code_tokens: int = 0  # tokens of this line that are not only whitespace
    line_code_stop_mass: float = 0.0  # sum of their p_stop
    num_code_lines: int = 0  # completed lines with code so far (not blank), all kept
    is_line_text_blank: bool = True  # the line's text so far is only whitespace (or empty)


VOTE_FIELDS = tuple(f.name for f in fields(VoteState))
_FLOAT_FIELDS = ("line_code_stop_mass",)
_BOOL_FIELDS = ("is_line_kept", "is_line_started", "is_line_text_blank")


@dataclass(frozen=True)
class Decision:
    state: VoteState
    is_stop: bool
    is_line_end: bool
    keeps_line: bool = False  # a done-rule stop: the line just ended is expected code, keep it


@dataclass(frozen=True)
class TokenFeatures:
    """What the stop rules need to know of one token's text (or, as arrays, of many tokens).

    A token may hold several newlines (`}\n\n`): the text before the first one ends the current
    line (`head`), the pieces between two newlines are whole lines (`middle`), and the text after
    the last one is not counted (the next line starts with the next token).
    """

    is_whitespace: Any  # only whitespace, and not empty: indentation, not the line's code
    is_blank_text: Any  # only whitespace or empty: keeps the line's text blank
    is_line_end: Any  # holds a newline
    is_head_blank: Any
    is_all_middle_blank: Any
    num_middle: Any
    num_trailing_blank_middle: Any  # blank middle pieces at the end of the middle ones


FEATURE_FIELDS = tuple(f.name for f in fields(TokenFeatures))


def token_features(text: str) -> TokenFeatures:
    """The features of one token from its text (the vocabulary table is built from these)."""
    pieces = text.split("\n")
    middle = pieces[1:-1]
    num_trailing = 0
    for piece in reversed(middle):
        if piece.strip():
            break
        num_trailing += 1
    return TokenFeatures(
        is_whitespace=bool(text) and not text.strip(), is_blank_text=not text.strip(),
        is_line_end="\n" in text, is_head_blank=not pieces[0].strip(),
        is_all_middle_blank=num_trailing == len(middle), num_middle=len(middle),
        num_trailing_blank_middle=num_trailing)


def token_feature_table(token_texts: list[str]) -> dict[str, np.ndarray]:
    """Per-token feature arrays over a vocabulary (index = token id), from each token's own text."""
    rows = [token_features(text) for text in token_texts]
    return {name: np.array([getattr(row, name) for row in rows],
                           dtype=np.int32 if name.startswith("num_") else bool)
            for name in FEATURE_FIELDS}


def count_blank_lines(num_blank_lines: int, line_text: str) -> int:
    """Update the run of consecutive empty lines with the lines that `line_text` completes.

    `line_text` is the text since the previous line end, ending in the token that holds a newline;
    whatever follows its last newline belongs to the next line and is not counted yet.
    """
    features = token_features(line_text)
    return _blank_run(num_blank_lines, features.is_head_blank, features, _SCALAR_OPS)


# ---- the rules, once, for scalars and arrays ----------------------------------------------------
class _ScalarOps:
    @staticmethod
    def where(condition, if_true, if_false):
        return if_true if condition else if_false

    @staticmethod
    def not_(x):
        return not x


class _NumpyOps:
    where = staticmethod(np.where)
    not_ = staticmethod(np.logical_not)


class _TorchOps:
    @staticmethod
    def where(condition, if_true, if_false):
        import torch

        return torch.where(condition if condition.dtype == torch.bool else condition.bool(), if_true, if_false)

    @staticmethod
    def not_(x):
        return x.logical_not()


_SCALAR_OPS = _ScalarOps()


def _blank_run(num_blank_lines, is_first_line_blank, tok: TokenFeatures, ops):
    """The run of empty lines after a token that ends a line (see `count_blank_lines`): after
    the first completed line, the run so far plus one if that line is blank, else 0; then every
    middle piece, all blank (they add up) or not (the blank ones at the end count)."""
    return ops.where(tok.is_all_middle_blank, (num_blank_lines + 1) * is_first_line_blank + tok.num_middle,
                     tok.num_trailing_blank_middle)


def _start_threshold(stop_threshold, policy: StopPolicy, ops):
    """The line-start stop needs the larger of the policy's start threshold and the vote's."""
    return ops.where(stop_threshold > policy.line_start_threshold, stop_threshold, policy.line_start_threshold)


def _fold(s, p_stop, p_done, tok: TokenFeatures, is_first_line_blank, policy: StopPolicy,
          stop_threshold, ops):
    """Fold one token into the votes: (new vote fields as a dict, is_stop, keeps_line).

    Elementwise in every argument but `policy` and `ops`. `p_done` is 0 where there is no done head.
    Flags combine with & | and multiply counts (True * n == n): the fewest array operations, since
    the vLLM processor pays for each one every step.
    """
    is_line_policy = policy.kind is PolicyKind.LINE
    not_ws = ops.not_(tok.is_whitespace)
    votes_stop = p_stop >= stop_threshold
    num_stop = s.num_line_stop_votes + votes_stop
    num_continue = s.num_line_continue_votes + ops.not_(votes_stop)
    num_consecutive = (s.num_consecutive_stop_votes + 1) * votes_stop
    num_code = s.num_line_code_tokens + not_ws
    mass = s.line_code_stop_mass + p_stop * not_ws
    # A vote stop drops the current line: it may fire once enough code lines are kept before it.
    may_drop = s.num_code_lines >= policy.min_code_lines
    is_kept = s.is_line_kept
    is_stop = may_drop & (num_consecutive >= policy.num_consecutive) if not is_line_policy else votes_stop & False
    if is_line_policy and policy.line_keep_threshold is not None:
        is_kept = is_kept | (ops.not_(s.is_line_started) & not_ws & (p_stop <= policy.line_keep_threshold))
    can_drop = may_drop & ops.not_(is_kept)
    if is_line_policy and policy.line_start_threshold is not None:
        # mean p_stop of the line's code tokens so far >= the start threshold, without dividing
        is_stop = is_stop | (can_drop & not_ws & (num_code <= policy.line_start_window)
                             & (mass >= _start_threshold(stop_threshold, policy, ops) * num_code))
    # ---- at a line end ----
    end = tok.is_line_end
    if is_line_policy:
        is_stop = is_stop | (end & can_drop & (num_stop > num_continue))
    is_started = s.is_line_started | not_ws
    # The done rule keeps the line that just ended: that line counts toward the minimum.
    num_code_lines = s.num_code_lines + (end & is_started)
    keeps_line = votes_stop & False
    if policy.done_threshold is not None:
        is_done = end & (p_done >= policy.done_threshold) & (num_code_lines >= policy.min_code_lines)
        if policy.done_needs_blank_line:  # the line end opens a blank line: a run from 0 above 0
            is_done = is_done & (_blank_run(0, is_first_line_blank, tok, ops) > 0)
        keeps_line = is_done & ops.not_(is_stop)
        is_stop = is_stop | is_done
    num_blank_lines = ops.where(end, _blank_run(s.num_blank_lines, is_first_line_blank, tok, ops),
                                s.num_blank_lines)
    if policy.max_blank_lines:
        is_stop = is_stop | (end & (num_blank_lines >= policy.max_blank_lines))
    not_end = ops.not_(end)
    new = {
        "num_line_stop_votes": num_stop * not_end,
        "num_line_continue_votes": num_continue * not_end,
        "num_consecutive_stop_votes": num_consecutive,
        "num_blank_lines": num_blank_lines,
        "is_line_kept": is_kept & not_end,
        "is_line_started": is_started & not_end,
        "num_line_code_tokens": num_code * not_end,
        "line_code_stop_mass": mass * not_end,
        "num_code_lines": num_code_lines,
        "is_line_text_blank": (s.is_line_text_blank & tok.is_blank_text) | end,
    }
    return new, is_stop, keeps_line


def _scalar_state(new: dict) -> VoteState:
    return VoteState(**{name: (float(value) if name in _FLOAT_FIELDS else bool(value)
                               if name in _BOOL_FIELDS else int(value)) for name, value in new.items()})


def fold_token(state: VoteState, p_stop: float, token: TokenFeatures, policy: StopPolicy,
               stop_threshold: float | None = None, p_done: float | None = None) -> Decision:
    """Fold one token of one sequence, known by its features (`token_features(text)` or a row of
    the vocabulary table). `stop_threshold` overrides the policy's (a per-request setting)."""
    threshold = policy.stop_threshold if stop_threshold is None else stop_threshold
    new, is_stop, keeps_line = _fold(state, p_stop, 0.0 if p_done is None else p_done, token,
                                     state.is_line_text_blank and token.is_head_blank, policy,
                                     threshold, _SCALAR_OPS)
    return Decision(_scalar_state(new), bool(is_stop), bool(token.is_line_end), bool(keeps_line))


def update_votes(
    state: VoteState, p_stop: float, line_text: str | None, policy: StopPolicy,
    stop_threshold: float | None = None, is_whitespace: bool = False, p_done: float | None = None,
) -> Decision:
    """Fold one token's guard probability into the vote state, knowing the line's whole text.

    `line_text` is None for a token inside a line, else the full text of the line this token ends.
    `is_whitespace`: the token's text is only whitespace (indentation), so it does not start the
    line's code. `p_done`: the done head's probability for this token (None without a done head).
    """
    if line_text is None:
        token = TokenFeatures(is_whitespace, True, False, True, True, 0, 0)
        return fold_token(state, p_stop, token, policy, stop_threshold, p_done)
    line = token_features(line_text)
    token = replace(line, is_whitespace=is_whitespace)
    # The whole line's text is known here, so its first piece decides whether it was blank.
    return fold_token(replace(state, is_line_text_blank=True), p_stop, token, policy, stop_threshold, p_done)


# ---- batches: one row per sequence --------------------------------------------------------------
@dataclass(frozen=True)
class VoteArrays:
    """The votes of many sequences, one array (NumPy or torch) per VoteState field."""

    num_line_stop_votes: Any
    num_line_continue_votes: Any
    num_consecutive_stop_votes: Any
    num_blank_lines: Any
    is_line_kept: Any
    is_line_started: Any
    num_line_code_tokens: Any
    line_code_stop_mass: Any
    num_code_lines: Any
    is_line_text_blank: Any

    @classmethod
    def zeros(cls, num_rows: int, xp=np, device=None) -> "VoteArrays":
        """Fresh votes for `num_rows` sequences (`xp`: numpy, or torch with a device)."""
        def make(name):
            initial = getattr(VoteState(), name)
            dtype = (xp.float64 if name in _FLOAT_FIELDS else xp.bool_ if xp is np and name in _BOOL_FIELDS
                     else getattr(xp, "bool") if name in _BOOL_FIELDS else xp.int32)
            if xp is np:
                return np.full(num_rows, initial, dtype=dtype)
            return xp.full((num_rows,), initial, dtype=dtype, device=device)
        return cls(**{name: make(name) for name in VOTE_FIELDS})

    def row(self, index: int) -> VoteState:
        return _scalar_state({name: getattr(self, name)[index] for name in VOTE_FIELDS})


def fold_arrays(votes, p_stop, p_done, tokens: TokenFeatures, policy: StopPolicy,
                stop_threshold) -> tuple[dict, Any, Any]:
    """`fold_batch` without the final casts: new fields as a dict of arrays of whatever type the
    operations gave (flags may come back as bool or 0/1 ints). For callers that store the votes
    their own way (the vLLM processor keeps them in two matrices)."""
    ops = _NumpyOps if isinstance(p_stop, np.ndarray) else _TorchOps
    is_first_line_blank = votes.is_line_text_blank & tokens.is_head_blank
    return _fold(votes, p_stop, p_done, tokens, is_first_line_blank, policy, stop_threshold, ops)


def fold_batch(votes: VoteArrays, p_stop, p_done, tokens: TokenFeatures, policy: StopPolicy,
               stop_threshold) -> tuple[VoteArrays, Any, Any]:
    """Fold one token per row. Arrays all of one kind: NumPy, or torch (any device; no sync).
    Flags may be bool arrays or 0/1 integer arrays (the rules use only &, |, where and not).
    Returns (new votes, is_stop, keeps_line); the caller keeps only the rows that had a token."""
    is_numpy = isinstance(p_stop, np.ndarray)
    new, is_stop, keeps_line = fold_arrays(votes, p_stop, p_done, tokens, policy, stop_threshold)
    dtypes = {name: getattr(votes, name).dtype for name in VOTE_FIELDS}
    if is_numpy:
        new = {name: np.asarray(value).astype(dtypes[name], copy=False) for name, value in new.items()}
    else:
        new = {name: value.to(dtypes[name]) for name, value in new.items()}
    return VoteArrays(**new), is_stop, keeps_line


def line_start_would_stop(votes: VoteArrays, p_stop, policy: StopPolicy, stop_threshold):
    """Per row: would the line-start rule stop at the next token if that token is code (not only
    whitespace)? Known before the token is sampled, so a stop need not emit the excess token.
    (The same condition as in `_fold`, for a token that is not whitespace.)"""
    if not policy.has_line_start_stop:
        return p_stop < 0
    ops = _NumpyOps if isinstance(p_stop, np.ndarray) else _TorchOps
    is_kept = votes.is_line_kept
    if policy.line_keep_threshold is not None:
        is_kept = is_kept | (ops.not_(votes.is_line_started) & (p_stop <= policy.line_keep_threshold))
    num_code = votes.num_line_code_tokens + 1
    return ((votes.num_code_lines >= policy.min_code_lines) & ops.not_(is_kept)
            & (num_code <= policy.line_start_window)
            & (votes.line_code_stop_mass + p_stop >= _start_threshold(stop_threshold, policy, ops) * num_code))


# ---- the syntax gate: one sequence at a time, in Python (a parse is needed anyway) -------------
NO_REFUSAL = -1  # GateState.num_lines_since_refusal before the gate's first refusal


@dataclass(frozen=True)
class GateState:
    num_lines_since_refusal: int = NO_REFUSAL  # line ends since the gate's first refusal
    num_refusals: int = 0
    # The last parse, (kept length, complete?): a line-start stop is proposed again by each of the
    # line's first tokens, and the vLLM processor asks before sampling and again at the fold after
    # it, always about the same text; one memo, here, serves every caller.
    last_num_kept: int = -1
    is_last_complete: bool = False


def gate_may_refuse(gate: GateState, policy: StopPolicy) -> bool:
    """Is the gate still allowed to hold this sequence (see the module's syntax gate rule)?"""
    return policy.syntax_gate and gate.num_lines_since_refusal < policy.syntax_gate_max_lines


def gate_parse(gate: GateState, num_kept: int, is_complete) -> tuple[GateState, bool]:
    """(new gate state, is the text of the first `num_kept` tokens complete code): parsed with
    `is_complete(num_kept)` unless the last parse was of that same text."""
    if num_kept == gate.last_num_kept:
        return gate, gate.is_last_complete
    answer = bool(is_complete(num_kept))
    return replace(gate, last_num_kept=num_kept, is_last_complete=answer), answer


def gate_step(gate: GateState, is_stop: bool, is_line_end: bool, num_kept: int, policy: StopPolicy,
              is_complete) -> tuple[GateState, bool]:
    """After one token's fold: (new gate state, does the stop go through). A proposed stop keeps
    the sequence's first `num_kept` tokens; `is_complete(num_kept)` parses their text, and is
    called only when a stop is proposed, the gate may still refuse it, and the last parse was
    not of that same text (`gate_parse`)."""
    is_refused = False
    if is_stop and gate_may_refuse(gate, policy):
        gate, is_complete_now = gate_parse(gate, num_kept, is_complete)
        is_refused = not is_complete_now
    lines = gate.num_lines_since_refusal
    if is_refused and lines == NO_REFUSAL:
        lines = 0
    elif lines != NO_REFUSAL and is_line_end:
        lines += 1
    if lines == gate.num_lines_since_refusal and not is_refused:
        return gate, is_stop
    return (replace(gate, num_lines_since_refusal=lines, num_refusals=gate.num_refusals + is_refused),
            is_stop and not is_refused)


def find_stop(p_stops: list[float], token_texts: list[str], policy: StopPolicy,
              p_dones: list[float] | None = None, is_complete=None) -> tuple[int, int] | None:
    """Replay a policy over a whole completion, as the engines apply it token by token.

    Returns (index of the token whose vote stops the sequence, number of tokens the completion
    keeps), or None when the policy never stops it. A stop drops the line it fires in (the
    tokens from that line's start) unless the policy keeps it or the done rule fired. Used
    offline: to measure a trained guard, to compare policies on the same completions, and to
    check that both engines stop where the policy says.

    `is_complete(num_kept)`: with the policy's syntax gate, does the text of the first `num_kept`
    tokens parse as complete code (guard.syntax.is_complete with the prompt and language bound)?
    """
    if policy.syntax_gate and is_complete is None:
        raise ValueError("a policy with the syntax gate needs is_complete (guard.syntax)")
    state, line_start, gate = VoteState(), 0, GateState()
    for i, (p_stop, text) in enumerate(zip(p_stops, token_texts)):
        decision = fold_token(state, p_stop, token_features(text), policy,
                              p_done=None if p_dones is None else p_dones[i])
        state = decision.state
        num_kept = i + 1 if decision.keeps_line or policy.keep_stop_line else line_start
        is_stop = decision.is_stop
        if policy.syntax_gate:
            gate, is_stop = gate_step(gate, is_stop, decision.is_line_end, num_kept, policy, is_complete)
        if is_stop:
            return i, num_kept
        if decision.is_line_end:
            line_start = i + 1
    return None
