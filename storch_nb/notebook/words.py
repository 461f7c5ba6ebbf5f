"""Splitting the option line of ``%%storch`` into words: quotes and brackets
keep an estimator's text together (``-e score(baseline='rloo', n=4)``), and
``--compare`` lists split at top-level commas only."""

from __future__ import annotations

import ast

from IPython.core.error import UsageError

__all__ = ["split_options", "split_top_level"]


def _unquote(token: str) -> str:
    """Strip one pair of quotes that wraps the whole token (``"a b"`` -> ``a b``)."""
    if len(token) >= 2 and token[0] in "'\"" and token[-1] == token[0]:
        try:
            value = ast.literal_eval(token)
        except (ValueError, SyntaxError):
            return token
        if isinstance(value, str):
            return value
    return token


def _quote_end(line: str, i: int) -> int:
    """The index after the quote that closes the one at ``line[i]`` (backslashes escape)."""
    quote, j = line[i], i + 1
    while j < len(line):
        if line[j] == "\\":
            j += 2
        elif line[j] == quote:
            return j + 1
        else:
            j += 1
    raise UsageError(f"unclosed quote {quote} in the options: {line.strip()}")


def _depth(depth: int, ch: str, line: str) -> int:
    """The bracket depth after ``ch``."""
    if ch in "([{":
        return depth + 1
    if ch in ")]}":
        if depth == 0:
            raise UsageError(f"unbalanced {ch!r} in the options: {line.strip()}")
        return depth - 1
    return depth


def _tokens(line: str) -> list[str]:
    """Words split at whitespace outside quotes and brackets (quotes kept)."""
    tokens: list[str] = []
    buf: list[str] = []
    depth = i = 0
    while i < len(line):
        ch = line[i]
        if ch in "'\"":
            end = _quote_end(line, i)
            buf.append(line[i:end])
            i = end
            continue
        if ch.isspace() and depth == 0:
            if buf:
                tokens.append("".join(buf))
                buf = []
        else:
            depth = _depth(depth, ch, line)
            buf.append(ch)
        i += 1
    if depth > 0:
        raise UsageError(f"unclosed bracket in the options: {line.strip()}")
    if buf:
        tokens.append("".join(buf))
    return tokens


def split_options(line: str) -> list[str]:
    """Split an option line into words, keeping quotes and brackets together.

    Unlike a shell, quotes inside a word are kept (``score(baseline='rloo')``
    stays as it is), whitespace inside brackets does not split
    (``score(baseline='rloo', n=4)`` is one word), and a word wholly in quotes
    loses them (``"score(baseline='rloo')"``). ``--name=value`` becomes
    ``--name value``.
    """
    words: list[str] = []
    for tok in _tokens(line):
        if tok.startswith("-") and "=" in tok:
            key, value = tok.split("=", 1)
            if key.startswith("--") or len(key) == 2:
                words.extend([key, _unquote(value)])
                continue
        words.append(_unquote(tok))
    return words


def split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets and quotes."""
    parts, buf, depth, quote = [], [], 0, None
    for ch in text:
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(buf).strip())
            buf = []
            continue
        buf.append(ch)
    parts.append("".join(buf).strip())
    return [p for p in parts if p]
