"""Config composition: base <- family <- preset <- `key=value` overrides (DESIGN §4).

Every key a preset or override sets must already exist in base or family; an unknown key
stops the command before any work with a message naming the nearest valid key. `data=<name>`
replaces the `data` mapping by the group file ``configs/data/<name>.yaml`` before other overrides.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from core.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A config file, group name, key or value that does not exist or does not fit."""


def load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return cfg


def named_config(group: str, name: str) -> DictConfig:
    """`configs/<group>/<name>.yaml`, or `name` itself when it is a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return load_yaml(name)
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        choices = available(group)
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"no {group} config named {name!r} ({CONFIG_DIR / group}); {hint}available: "
                          f"{', '.join(choices) or 'none'}")
    return load_yaml(path)


def available(group: str) -> list[str]:
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base") if folder.is_dir() else []


def dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    keys: list[str] = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            keys.extend(dotted_keys(cfg._get_node(k), full + "."))
    return keys


def open_paths(cfg: Any, prefix: str = "") -> list[str]:
    """Mappings that are free-form (an empty dict such as `model.options`): any key may go below them.
    Walks the nodes without resolving them (`${latent}` in run.dir is only set later)."""
    paths: list[str] = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            node = cfg._get_node(k)
            if _is_open(node):
                paths.append(f"{prefix}{k}")
            paths.extend(open_paths(node, f"{prefix}{k}."))
    return paths


def _check_known(schema: DictConfig, update: DictConfig, where: str, free: Iterable[str] = ()) -> None:
    known = set(dotted_keys(schema))
    free = set(free) | set(open_paths(schema))
    unknown = [k for k in dotted_keys(update) if k not in known and not any(k.startswith(p + ".") for p in free)]
    for key in unknown:
        if not any(other.startswith(key + ".") for other in unknown):  # name the whole key, not its first part
            close = nearest_key(key, known)
            hint = f"; did you mean '{close}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}' in {where}{hint}")


def nearest_key(key: str, known: Iterable[str]) -> str | None:
    """The valid key a mistyped dotted key most likely meant. Keys the typo ends with come first
    (`generator.train.lr` -> `train.lr`: a stage name written in front), then keys with the same
    last part (`train.lr` -> `optim.lr`), then the closest spelling."""
    known = sorted(known)
    suffix = [k for k in known if key.endswith("." + k)]
    if suffix:
        return max(suffix, key=len)
    last = key.rsplit(".", 1)[-1]
    same_last = [k for k in known if k.rsplit(".", 1)[-1] == last]
    if same_last:
        return max(same_last, key=lambda k: difflib.SequenceMatcher(None, key, k).ratio())
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.4)
    return close[0] if close else None


def _is_open(node: Any) -> bool:
    return isinstance(node, DictConfig) and len(node) == 0


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        pairs.append((key.strip(), _parse_value(value)))
    return pairs


def _parse_value(value: str) -> Any:
    """YAML typing for command-line values: `lr=1e-4` is a float, `size=[1,2]` a list."""
    return OmegaConf.create(f"v: {value}").v if value.strip() else ""


def compose(
    group: str,
    family: str | None = None,
    preset: str | None = None,
    overrides: Iterable[str] = (),
) -> DictConfig:
    """Compose the config of one command.

    group: folder under configs/ holding ``base.yaml`` and the family files (tokenizer, generator, ...).
    """
    cfg = load_yaml(CONFIG_DIR / group / "base.yaml")
    free = open_paths(cfg)  # free-form in base (model.options) stays so after a family file or preset fills it
    if family is not None:
        # A family file may add its own keys (its model's options); later layers may not.
        cfg = OmegaConf.merge(cfg, named_config(group, family))
        free += [p for p in open_paths(cfg) if p not in free]
    pairs = parse_overrides(overrides)
    sections = [group, family]
    if family is not None and "stages" in cfg:
        cfg, pairs = _select_stage(cfg, pairs, family, free)
        sections.append(f"{family}_{cfg.stage}")

    # Group selection first, so `data=imagenet data.root=/x` works in either order.
    rest = []
    for key, value in pairs:
        if key == "data" and isinstance(value, str) and isinstance(cfg.get(key), DictConfig):
            cfg[key] = named_config("data", value)
        else:
            rest.append((key, value))

    if preset is not None:
        cfg = _apply_preset(cfg, preset, sections, free)

    return apply_overrides(cfg, rest, free=free)


def apply_overrides(cfg: DictConfig, pairs: Iterable[tuple[str, Any]], where: str = "the command line",
                    free: Iterable[str] = ()) -> DictConfig:
    """Set `key=value` pairs (from `parse_overrides`) on `cfg`; a key it lacks is an error
    unless it lies below a free-form mapping (`free`, or an empty mapping of `cfg`)."""
    free = list(free)
    for key, value in pairs:
        _check_known(cfg, OmegaConf.from_dotlist([f"{key}=x"]), where, free)
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def _select_stage(cfg: DictConfig, pairs: list[tuple[str, Any]], family: str,
                  free: list[str]) -> tuple[DictConfig, list[tuple[str, Any]]]:
    """A staged family file (FAE) holds its stages' recipes under ``stages``; ``stage=<name>`` (else the file's
    ``stage``) picks one, merged over the family file and under presets and the command line. The config keeps
    the chosen ``stage``, not the other recipes."""
    stages = cfg.pop("stages")
    chosen = [value for key, value in pairs if key == "stage"]
    name = chosen[-1] if chosen else cfg.get("stage")
    if name not in stages:
        raise ConfigError(f"stage={name}: {family} has no such stage; choose from {', '.join(stages)}")
    _check_known(cfg, stages[name], f"{family}.yaml [stages.{name}]", free)
    cfg = OmegaConf.merge(cfg, stages[name])
    cfg.stage = name
    return cfg, [(key, value) for key, value in pairs if key != "stage"]


def _apply_preset(cfg: DictConfig, preset: str, sections: list[str | None], free: list[str]) -> DictConfig:
    """A preset file holds sections named after a config group (``tokenizer``), a family (``vavae``) or a staged
    family's stage (``fae_pixel``), applied in that order. A preset may not pick the stage: its recipe is chosen first."""
    doc = named_config("preset", preset)
    where = preset if preset.endswith((".yaml", ".yml")) else f"preset/{preset}.yaml"
    for section in sections:
        if section is not None and section in doc:
            part = doc[section]
            if "stages" in part or ("stage" in part and "stage" in cfg):
                raise ConfigError(f"{where} [{section}]: a staged family's stage is chosen by stage=<name> "
                                  "on the command line, not by a preset")
            _check_known(cfg, part, f"{where} [{section}]", free)
            cfg = OmegaConf.merge(cfg, part)
    return cfg


def to_dict(cfg: DictConfig | ListConfig) -> Any:
    return OmegaConf.to_container(cfg, resolve=True)


def split_cli(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    """Separate `preset=NAME` and other `key=value` items from positional words."""
    positional, preset, overrides = [], None, []
    for item in argv:
        if item.startswith("preset="):
            preset = item.split("=", 1)[1]
        elif "=" in item and not item.startswith("-"):
            overrides.append(item)
        else:
            positional.append(item)
    return positional, preset, overrides
