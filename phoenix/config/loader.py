"""Load a run config from YAML plus dotted ``key=value`` overrides.

Order of precedence (later wins): model preset file < recipe YAML < command-line
overrides. Values of overrides are parsed as YAML scalars, so ``train.steps=100`` is an
int and ``checkpoint.init_from=null`` is None. Relative paths are kept as written and
resolved against the working directory of the run, as in Megatron-LM.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Iterable

import yaml

from phoenix.config.schema import RunConfig
from phoenix.config.typed import ConfigError, apply_override, from_dict, to_dict

# configs/ sits next to the phoenix package in a source checkout.
CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-3`` as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)
                |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


# ``1e6`` (an integer mantissa, a non-negative exponent) is read as the integer it names, so
# integer fields take it, while ``4.0`` stays a float, which integer fields refuse
# (phoenix.config.typed): a fractional-looking count is more likely a slip than a count.
_SCIENTIFIC_INT = re.compile(r"^[-+]?[0-9][0-9_]*[eE]\+?[0-9]+$")
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in _Loader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789":  # ahead of the float resolver, which would match it too
    _Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:phoenix,2026:sciint", _SCIENTIFIC_INT))


def _scientific_int(loader, node) -> int:
    mantissa, _, exponent = loader.construct_scalar(node).replace("_", "").lower().partition("e")
    return int(mantissa) * 10 ** int(exponent)  # exact, unlike float()


_Loader.add_constructor("tag:phoenix,2026:sciint", _scientific_int)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from ``path``, read as the config loader reads it (``1e-3`` is a
    float, not PyYAML's string); ConfigError when missing, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        close = close_recipes(path)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"config file not found: {path}{hint}")
    try:
        data = _yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def close_recipes(path: str | os.PathLike, n: int = 3) -> list[str]:
    """YAML files under configs/ whose path or name is close to ``path`` (a typo, or the
    recipe's name without its folder), as the user would type them from the checkout."""
    if not CONFIGS_DIR.is_dir():
        return []
    known = sorted(p for p in CONFIGS_DIR.rglob("*.y*ml"))
    base = CONFIGS_DIR.parent
    typed = {os.path.relpath(p, base): p for p in known}  # configs/recipes/x.yaml
    wanted = str(path)
    close = difflib.get_close_matches(wanted, list(typed), n=n, cutoff=0.75)
    if not close:  # a bare or misplaced name: match the file names alone
        by_name = {p.name: rel for rel, p in typed.items()}
        close = [by_name[m] for m in difflib.get_close_matches(Path(wanted).name, list(by_name),
                                                               n=n, cutoff=0.75)]
    return close


def resolve_model_preset(preset: str) -> Path:
    """A preset is a path to a YAML file or the name of one in configs/model/."""
    candidate = Path(preset)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    named = CONFIGS_DIR / "model" / f"{preset}.yaml"
    if named.is_file():
        return named
    known = sorted(p.stem for p in (CONFIGS_DIR / "model").glob("*.yaml"))
    raise ConfigError(f"model.preset: unknown preset '{preset}' (known: {', '.join(known)})")


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, object]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith("-"):
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        try:
            value = _yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def build_config(data: dict, overrides: Iterable[str] = ()) -> RunConfig:
    """Build a validated RunConfig from plain data and dotted overrides."""
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides):
        apply_override(data, key, value)
    model = data.get("model")
    if isinstance(model, dict) and model.get("preset"):
        preset = read_yaml(resolve_model_preset(model["preset"]))
        merged = {**preset, **model}
        # model.moe merges key by key, so `model.moe.aux_loss_coeff=0` on a MoE preset
        # changes one setting instead of replacing the preset's whole moe section.
        if isinstance(preset.get("moe"), dict) and isinstance(model.get("moe"), dict):
            merged["moe"] = {**preset["moe"], **model["moe"]}
        data["model"] = merged
    return from_dict(RunConfig, data)


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
    """Load ``path`` (a recipe YAML), apply overrides, validate, return the typed config."""
    data = read_yaml(path)  # its errors name the path already
    try:
        return build_config(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


# Keys renamed since a config could have been saved next to a checkpoint: old path -> new
# path (a new path may nest deeper, e.g. model.rotary_base -> model.rope.base).
_SAVED_RENAMES = {("data", "num_workers"): ("data", "prefetch_batches"),
                  ("model", "rotary_base"): ("model", "rope", "base")}


def load_saved_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> RunConfig:
    """A ``config.yaml`` written by an earlier run (e.g. next to a checkpoint): keys renamed
    since then are read under their new names instead of refused; ``overrides`` (dotted
    ``key=value``) apply after the renames."""
    data = read_yaml(path)
    for (section, old), new_path in _SAVED_RENAMES.items():
        if isinstance(data.get(section), dict) and old in data[section]:
            value = data[section].pop(old)
            node = data
            for part in new_path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node.setdefault(new_path[-1], value)
    try:
        return build_config(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_config(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (what is saved next to checkpoints)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
