"""The errors normlab raises: one base class, a ``ValueError``, and its few kinds.

Every message says the rule, what was received (the pattern and the input shape) and how
to fix it.
"""

from __future__ import annotations

__all__ = ["NormlabError", "PatternSyntaxError", "ShapeError", "ParamsError", "InputError"]


class NormlabError(ValueError):
    """Base class of every error normlab raises on bad input."""


class PatternSyntaxError(NormlabError):
    """The pattern text is not valid notation; the message points at the fault with a caret.
    ``subject`` names the argument the text came from: ``"pattern"``, or ``"params"`` and
    ``"modulation"``, whose axes use the same notation (``pattern`` then holds their text)."""

    def __init__(self, pattern: str, position: int, message: str, subject: str = "pattern"):
        self.pattern = pattern
        self.position = position
        self.message = message
        self.subject = subject
        caret = " " * position + "^"
        # every whitespace character separates alike; shown as one space, a tab, a newline or a
        # wide space cannot push the pattern away from the caret under it
        shown = "".join(" " if char.isspace() else char for char in pattern)
        super().__init__(f"{message}\n    {shown}\n    {caret}")

    def on_input(self, where: str) -> PatternSyntaxError:
        """This error with ``where`` (the pattern and the input shape) closing its first line."""
        return type(self)(self.pattern, self.position, f"{self.message} ({where})", self.subject)

    def __reduce__(self):
        # pickled (a worker process hands it to its pool) with the arguments __init__ takes;
        # the default, the message alone, cannot be unpickled
        return type(self), (self.pattern, self.position, self.message, self.subject)


class ShapeError(NormlabError):
    """The pattern does not fit the input: rank, sizes or divisibility."""


class ParamsError(NormlabError):
    """``weight``, ``bias`` or ``params`` disagree with the pattern or with each other."""


class InputError(NormlabError):
    """The input itself is unusable: wrong dtype, or too few values to train on."""
