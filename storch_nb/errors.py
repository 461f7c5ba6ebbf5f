"""Errors for people: each names the story line, points at it with a caret and says what to do.

``StoryError`` is the base class; it is an ordinary exception (so nbval and nbclient
see a real error), and its ``_render_traceback_`` makes IPython show only the story
message instead of a Python traceback.
"""

from __future__ import annotations

__all__ = ["StoryError", "StorySyntaxError", "StoryNameError", "EstimatorError"]


class StoryError(Exception):
    """Base class of every error about a story.

    Attributes
    ----------
    lineno : 1-based line within the story text given to ``Story`` (or ``None``).
    col : 0-based column of the offending token on that line (or ``None``).
    line : the text of that line (or ``None``).
    hint : what to do instead (or ``None``).
    """

    def __init__(
        self,
        message: str,
        *,
        lineno: int | None = None,
        col: int | None = None,
        line: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.lineno = lineno
        self.col = col
        self.line = line
        self.hint = hint
        #: lines added before the story when shown (the ``%%storch`` line in a notebook)
        self.line_offset = 0

    def located(self, lineno: int | None, line: str | None, col: int | None = None) -> StoryError:
        """Fill in the location if it is not known yet; return self."""
        if self.lineno is None and lineno is not None:
            self.lineno, self.line = lineno, line
            if self.col is None:
                self.col = col
        return self

    def render(self) -> str:
        """The message as a person reads it: location, the line, a caret, the hint."""
        out = []
        kind = type(self).__name__
        if self.lineno is not None:
            out.append(f"{kind}: line {self.lineno + self.line_offset}: {self.message}")
        else:
            out.append(f"{kind}: {self.message}")
        if self.line is not None:
            text = self.line.rstrip("\n")
            if len(text) > 200:
                text = text[:200] + " ..."
            out.append(f"    {text}")
            indent = len(text) - len(text.lstrip())
            col = self.col if self.col is not None else indent
            col = max(0, min(col, len(text)))
            out.append("    " + " " * col + "^")
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()

    def _render_traceback_(self) -> list[str]:
        """IPython calls this instead of printing a traceback."""
        return self.render().split("\n")


class StorySyntaxError(StoryError):
    """The story text is not in the story language."""


class StoryNameError(StoryError):
    """A name in the story is not defined in the story, the namespace or the helpers."""


class EstimatorError(StoryError):
    """An estimator does not fit a site (or its options are wrong)."""
