"""Recipe configs: a dataclass of typed keys, filled from a YAML file and ``key=value`` overrides.

Only recipes read YAML. A value given on the command line is read as YAML (``lr=3e-4``,
``terms=[dpo]``, ``init_from=null``), and ``section.key=value`` sets one key inside a mapping-valued
key (``online.batch_size=4``). Every key is checked against the dataclass's type hints before any
work starts; an unknown key is an error that lists the valid ones.

Booleans are YAML 1.2's: only ``true`` and ``false``. PyYAML follows YAML 1.1, where a bare ``no``,
``off``, ``yes`` or ``on`` is a boolean, which would turn accelerate's ``mixed_precision: no`` into
False; here those stay strings (and a boolean key still accepts them).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (``true`` / ``false`` only)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_BOOL_WORDS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans (see the module docstring)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass: safe


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the value."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=3e-4", "online.batch_size=4"]`` -> ``{"lr": "3e-4" as YAML, "online": {"batch_size": 4}}``."""
    result: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            value = safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from err
        *parents, leaf = key.split(".")
        node = result
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[leaf] = value
    return result


def merge(base: Mapping[str, Any], updates: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``base`` with ``updates`` applied; a mapping in ``updates`` merges into a mapping in ``base``."""
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and key in merged:
            if not isinstance(merged[key], Mapping) and merged[key] is not None:
                raise ConfigError(
                    f"{prefix}{key} is {merged[key]!r}, not a section, so {prefix}{key}.<name> cannot be set"
                )
            merged[key] = merge(merged[key] or {}, value, prefix=f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


def mixed_precision_word(value: Any) -> Any:
    """accelerate's ``mixed_precision`` as accelerate spells it: ``no`` however it was written (``no``,
    ``NO``, ``false``, or the boolean a YAML 1.1 reader makes of a bare ``no``), other words lowercased."""
    if value is False or (isinstance(value, str) and value.strip().lower() in ("no", "false", "off", "none")):
        return "no"
    return value.strip().lower() if isinstance(value, str) else value


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against (and, for numbers written like ``1e-4``, converted to) ``hint``."""
    if name.rsplit(".", 1)[-1] == "mixed_precision":
        value = mixed_precision_word(value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of {hint}")
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # YAML 1.1 reads 1e5 as a string; accept it when it is a whole number
        if isinstance(value, (str, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if origin is list:
        (item_hint,) = typing.get_args(hint) or (Any,)
        if isinstance(value, str):
            value = [value]  # terms=dpo means [dpo]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(f"{name}[{i}]", item, item_hint) for i, item in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping (key: value lines), got {value!r}")
        return dict(value)
    raise TypeError(f"config field {name} has a type the loader does not handle: {hint}")


def build_config(cls: type[T], values: Mapping[str, Any]) -> T:
    """An instance of the dataclass ``cls`` from a mapping; unknown keys and bad types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [key for key in values if key not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(key, value, hints[key]) for key, value in values.items()}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
    ]
    if missing:
        raise ConfigError(f"missing config keys: {', '.join(missing)}")
    return cls(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, found {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (YAML), apply ``key=value`` overrides, and build a checked ``cls``."""
    return build_config(cls, merge(read_yaml(path), parse_overrides(overrides)))


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-ready values."""
    return dataclasses.asdict(config)


def parse_args(argv: Sequence[str], usage: str) -> tuple[str, list[str], str | bool | None]:
    """A recipe's command line ``CONFIG [key=value ...] [--resume [PATH]]`` -> (config path,
    overrides, resume); ``-h`` prints ``usage`` and exits."""
    args = list(argv)
    config, overrides, resume = None, [], None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        if arg.startswith("--resume="):
            resume = arg.split("=", 1)[1] or True
        elif arg == "--resume":
            following = args[i + 1] if i + 1 < len(args) else None
            # a following argument is the PATH unless it is an override or an option
            if following is not None and "=" not in following and not following.startswith("-") and config:
                resume = following
                i += 1
            else:
                resume = True
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg}\n{usage}")
        elif config is None and "=" not in arg:
            config = arg
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: overrides are key=value\n{usage}")
        i += 1
    if config is None:
        raise ConfigError(f"no CONFIG given\n{usage}")
    return config, overrides, resume


class TrainingDiverged(RuntimeError):
    """A non-finite loss (or gradient norm): training stopped before applying that step."""


def run_recipe(argv: Sequence[str] | None, cls: type[T], usage: str, run) -> int:
    """A recipe's ``main``: parse ``CONFIG [key=value ...] [--resume [PATH]]``, build the config
    ``cls`` and call ``run(config, resume=...)``. Returns 0 done, 1 training diverged, 2 a bad
    config or command line (the message on stderr)."""
    import sys

    from img_guidance.allocator import keep_freed_memory

    keep_freed_memory()  # CPU runs: torch's freed blocks stay in the process (img_guidance.allocator)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        path, overrides, resume = parse_args(argv, usage)
        run(load_config(cls, path, overrides), resume=resume)
    except TrainingDiverged as err:
        print(f"error: training diverged at {err}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only output_dir, a full disk: the message names the path
        print(f"error: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        from img_guidance.features.cache import CorruptShardError

        if not isinstance(err, CorruptShardError):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
