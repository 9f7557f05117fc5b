"""Layered, validated configuration shared by every prefstream service.

Each deployable declares one frozen dataclass whose fields are typed, defaulted and documented
(``field(metadata={"help": ...})``).  :func:`load_config` builds it from, in increasing precedence:
the dataclass defaults < a YAML/JSON file < ``PREFSTREAM_<SECTION>_<FIELD>`` environment variables <
explicit overrides (CLI flags).  Values are coerced to the annotated type and a bad value fails at
start-up with a message naming the source, the field and what to change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")

ENV_PREFIX = "PREFSTREAM_"


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range; the message says what to change."""


def _field_help(f: dataclasses.Field) -> str:
    return str(f.metadata.get("help", "")) if f.metadata else ""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce ``value`` (often a string from env/CLI) to ``annotation`` or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        return _coerce(value, non_none[0], where)
    if annotation is Any:
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}; give a comma-separated list")
        item_t = args[0] if args else str
        items = [_coerce(v, item_t, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}: expected a JSON object, got {value!r} ({e})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return annotation(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}") from None
    if annotation is str:
        return str(value)
    if annotation is Path:
        return Path(os.path.expanduser(str(value)))
    return value


def _read_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist; pass an existing --config path")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"config file {p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of field: value")
    return data


def load_config(
    cls: type[T],
    *,
    section: str,
    file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> T:
    """Build the frozen dataclass ``cls`` from defaults < file < env < overrides.

    ``section`` names the service ("gateway", "trainer", ...).  In a file, values may sit at top level
    or under a key named ``section``.  Environment variables are ``PREFSTREAM_<SECTION>_<FIELD>``
    (upper case).  ``overrides`` whose value is ``None`` are ignored, so argparse defaults of ``None``
    leave lower layers in place.  After construction the dataclass's ``validate()`` (if any) runs.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}

    if file is not None:
        data = _read_file(file)
        if isinstance(data.get(section), dict):
            data = data[section]
        for key, raw in data.items():
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise ConfigError(f"config file {file}: unknown field {section}.{key}; known fields: {known}")
            values[key] = _coerce(raw, hints[key], f"config file {file}: {section}.{key}")

    prefix = f"{ENV_PREFIX}{section.upper()}_"
    for name in fields:
        var = prefix + name.upper()
        if var in env:
            values[name] = _coerce(env[var], hints[name], f"environment variable {var}")

    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in fields:
            raise ConfigError(f"unknown option {name} for {section}")
        values[name] = _coerce(raw, hints[name], f"option --{name.replace('_', '-')}")

    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def describe(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field: used by ``--help`` text and docs."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        )
        out.append((f.name, str(f.type), default, _field_help(f)))
    return out


def require(condition: bool, field_name: str, message: str) -> None:
    """Raise ConfigError naming ``field_name`` when ``condition`` is false (validate() helper)."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")
