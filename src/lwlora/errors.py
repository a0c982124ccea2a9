"""Errors that the CLI turns into a one-line message and exit status 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input. ``flag`` is the CLI flag (or argument) the user must change."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        self.message = message
        super().__init__(f"{flag}: {message}")
