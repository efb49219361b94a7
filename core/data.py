"""Data configs on the command line: `--data <name | YAML path>` with `data.key=value` overrides.

A data config (configs/data/<name>.yaml) is what `core.images.build_source` turns into images.
"""
from __future__ import annotations

import argparse
from typing import Iterable

from omegaconf import DictConfig

from core.config import ConfigError, apply_overrides, available, named_config, parse_overrides


def load_data_config(name: str, overrides: Iterable[str] = ()) -> DictConfig:
    """A data config by name or YAML path, with `data.key=value` overrides (unknown keys are an error)."""
    pairs = parse_overrides(overrides)
    for key, value in pairs:
        if not key.startswith("data."):
            raise ConfigError(f"override {key}={value}: only data.<key>=<value> overrides are accepted here")
    return apply_overrides(named_config("data", name), [(k[len("data."):], v) for k, v in pairs], "the command line (data.*)")


def data_epilog() -> str:
    """What `--help` says of the data configs and their keys."""
    return (f"data configs (--data NAME): {', '.join(available('data'))}, or a YAML path.\n"
            "data.KEY=VALUE overrides a key of that config (its keys and their comments: configs/data/<name>.yaml),\n"
            "e.g. data.root=/path/to/images data.image_size=512")


def parse_data_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The parsed options and the `data.key=value` items among `argv`; anything else is an error."""
    args, rest = parser.parse_known_args(argv)
    if bad := [o for o in rest if not o.startswith("data.") or "=" not in o]:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (only data.key=value overrides are accepted)")
    return args, rest
