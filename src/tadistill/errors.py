"""User-facing errors.

Every mistake a user can make (a bad config key, a teacher that does not exist, a layer mapping out of
range, an empty corpus ...) raises a subclass of ``TadistillError`` with a one-line message that says
what to do. The CLI prints ``error: <message>`` and exits with status 2, without a traceback; the
Python API lets the exception propagate so that callers can catch it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TadistillError(Exception):
    """Base class of the errors a user can fix; the message is one line and says what to do."""


class ConfigError(TadistillError):
    """A config key, value or recipe is wrong."""


class ModelError(TadistillError):
    """A teacher or student cannot be loaded, built or understood."""


class ArchitectureError(ModelError):
    """The model's internals (layers, Q/K/V projections ...) could not be resolved."""


class DataError(TadistillError):
    """The corpus is missing, unreadable or empty."""


class RunDirError(TadistillError):
    """The output directory holds another run, or a run cannot be resumed from it."""


class TrainingError(TadistillError):
    """Training had to stop (for example a loss that is NaN or infinite)."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
