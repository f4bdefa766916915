"""What a person at the terminal sees: log lines with the role in each, and the live status line kept clear of them."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO


def setup_logging(role: str, verbose: bool, quiet: bool = False, log_file: Path | None = None) -> None:
    """Log to stderr (and optionally a file) with the role in every line."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        handlers.append(file_handler)
    handlers[0].setLevel(level)
    logging.basicConfig(level=min(level, logging.INFO), format=f"%(asctime)s {role} %(levelname)s %(message)s", handlers=handlers)


class StatusLine(logging.Filter):
    """One line rewritten in place on a terminal; silent when output is not a terminal or --quiet.

    Also a logging filter: added to the console handler (`keep_logs_apart`), it takes the live line away
    before each log line prints, so that no log line is glued onto it; the next show() draws it again.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._width = 0

    def show(self, text: str) -> None:
        """Replace the current line with `text`."""
        if not self.enabled:
            return
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        """Erase the line so that log lines print cleanly."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """A log line is about to print on our stream: clear the live line first."""
        self.clear()
        return True

    def keep_logs_apart(self) -> None:
        """Add this line as a filter to the root logger's handlers that write to its stream."""
        for handler in logging.getLogger().handlers:
            if (
                isinstance(handler, logging.StreamHandler)
                and not isinstance(handler, logging.FileHandler)
                and handler.stream is self.stream
            ):
                handler.addFilter(self)
