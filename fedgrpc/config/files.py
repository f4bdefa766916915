"""Files under the command line: config files (TOML or JSON settings turned into flags, so that argparse checks them)
and the enrolment secret's."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedgrpc.config.choices import ENROLMENT_ENV


class ConfigFileError(ValueError):
    """A --config file cannot be read or names an unknown setting."""


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML or JSON file (chosen by suffix; TOML otherwise)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")  # what TOML and JSON files are written in, whatever the locale
    except OSError as error:
        raise ConfigFileError(f"cannot read --config {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigFileError(f"--config {path} is not UTF-8 text: byte {error.start} is {error.object[error.start]:#04x}") from None
    try:
        values = json.loads(text) if file.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # the decoders' errors, an integer of over 4300 digits, nesting too deep
        raise ConfigFileError(f"--config {path} is not valid {'JSON' if file.suffix.lower() == '.json' else 'TOML'}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigFileError(f"--config {path} must hold a table of settings")
    return values


def file_arguments(parser: argparse.ArgumentParser, values: dict[str, Any], source: str) -> list[str]:
    """Turn config-file settings into command-line arguments, so argparse checks their types and choices.

    A key is any of a flag's long names, with `-` or `_` (an old name such as `compress` still works).
    """
    actions = {
        option[2:].replace("-", "_"): action for action in parser._actions for option in action.option_strings if option.startswith("--")
    }
    arguments: list[str] = []
    for key, value in values.items():
        action = actions.get(key.replace("-", "_"))
        if action is None or action.dest in ("help", "config"):
            known = ", ".join(sorted({a.dest.replace("_", "-") for a in actions.values()} - {"help", "config"}))
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


def read_enrolment_token(token_file: str | None) -> str | None:
    """The enrolment secret from --token-file, else $FL_ENROLMENT_TOKEN (kept out of `ps` output), else None."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read --token-file {token_file}: {error.strerror}") from None
        if not token:
            raise ValueError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get(ENROLMENT_ENV) or None
