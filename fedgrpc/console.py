"""What a person at the terminal sees: log lines with the role in each, and the live status line kept clear of them."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TextIO

# A log line is at most this long: a configuration dump fits, a peer's megabyte of text does not.
MAX_LOGGED_CHARS = 8000


def printable(text: str, limit: int = MAX_LOGGED_CHARS) -> str:
    """Text from a peer or a file made safe to show: control and line-breaking characters escaped (a newline shows as
    \\n, an escape sequence as \\x1b), at most `limit` characters kept."""
    shown = "".join(character if character.isprintable() else repr(character)[1:-1] for character in text[:limit])
    return shown + ("..." if len(text) > limit else "")


class EscapingFormatter(logging.Formatter):
    """Every record is one line: its message passes printable(), whatever text a peer put into it (an address, a
    tensor name, a status detail, a learner's answer), so no peer can forge a record or drive the terminal.

    Tracebacks of our own errors follow on their own lines, as usual.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = printable(record.message)
        return super().formatMessage(safe)


class JsonFormatter(logging.Formatter):
    """One JSON object per record and line (time, role, level, logger, message; a traceback under "error"), for
    tools that parse logs: JSON escapes every control character, and the message is cut as in text logs."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "role": self.role,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage()[:MAX_LOGGED_CHARS],
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


def setup_logging(role: str, verbose: bool, quiet: bool = False, log_file: Path | None = None, log_format: str = "text") -> None:
    """Log to stderr (and optionally a file) with the role in every record: escaped text lines (EscapingFormatter),
    or JSON lines (JsonFormatter)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        handlers.append(file_handler)
    handlers[0].setLevel(level)
    formatter = JsonFormatter(role) if log_format == "json" else EscapingFormatter(f"%(asctime)s {role} %(levelname)s %(message)s")
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=min(level, logging.INFO), handlers=handlers)


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
