"""Recipes: an ordered list of pass configs, YAML I/O, overrides.

A recipe in YAML::

    seed: 0
    passes:
      - rtn:
          scheme: {bits: 4, group_size: 64, symmetric: false}
          ignore: [lm_head]

Every config is a frozen, keyword-only dataclass; :func:`config_from_dict`
rejects unknown keys with a suggestion, so a typo fails loudly. The pass
registry lives in :mod:`compressor.core.passes`; importing this module imports
:mod:`compressor.passes`, whose explicit list registers every built-in pass.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import compressor.passes  # noqa: F401  (fills the registry: the explicit list of built-in passes)
from compressor.core.passes import Pass, PassConfig, config_from_dict, registered_passes

__all__ = ["Recipe", "apply_overrides", "load_yaml", "registered_passes"]


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``5e-5`` as a float, as YAML 1.2 does.

    PyYAML follows YAML 1.1, whose float pattern needs a dot: ``lr: 5e-5`` would
    load as the *string* ``"5e-5"`` and fail the config's number check.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text as :func:`yaml.safe_load` does, but with ``1e-4`` a float.

    Used for recipe files and ``key=value`` overrides alike.
    """
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


# ---------------------------------------------------------------- recipe


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """An ordered list of pass configs plus run-wide settings.

    Attributes:
        passes: ``(name, config)`` pairs in execution order.
        seed: seed for every random choice of the run.
    """

    passes: tuple[tuple[str, PassConfig], ...] = ()
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        if not isinstance(data, dict):
            raise ValueError(f"a recipe is a mapping with a 'passes' list, got {type(data).__name__}")
        unknown = set(data) - {"passes", "seed"}
        if unknown:
            raise ValueError(f"unknown recipe key(s) {sorted(unknown)}: a recipe has 'passes' and 'seed'")
        registry = registered_passes()
        passes = []
        for i, entry in enumerate(data.get("passes") or []):
            if not isinstance(entry, dict) or len(entry) != 1:
                raise ValueError(f"passes[{i}]: write each pass as '- name: {{config}}', got {entry!r}")
            (name, body), = entry.items()
            if name not in registry:
                close = difflib.get_close_matches(name, list(registry), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"passes[{i}]: unknown pass {name!r}.{hint} Known passes: {', '.join(sorted(registry))}")
            passes.append((name, config_from_dict(registry[name].config_cls, body or {}, f"passes[{i}].{name}")))
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        return cls(passes=tuple(passes), seed=seed)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "passes": [{name: cfg.to_dict()} for name, cfg in self.passes]}

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        try:
            data = load_yaml(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"recipe {path} is not valid YAML: {err}") from None
        return cls.from_dict(data or {})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def build(self) -> list[Pass]:
        """Instantiate the passes."""
        registry = registered_passes()
        return [registry[name](cfg) for name, cfg in self.passes]


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides to a recipe mapping (a deep copy is returned).

    Keys are dotted paths. The first component after ``passes`` may be an
    index or a pass name (``rtn.scheme.bits=3`` is ``passes.<rtn>.scheme.bits``).
    Values are parsed as YAML (``true``, ``3``, ``5e-5``, ``[a, b]``).
    A mapping two passes share (a YAML alias, or one dict given to both) is copied once per place, so an
    override of one pass's setting leaves the other pass's alone.
    """
    data = _unshared(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. rtn.scheme.bits=3)")
        key, raw = item.split("=", 1)
        value = load_yaml(raw)
        parts = key.strip().split(".")
        node: Any = data
        if parts[0] != "passes" and parts[0] != "seed":
            parts = ["passes", parts[0]] + parts[1:]
        for part in parts[:-1]:
            node = _descend(node, part, key)
        last = parts[-1]
        if isinstance(node, list):
            node[_pass_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _unshared(node: Any) -> Any:
    """A deep copy of nested dicts and lists in which no two places hold the same object (``copy.deepcopy``
    keeps the sharing of a YAML alias)."""
    import copy

    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return copy.deepcopy(node)


def _pass_index(passes: list, part: str, key: str) -> int:
    if part.isdigit():
        if int(part) >= len(passes):
            raise ValueError(f"override {key!r}: the recipe has {len(passes)} passes")
        return int(part)
    hits = [i for i, entry in enumerate(passes) if isinstance(entry, dict) and part in entry]
    if len(hits) != 1:
        names = [next(iter(e)) for e in passes if isinstance(e, dict)]
        raise ValueError(f"override {key!r}: no single pass named {part!r} in the recipe (passes: {names})")
    return hits[0]


def _descend(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        entry = node[_pass_index(node, part, key)]
        (name, body), = entry.items()
        if body is None:
            entry[name] = body = {}
        return body
    if not isinstance(node, dict):
        raise ValueError(f"override {key!r}: {part!r} is not a mapping")
    if part not in node or node[part] is None:
        node[part] = {}
    return node[part]
