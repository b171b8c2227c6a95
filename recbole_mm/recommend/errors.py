"""The errors and warning of :mod:`recbole_mm.recommend` (one line each, reported by the CLI)."""

from __future__ import annotations


class RecommendError(ValueError):
    """Recommending cannot go on; the message says why (reported without a traceback by the CLI)."""


class UnknownItemError(RecommendError, KeyError):
    """``strict=True`` and a history holds ids that are not in the catalogue."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class EmptyHistoryError(RecommendError):
    """A history is empty (given so, or after its unknown ids were skipped)."""


class CatalogueError(RecommendError):
    """A catalogue cannot be used with this model (transductive model, feature size, size mismatch)."""


class UnknownItemWarning(UserWarning):
    """Ids of a history are not in the catalogue and were skipped."""
