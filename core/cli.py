"""The command-line boundary every `python -m` command goes through: help, one-line errors, exit status 2.

    if __name__ == "__main__":
        cli.run(main)

`run` calls `main(sys.argv[1:])`. An expected failure (`core.errors.UserError` and its kinds, a
config error, a missing file, a full disk, an argument error) prints one line, `error: <message>`,
and exits with status 2; `LATENTKIT_DEBUG=1` prints the traceback as well. Anything else is a bug
and keeps Python's traceback (status 1). Commands that take `key=value` config overrides build
their `--help` from the YAML files (`config_help`): the keys with their one-line comments.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import OmegaConf

from core.config import CONFIG_DIR, available
from core.errors import UserError

DEBUG_ENV = "LATENTKIT_DEBUG"
EXIT_USAGE = 2


class UsageError(UserError):
    """A command line that does not parse."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as a UsageError (one `error:` line) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")


def expected(e: BaseException) -> bool:
    if isinstance(e, (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return True
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {e.filename}" if e.filename else ""
        text = f"the disk is full{where} ({e.strerror or e}); nothing half-written was marked complete: free space and run the same command to resume"
    else:
        text = str(e) if not isinstance(e, KeyError) else str(e.args[0]) if e.args else repr(e)
    return " ".join(text.split())


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run a command's `main` with the process's arguments; see the module docstring."""
    try:
        main(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        if isinstance(e.code, str):  # a message, as argparse and older code raise it
            print(f"error: {' '.join(e.code.removeprefix('error:').split())}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE) from None
        raise
    except KeyboardInterrupt:
        print("error: interrupted; run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if not expected(e):
            raise
        if os.environ.get(DEBUG_ENV) == "1":
            traceback.print_exc()
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def wants_help(argv: Iterable[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


# --- help built from the YAML -----------------------------------------------------------------------

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


def key_comments(path: str | Path) -> list[tuple[str, str]]:
    """(dotted key, its inline comment) for every key of a block-style YAML file, in file order."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    for line in Path(path).read_text().splitlines():
        m = _KEY.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [m["key"]])
        value, _, comment = m["rest"].partition(" #")
        out.append((dotted, value.strip() + (f"  # {comment.strip()}" if comment.strip() else "")))
        stack.append((indent, m["key"]))
    return out


def config_help(group: str, family: str | None = None) -> str:
    """The keys of configs/<group>/base.yaml and of the family file, each with its value and one-line comment; for a
    staged family file (FAE), one line per stage with what `stage=<name>` sets instead of its `stages` section."""
    files = [CONFIG_DIR / group / "base.yaml"] + ([CONFIG_DIR / group / f"{family}.yaml"] if family else [])
    merged: dict[str, str] = {}
    for f in files:
        for key, text in key_comments(f):
            if key != "stages" and not key.startswith("stages."):
                merged[key] = text
    width = max(len(k) for k in merged)
    lines = [f"keys (key=value; documented in {', '.join(str(f.relative_to(CONFIG_DIR.parent)) for f in files)}):"]
    lines += [f"  {k.ljust(width)}  {v}".rstrip() for k, v in merged.items()]
    stages = OmegaConf.load(files[-1]).get("stages") if family else None
    if stages:
        lines += ["", "stages (stage=<name> applies its recipe over the keys above; the command line comes after it):"]
        lines += [f"  {name}: " + " ".join(f"{k}={v}" for k, v in _dotted(OmegaConf.to_container(part)))
                  for name, part in stages.items()]
    return "\n".join(lines)


def _dotted(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def groups_help(*groups: str) -> str:
    """The names a config group offers (configs/<group>/*.yaml), one line per group."""
    return "\n".join(f"  {g}: {', '.join(available(g)) or 'none'}  (configs/{g}/)" for g in groups)
