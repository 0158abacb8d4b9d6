"""Errors shared across packages (pure). A user's bad input is reported by message, never by traceback."""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be used: an unreadable file, a missing column, a row that makes no example, too few
    rows for one batch. The message names the file, row and column where they are known."""
