"""Errors that carry a message meant for the user, not a traceback."""

from __future__ import annotations


class DataError(ValueError):
    """The input data cannot give what the configuration asks for; the message says which file or class and why."""
