"""Recipes: an ordered list of pass configs, the pass registry, YAML I/O, overrides.

A recipe in YAML::

    seed: 0
    passes:
      - rtn:
          scheme: {bits: 4, group_size: 64, symmetric: false}
          ignore: [lm_head]

Every config is a frozen, keyword-only dataclass; :func:`config_from_dict`
rejects unknown keys with a suggestion, so a typo fails loudly.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from torch import nn

__all__ = [
    "PassConfig",
    "Pass",
    "Recipe",
    "register_pass",
    "registered_passes",
    "config_from_dict",
    "matches",
    "select_modules",
    "apply_overrides",
]

_REGISTRY: dict[str, type["Pass"]] = {}


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Base of every pass config: which modules the pass touches.

    Attributes:
        targets: class names (``Linear``), exact module names, or ``re:`` regexes.
        ignore: same forms; matched modules are skipped. Default ``["lm_head"]``.
    """

    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
            for pattern in getattr(self, name):
                if pattern.startswith("re:"):
                    try:
                        re.compile(pattern[3:])
                    except re.error as err:
                        raise ValueError(f"{name}: bad regular expression {pattern!r}: {err}") from None

    def to_dict(self) -> dict:
        return _to_plain(self)


class Pass:
    """A compression pass. Subclasses set ``name``, ``config_cls`` and implement :meth:`apply`.

    ``requires_calibration`` tells the pipeline whether calibration data must
    flow through the model before :meth:`apply`; ``model_level`` marks a pass
    that transforms the whole model at once (rotate) and runs before any block
    is compressed. The pipeline never checks class names.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[PassConfig]] = PassConfig
    requires_calibration: ClassVar[bool] = False
    model_level: ClassVar[bool] = False

    def __init__(self, config: PassConfig):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        # set by the sequential pipeline while it runs one stage of a true-sequential pass: the qualified
        # names of that stage's linears (None: every target of the block)
        self.stage: set[str] | None = None

    @property
    def staged(self) -> bool:
        """Whether the pipeline should calibrate and compress this pass's linears stage by stage
        (``true_sequential`` in its config), each stage seeing the inputs the earlier ones produce."""
        return bool(getattr(self.config, "true_sequential", False))

    def block_modules(self, block: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
        """:func:`select_modules` of ``block``, restricted to the current :attr:`stage`."""
        found = select_modules(block, self.config, prefix)
        return found if self.stage is None else [(n, m) for n, m in found if n in self.stage]

    def apply(self, model: nn.Module, **context: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[Pass]]:
    """Name → pass class for every registered pass."""
    _load_builtin_passes()
    return dict(_REGISTRY)


def _load_builtin_passes() -> None:
    from compressor.algorithms.quant import adaround, gptq  # noqa: F401  (register "adaround", "gptq")
    from compressor.passes import rtn  # noqa: F401  (registers "rtn")
    from compressor.passes import activations  # noqa: F401  (registers "quantize_activations")
    from compressor.passes import prune, structured  # noqa: F401  (register "prune", "prune_structured")
    from compressor.algorithms.transforms import ostquant, rotate  # noqa: F401  (register "ostquant", "rotate")
    from compressor.passes import distill, distill_blocks  # noqa: F401  (register "distill", "distill_blocks")


# ---------------------------------------------------------------- config I/O


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type of a config field."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return config_from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        return tuple(value)
    if tp is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a mapping, rejecting unknown keys.

    Raises:
        ValueError: naming the unknown key, the closest valid one and the path.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {path!r} for {cls.__name__}{hint} Valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where or cls.__name__}: {err}") from None


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
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
    Values are parsed as YAML (``true``, ``3``, ``[a, b]``).
    """
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. rtn.scheme.bits=3)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
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


# ---------------------------------------------------------------- targets


def matches(name: str, module: nn.Module, patterns: tuple[str, ...]) -> bool:
    """Whether a module matches any pattern: class name (or a base class's), exact name, or ``re:`` regex."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name or any(cls.__name__ == pattern for cls in type(module).__mro__):
            return True
    return False


def select_modules(model: nn.Module, config: PassConfig, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module matching ``targets`` and not ``ignore``."""
    out = []
    for name, module in model.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if full and matches(full, module, config.targets) and not matches(full, module, config.ignore):
            out.append((full, module))
    return out
