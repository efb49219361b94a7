"""Atomic, safe checkpoint files: safetensors for weights, never arbitrary unpickling."""
from __future__ import annotations

import argparse
import contextlib
import pickle
from collections import OrderedDict
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from core.errors import StateDictMismatch, UserError
from core import faults


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it onto `path` only if the block succeeds.

    Works for files and folders, so a crash never leaves a half-written checkpoint behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        faults.point("atomic")
        if path.is_dir() and target.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict atomically; tensors are made contiguous and de-aliased first."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    return load_file(str(path))


# The only globals beyond torch's weights-only defaults that a Lightning checkpoint may need: Lightning's
# AttributeDict (a dict subclass holding ``hyper_parameters``), under the names Lightning has used, read as a plain
# OrderedDict (no Lightning code is imported or run; the weights-only unpickler fills only plain dict types).
# Anything else (functools.partial, a user's class) is refused.
LIGHTNING_SAFE_GLOBALS = [(OrderedDict, name) for name in (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)]
# Plus argparse.Namespace, the command-line arguments that training scripts save next to the weights (JiT's
# checkpoints hold one under 'args'): an attribute bag, rebuilt by filling its __dict__ with values the weights-only
# unpickler has already restricted, so no code of the file runs.
SAFE_GLOBALS = [*LIGHTNING_SAFE_GLOBALS, argparse.Namespace]


def load_torch_weights(path: str | Path) -> dict:
    """An official `.pt`/`.ckpt` release (a Lightning `.ckpt` too) or a `.safetensors` state dict, read without
    running pickled code: ``torch.load(weights_only=True)`` with ``SAFE_GLOBALS`` allowed. A file that needs any other
    global is refused with a UserError naming the globals."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001  (not a zip checkpoint: torch's own message says what it met)
            needed = []
        allowed = {name for _, name in LIGHTNING_SAFE_GLOBALS} | {"argparse.Namespace"}
        names = [g for g in needed if g not in allowed] or [str(e).split("Unsupported global: ")[-1].split(" was")[0]]
        raise UserError(
            f"{path}: loading it would need unpickling {', '.join(names)}, which can run code; refused (only "
            "tensors, plain containers, Lightning's AttributeDict and argparse.Namespace are read). If you trust the "
            "file, extract ckpt['state_dict'] where it can be unpickled and save that (torch.save or safetensors)"
        ) from e


def check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a state dict with a missing or unexpected key, or a shape that differs."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:5]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with wrong shapes (e.g. {k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)})"
            )
        raise StateDictMismatch(f"{what}: state dict does not match the model: " + "; ".join(parts))
