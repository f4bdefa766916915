"""Command-line plumbing the commands share: config files under flags, logging set-up, progress display."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO


class ConfigFileError(ValueError):
    """A --config file cannot be read or names an unknown setting."""


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML or JSON file (chosen by suffix; TOML otherwise)."""
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as error:
        raise ConfigFileError(f"cannot read --config {path}: {error.strerror}") from None
    try:
        values = json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigFileError(f"--config {path} is not valid {'JSON' if file.suffix.lower() == '.json' else 'TOML'}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigFileError(f"--config {path} must hold a table of settings")
    return values


def file_arguments(parser: argparse.ArgumentParser, values: dict[str, Any], source: str) -> list[str]:
    """Turn config-file settings into command-line arguments, so argparse checks their types and choices."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    arguments: list[str] = []
    for key, value in values.items():
        dest = key.replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("help", "config"):
            known = ", ".join(sorted(name.replace("_", "-") for name in actions if name not in ("help", "config")))
            raise ConfigFileError(f"{source}: unknown setting {key!r}; known settings: {known}")
        flag = next(option for option in action.option_strings if option.startswith("--"))
        if value is None:
            continue  # null means "the default", as in a saved config.json
        if isinstance(action, argparse.BooleanOptionalAction):
            arguments.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if bool(value) != bool(action.default):
                arguments.append(flag)
        elif isinstance(value, list):
            for item in value:
                arguments += [flag, str(item)]
        else:
            arguments += [flag, str(value)]
    return arguments


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv, reading --config FILE first; flags on the command line override the file."""
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON file of settings (keys are flag names); flags given here win")
    argv = list(sys.argv[1:] if argv is None else argv)
    path = flag_value(argv, "--config")
    if path is None:
        return parser.parse_args(argv)
    try:
        from_file = file_arguments(parser, read_config_file(path), path)
    except ConfigFileError as error:
        parser.error(str(error))
    return parser.parse_args([*from_file, *argv])


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of `flag` in argv, found without parsing anything else."""
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None


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


class StatusLine:
    """One line rewritten in place on a terminal; silent when output is not a terminal or --quiet."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
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
