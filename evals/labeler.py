"""Where the needed code ends: where the function the prompt opened closes in a completion.

The ground truth of both the guard's training labels (guard_training) and the evaluation of
where a stop fell (evals.stop_errors), so it lives in the lower of the two layers.

The prompt ends inside the signature of `entry_point`; the completion writes its body and often
goes on (tests, extra functions, `if __name__ == ...`, prose, markdown fences). We parse
prompt + completion with tree-sitter, find the entry point's definition that starts in the
prompt, and cut where it closes. Helper definitions that directly follow it and that it calls
(transitively) are kept, since the program needs them; everything after is excess.

Grammars come from the per-language wheels (tree-sitter-python, ...), which ship compiled
parsers (guard/syntax.py loads them). tree-sitter-language-pack 1.23 is not used: its get_parser downloads the parsers from
GitHub at run time, which fails on machines that reach only package registries.
"""
from __future__ import annotations

from dataclasses import dataclass

from tree_sitter import Node

# The parsers (one per language, from the grammar wheels) are the guard runtime's: the syntax
# gate parses with the same ones.
from guard.syntax import LANGUAGES, get_parser

# Node types that define a named function, per language (C++ templates are unwrapped below).
_FUNCTION_TYPES = {"python": {"function_definition"},
                   "javascript": {"function_declaration", "generator_function_declaration"},
                   "go": {"function_declaration"},
                   "cpp": {"function_definition"}}


@dataclass(frozen=True)
class CutResult:
    """`cut_char`: offset in the completion where the expected part ends (None if unparseable)."""
    cut_char: int | None
    is_parseable: bool
    reason: str
    kept_helpers: tuple[str, ...] = ()

    def __post_init__(self):
        if self.is_parseable != (self.cut_char is not None):
            raise ValueError("cut_char must be set exactly when is_parseable")
        if self.cut_char is not None and self.cut_char < 0:
            raise ValueError(f"cut_char must be >= 0, got {self.cut_char}")


def _unparseable(reason: str) -> CutResult:
    return CutResult(cut_char=None, is_parseable=False, reason=reason)


def _descendants(node: Node):
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children))


def _definition_name(language: str, node: Node) -> str | None:
    """Name of a function definition node, or None if `node` defines no named function."""
    if language == "cpp" and node.type == "template_declaration":
        inner = [c for c in node.named_children if c.type == "function_definition"]
        return _definition_name(language, inner[0]) if inner else None
    if language == "python" and node.type == "decorated_definition":
        inner = node.child_by_field_name("definition")
        return _definition_name(language, inner) if inner is not None else None
    if language == "javascript" and node.type in ("lexical_declaration", "variable_declaration"):
        # `const helper = (x) => ...;` is a helper definition too.
        declarators = [c for c in node.named_children if c.type == "variable_declarator"]
        if len(declarators) != 1:
            return None
        value = declarators[0].child_by_field_name("value")
        if value is None or value.type not in ("arrow_function", "function_expression", "function"):
            return None
        name = declarators[0].child_by_field_name("name")
        return name.text.decode() if name is not None else None
    if node.type not in _FUNCTION_TYPES[language]:
        return None
    if language != "cpp":
        name = node.child_by_field_name("name")
        return name.text.decode() if name is not None else None
    # C++: return type, then a declarator chain (pointer/reference) around a function_declarator.
    declarator = node.child_by_field_name("declarator")
    while declarator is not None and declarator.type != "function_declarator":
        # pointer_declarator names its inner declarator; reference_declarator does not.
        inner = [c for c in declarator.named_children if c.type.endswith("declarator")]
        declarator = declarator.child_by_field_name("declarator") or (inner[0] if inner else None)
    if declarator is None:
        return None
    name = declarator.child_by_field_name("declarator")
    return name.text.decode().split("::")[-1] if name is not None else None


def _function_node(language: str, node: Node) -> Node:
    """The function_definition inside a wrapper (template / decorator), for body checks."""
    if node.type == "template_declaration":
        return next(c for c in node.named_children if c.type == "function_definition")
    if node.type == "decorated_definition":
        return node.child_by_field_name("definition")
    return node


def _top_level(node: Node) -> Node:
    """The wrapper (template / decorator) around a definition: the unit its siblings follow."""
    parent = node.parent
    if parent is not None and parent.type in ("template_declaration", "decorated_definition"):
        return parent
    return node


def _code_end(node: Node) -> int:
    """Byte where the last non-comment token of `node` ends (trailing comments are excess)."""
    end = node.start_byte
    for leaf in _descendants(node):
        if leaf.child_count == 0 and leaf.type != "comment" and leaf.end_byte > leaf.start_byte:
            end = max(end, leaf.end_byte)
    return end


def _identifiers(node: Node) -> set[str]:
    return {n.text.decode() for n in _descendants(node) if n.type == "identifier"}


def _python_is_closed(source: bytes, definition: Node) -> bool:
    """A Python def is closed once a later line starts at or left of its `def` column.

    Only lines after the one holding its last token count: a multi-line string or a comment
    inside the body that starts at column 0 lies before that token and cannot close it.
    """
    line_start = source.rfind(b"\n", 0, definition.start_byte) + 1
    def_column = len(source[line_start:definition.start_byte].decode())
    for line in source[_code_end(definition):].decode().split("\n")[1:]:
        stripped = line.lstrip()
        if stripped and len(line) - len(stripped) <= def_column:
            return True
    return False


def _closing_problem(language: str, definition: Node, source: bytes, ends_at_eos: bool) -> str | None:
    """Why `definition` (a top-level unit) is not a complete definition, or None if it is."""
    function = _function_node(language, definition)
    if language == "python" and not (ends_at_eos or _python_is_closed(source, definition)):
        return "not closed"
    if function.type in _FUNCTION_TYPES[language]:  # not a `const f = () => ...` helper
        body = function.child_by_field_name("body")
        if body is None or body.end_byte == body.start_byte:
            # Go parses an unclosed body as a bodiless declaration plus an ERROR; an unindented
            # Python body parses as an empty block next to stray statements.
            return "has a syntax error" if language == "python" else "not closed"
        closer = body.children[-1]
        if language != "python" and (closer.type != "}" or closer.is_missing):
            return "not closed"
    if definition.has_error:
        return "has a syntax error"
    return None


def _line_comment(language: str) -> str:
    return "#" if language == "python" else "//"


def _extend_to_line_end(language: str, completion: str, cut_char: int) -> int:
    """Take the rest of the closing line (and its newline) if it holds only `;`/a comment."""
    newline = completion.find("\n", cut_char)
    line_end = len(completion) if newline < 0 else newline + 1
    rest = completion[cut_char:line_end].strip().lstrip(";").strip()
    return line_end if not rest or rest.startswith(_line_comment(language)) else cut_char


def find_cut(language: str, prompt: str, completion: str, entry_point: str, *,
             ends_at_eos: bool = False) -> CutResult:
    """Where the expected part of `completion` ends: the entry point's closing, plus called helpers.

    `ends_at_eos`: the model stopped on its own, so the end of the completion closes a Python
    def (a brace language needs its `}` either way). Without it a Python body that runs to the
    end of the completion is "entry point not closed": more body lines might have followed.
    """
    if language not in LANGUAGES:
        return _unparseable("unsupported language")
    prompt_bytes = prompt.encode()
    source = prompt_bytes + completion.encode()
    root = get_parser(language).parse(source).root_node
    # The definition the prompt opened starts in the prompt; the completion may redefine the name.
    opened = [node for node in _descendants(root)
              if node.start_byte < len(prompt_bytes) and _definition_name(language, node) == entry_point]
    if not opened:
        # JavaScript sees an unclosed function as a broken expression, not a declaration;
        # the brace count only picks the reason to report.
        is_unclosed = language != "python" and completion.count("}") <= completion.count("{")
        return _unparseable("entry point not closed" if is_unclosed else "entry point not found")
    target = _top_level(max(opened, key=lambda node: node.start_byte))
    problem = _closing_problem(language, target, source, ends_at_eos)
    if problem is not None:
        return _unparseable(f"entry point {problem}")

    # Keep the run of definitions right after the target that the kept code calls.
    kept_names, referenced = [entry_point], _identifiers(target)
    end_byte, sibling = _code_end(target), target.next_sibling
    while sibling is not None:
        if sibling.type != "comment":
            name = _definition_name(language, sibling)
            if name is None or name in kept_names or name not in referenced:
                break
            problem = _closing_problem(language, sibling, source, ends_at_eos)
            if problem is not None:
                return _unparseable(f"helper {problem}")
            kept_names.append(name)
            referenced |= _identifiers(sibling)
            end_byte = _code_end(sibling)
        sibling = sibling.next_sibling

    if end_byte < len(prompt_bytes):  # the body is all in the prompt: everything generated is excess
        return CutResult(cut_char=0, is_parseable=True, reason="ok", kept_helpers=tuple(kept_names[1:]))
    cut_char = len(source[len(prompt_bytes):end_byte].decode())
    return CutResult(cut_char=_extend_to_line_end(language, completion, cut_char), is_parseable=True,
                     reason="ok", kept_helpers=tuple(kept_names[1:]))


def label_tokens(token_char_ends: list[int], cut_char: int) -> list[int]:
    """1 (continue) for each generated token that starts before the cut, 0 (stop) for the rest.

    Token i spans [start_i, token_char_ends[i]) with start_i the furthest end of tokens before it
    (0 for the first; the running max keeps labels monotone if prefix decoding ever shrinks).
    So tokens ending at or before the cut and the token straddling it are continue; tokens
    starting at or after the cut are stop, including empty ones (e.g. the first byte of a
    multi-byte character) sitting exactly at the cut, since they begin the excess.
    """
    if cut_char < 0:
        raise ValueError(f"cut_char must be >= 0, got {cut_char}")
    labels, start = [], 0
    for end in token_char_ends:
        labels.append(1 if start < cut_char else 0)
        start = max(start, end)
    return labels


def truncate(completion: str, cut: CutResult | int) -> str:
    """The expected part of `completion` (what a perfect stop would have produced)."""
    if isinstance(cut, CutResult):
        if not cut.is_parseable:
            raise ValueError(f"cannot truncate an unparseable completion ({cut.reason})")
        cut = cut.cut_char
    return completion[:cut]


__all__ = ["CutResult", "LANGUAGES", "find_cut", "get_parser", "label_tokens", "truncate"]
