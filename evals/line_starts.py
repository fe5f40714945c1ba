"""Line starts as the guard's line-start rule sees them: the mean p_stop over a line's first code
tokens, for the margins its threshold leaves on labeled completions."""
from __future__ import annotations

MAX_WINDOW = 3  # code tokens a line-start window may span here


def line_start_means(sample: dict, labels: list[int]) -> list[tuple[float, int, bool, str]]:
    """(mean p_stop of the line's first n code tokens, n, is the line expected, its text so far)
    for n = 1..MAX_WINDOW of every line; whitespace tokens do not count, as in the policy."""
    rows, code, start = [], [], 0
    texts = sample["texts"]
    for i, text in enumerate(texts):
        token = text[start:]
        start = len(text)
        if token.strip():
            code.append(i)
            if len(code) <= MAX_WINDOW:
                line_from = len(texts[code[0] - 1]) if code[0] else 0
                mean = sum(sample["p_stop"][j] for j in code) / len(code)
                rows.append((mean, len(code), labels[code[0]] == 1, text[line_from:]))
        if "\n" in token:
            code = []
    return rows

