"""The syntax gate: a guard stop goes through only where the code kept so far is complete.

The guard's rules are sure of themselves in places a parser vetoes at once: after the first of
two comment lines that open a body (no statement yet), or inside an open list literal. So when
the policy wants to stop, the language's parser reads prompt + the text the stop would keep, and
the stop is refused unless that parses with no error (no open bracket, string or block) and the
function the prompt opened has a body with at least one statement (comments and a Python
docstring do not count). What a refusal does to the votes, and how long the gate may hold a
sequence, is the policy's (guard/policy.py, `gate_step`); this module only answers "complete?".

The parse runs only when a stop is proposed, never per token. Grammars come from the
per-language wheels (tree-sitter-python, ...), which ship compiled parsers; the training
labeler uses the same parsers (guard_training imports the runtime, never the other way).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from functools import lru_cache

from tree_sitter import Language, Node, Parser

logger = logging.getLogger(__name__)

LANGUAGES = ("python", "javascript", "go", "cpp")
_GRAMMAR_MODULES = {"python": "tree_sitter_python", "javascript": "tree_sitter_javascript",
                    "go": "tree_sitter_go", "cpp": "tree_sitter_cpp"}
# Nodes that open a function body, per language (the gate asks for a statement in the innermost
# one the prompt opened).
_FUNCTION_NODE_TYPES = {
    "python": {"function_definition"},
    "javascript": {"function_declaration", "generator_function_declaration", "function_expression",
                   "function", "arrow_function", "method_definition"},
    "go": {"function_declaration", "method_declaration", "func_literal"},
    "cpp": {"function_definition", "lambda_expression"},
}
# Body children that are not statements.
_NOT_STATEMENTS = {"comment", "{", "}", ":"}


@lru_cache(maxsize=None)
def get_parser(language: str) -> Parser:
    """One parser per language for the whole process (parsers are reusable across parses)."""
    if language not in LANGUAGES:
        raise ValueError(f"unsupported language {language!r}; choose from {LANGUAGES}")
    try:
        grammar = importlib.import_module(_GRAMMAR_MODULES[language])
    except ImportError as error:
        raise ImportError(f"GenGuard's syntax gate needs the {_GRAMMAR_MODULES[language]} grammar wheel "
                          f"(pip install {_GRAMMAR_MODULES[language].replace('_', '-')})") from error
    return Parser(Language(grammar.language()))


def _opened_function(root: Node, prompt_end: int, language: str) -> Node | None:
    """The innermost function whose body starts in the prompt and holds its last code byte
    (`prompt_end`: the prompt's trailing whitespace may lie past a Python body's end)."""
    found, node = None, root
    while node is not None:
        if node.type in _FUNCTION_NODE_TYPES[language]:
            body = node.child_by_field_name("body")
            if body is not None and body.start_byte < prompt_end:
                found = node
        # descend into the child that holds the prompt's end (the text after it was generated)
        node = next((c for c in node.children if c.start_byte < prompt_end <= c.end_byte), None)
    return found


def _num_statements(body: Node, language: str) -> int:
    children = [c for c in body.named_children if c.type not in _NOT_STATEMENTS]
    if language == "go" and len(children) == 1 and children[0].type == "statement_list":
        children = [c for c in children[0].named_children if c.type not in _NOT_STATEMENTS]
    if (language == "python" and children and children[0].type == "expression_statement"
            and children[0].named_child_count == 1 and children[0].named_children[0].type == "string"):
        children = children[1:]  # the docstring documents the body, it is not one of its statements
    return len(children)


def _has_empty_block(root: Node) -> bool:
    stack = [root]
    while stack:
        node = stack.pop()
        if node.type == "block" and not any(c.type != "comment" for c in node.named_children):
            return True
        stack.extend(node.children)
    return False


def _is_closed(body: Node) -> bool:
    """Has the body's own closing brace been written (not one the parser made up)?"""
    return body.child_count > 0 and body.children[-1].type == "}" and not body.children[-1].is_missing


def incomplete_reason(language: str, prompt: str, kept: str, allows_stub: bool = False) -> str | None:
    """Why prompt + kept is not complete code, or None when a stop there may go through.

    `allows_stub`: a function whose body the model closed with no statement in it (`{ // Your
    code here }`, the model's whole answer at times) is complete: the code parses and what
    follows it is never that function. Python bodies have no closing token, so there a body
    with no statement is always still open."""
    prompt_bytes = prompt.encode()
    root = get_parser(language).parse(prompt_bytes + kept.encode()).root_node
    if root.has_error:
        return "syntax error or an open bracket, string or block"
    if language == "python" and _has_empty_block(root):
        # tree-sitter-python accepts `if n == 2:` at the end of the text with an empty block
        return "an open block (a compound statement with no statement yet)"
    function = _opened_function(root, len(prompt.rstrip().encode()), language)
    if function is not None:
        body = function.child_by_field_name("body")
        if _num_statements(body, language) == 0 and not (allows_stub and _is_closed(body)):
            return "the function the prompt opened has no statement yet"
    return None


def is_complete(language: str, prompt: str, kept: str, allows_stub: bool = False) -> bool:
    return incomplete_reason(language, prompt, kept, allows_stub) is None


# Lines a prompt in each language starts a line with: what splits two grammars that both parse
# a prompt cleanly (a JavaScript function header is also a valid C++ declaration).
_MARKERS = {
    "python": ("def ", "import ", "from ", "class "),
    "javascript": ("function ", "const ", "let ", "var ", "/**", "module.exports"),
    "go": ("package ", "func "),
    "cpp": ("#include", "using namespace", "template<", "template <"),
}
# Tried after a prompt when telling its language: a prompt ends inside the function it opened,
# at times inside a class around it, and no grammar calls an open block clean.
_PROMPT_CLOSERS = ("", "\n}\n", "\n}\n}\n")


@lru_cache(maxsize=None)
def installed_languages() -> tuple[str, ...]:
    """The languages whose grammar wheel imports here: the only ones a prompt can be told as."""
    return tuple(language for language in LANGUAGES
                 if importlib.util.find_spec(_GRAMMAR_MODULES[language]) is not None)


def _parses_cleanly(language: str, prompt: str) -> bool:
    parser = get_parser(language)
    return any(not parser.parse((prompt + closer).encode()).root_node.has_error
               for closer in _PROMPT_CLOSERS)


def guess_language(prompt: str) -> str | None:
    """The language a code prompt is written in, or None ("unknown").

    A wrong guess is worse than none: the gate would parse with the wrong grammar, refuse the
    right stop and let a later one through inside the excess. So a language is named only when
    the prompt parses cleanly in its grammar (once its open blocks are closed), and, where two
    grammars both do, when its line markers outnumber the other's. A prompt in a language with
    no grammar here parses cleanly in none and goes ungated."""
    candidates = [language for language in installed_languages() if _parses_cleanly(language, prompt)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    counts = {language: 0 for language in candidates}
    for line in prompt.splitlines():
        stripped = line.lstrip()
        for language in candidates:
            counts[language] += stripped.startswith(_MARKERS[language])
    best = max(counts.values())
    winners = [language for language, count in counts.items() if count == best]
    return winners[0] if best and len(winners) == 1 else None


MAX_LANGUAGE_NAME_CHARS = 64


def language_name_error(language: object) -> str | None:
    """Why `language` cannot name a request's language (None: it can; any name can, a grammar or not)."""
    if language is None or (isinstance(language, str) and 0 < len(language) <= MAX_LANGUAGE_NAME_CHARS):
        return None
    return (f"language must be a name of 1 to {MAX_LANGUAGE_NAME_CHARS} characters (any language; "
            f"the syntax gate parses {', '.join(LANGUAGES)}) or null, got {language!r:.80}")


@lru_cache(maxsize=256)  # once per name: a log line, not one per request
def _warn_ungated(language: str) -> None:
    logger.warning("GenGuard's syntax gate has no grammar for language %r; its stops go ungated "
                   "(grammars: %s)", language, ", ".join(LANGUAGES))


def gate_language(language: str | None, prompt: str) -> str | None:
    """The language a request's stops are parsed in: its own where a grammar exists, else the
    prompt's guess when it named none (None: the request goes ungated). Any name is accepted:
    a language with no grammar is not an error, it only goes ungated."""
    if language is None:
        return guess_language(prompt)
    if language in installed_languages():
        return language
    _warn_ungated(language)
    return None


def gate_check(policy, language: str | None, prompt: str, decode_kept):
    """The `is_complete` that `guard.policy.find_stop` takes for `policy`, bound as the engines
    bind it: num_kept -> does prompt + `decode_kept(num_kept)` parse as complete code in the
    request's language (named, else told from the prompt)? None without the gate; a request
    whose language is neither named nor told goes ungated (every stop passes), as in both engines."""
    if not policy.syntax_gate:
        return None
    language = gate_language(language, prompt)
    if language is None:
        return lambda num_kept: True
    return lambda num_kept: is_complete(language, prompt, decode_kept(num_kept), policy.syntax_gate_allows_stub)
