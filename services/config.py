"""Layered, validated configuration shared by every prefstream service.

Each deployable declares one frozen dataclass whose fields are typed, defaulted and documented
(``field(metadata={"help": ...})``).  :func:`load_config` builds it from, in increasing precedence:
the dataclass defaults < a YAML/JSON file < ``PREFSTREAM_<SECTION>_<FIELD>`` environment variables <
explicit overrides (CLI flags).  Values are coerced to the annotated type and a bad value fails at
start-up with a message naming the source, the field and what to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, TypeVar

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


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable value of a (possibly sectioned) config: its flat name, where it sits, its type."""

    name: str
    section: str  # "" for a field of the top-level dataclass
    field: dataclasses.Field
    annotation: Any


def leaves(cls: type) -> dict[str, Leaf]:
    """Every settable field of ``cls`` by its flat name, looking one level into section dataclasses.

    A config may group its fields into sections (fields whose type is a dataclass, TRL-style); every
    leaf keeps one flat name, unique across sections, so files, ``PREFSTREAM_*`` env and CLI flags
    spell it the same way whichever section it lives in.
    """
    out: dict[str, Leaf] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        ann = hints[f.name]
        if _is_section(ann):
            sub_hints = typing.get_type_hints(ann)
            for sf in dataclasses.fields(ann):
                if not sf.init:
                    continue
                if sf.name in out:
                    raise TypeError(f"{cls.__name__}: field name {sf.name!r} is used twice; leaf names must be unique")
                out[sf.name] = Leaf(sf.name, f.name, sf, sub_hints[sf.name])
        else:
            if f.name in out:
                raise TypeError(f"{cls.__name__}: field name {f.name!r} is used twice; leaf names must be unique")
            out[f.name] = Leaf(f.name, "", f, ann)
    return out


def _sections(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and _is_section(hints[f.name])}


def build(cls: type[T], values: Mapping[str, Any]) -> T:
    """``cls`` from flat leaf values (already coerced): each section is built from its own leaves."""
    by_section: dict[str, dict[str, Any]] = {}
    table = leaves(cls)
    for name, value in values.items():
        by_section.setdefault(table[name].section, {})[name] = value
    top = dict(by_section.pop("", {}))
    for section, section_cls in _sections(cls).items():
        top[section] = section_cls(**by_section.get(section, {}))
    return cls(**top)


def replace(cfg: T, **changes: Any) -> T:
    """A copy of ``cfg`` with leaves changed by flat name (``replace(cfg, lr=1e-4)``), validated again."""
    table = leaves(type(cfg))
    by_section: dict[str, dict[str, Any]] = {}
    for name, value in changes.items():
        if name not in table:
            raise ConfigError(f"unknown option {name} for {type(cfg).__name__}")
        by_section.setdefault(table[name].section, {})[name] = value
    top = dict(by_section.pop("", {}))
    for section, fields_ in by_section.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **fields_)
    out = dataclasses.replace(cfg, **top)
    validate = getattr(out, "validate", None)
    if callable(validate):
        validate()
    return out


def flat_dict(cfg: Any) -> dict[str, Any]:
    """Every leaf of ``cfg`` by flat name (what ``load_config(overrides=...)`` takes back)."""
    out = {}
    for name, leaf in leaves(type(cfg)).items():
        holder = getattr(cfg, leaf.section) if leaf.section else cfg
        value = getattr(holder, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def env_vars(section: str, values: Mapping[str, Any]) -> dict[str, str]:
    """``PREFSTREAM_<SECTION>_<LEAF>`` variables that ``load_config`` reads back as ``values`` (flat leaf
    names): what a process passes the service it starts.  A list or tuple is comma-separated."""
    def text(v: Any) -> str:
        return ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)

    return {f"{ENV_PREFIX}{section.upper()}_{k.upper()}": text(v) for k, v in values.items()}


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
    or under a key named ``section``; a sectioned config (see :func:`leaves`) also takes them grouped by
    section (``optim: {lr: 1e-4}``).  Environment variables are ``PREFSTREAM_<SECTION>_<FIELD>`` (upper
    case, the flat leaf name).  ``overrides`` whose value is ``None`` are ignored, so argparse defaults
    of ``None`` leave lower layers in place.  After construction ``validate()`` (if any) runs on every
    section and then on the whole.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    env = os.environ if env is None else env
    table = leaves(cls)
    sections = _sections(cls)
    values: dict[str, Any] = {}

    if file is not None:
        data = _read_file(file)
        if isinstance(data.get(section), dict):
            data = data[section]
        items: list[tuple[str, Any, str]] = []
        for key, raw in data.items():
            if key in sections and isinstance(raw, dict):
                items += [(k, v, f"{section}.{key}.{k}") for k, v in raw.items()]
            else:
                items.append((key, raw, f"{section}.{key}"))
        for key, raw, where in items:
            if key not in table:
                known = ", ".join(sorted(table))
                raise ConfigError(f"config file {file}: unknown field {where}; known fields: {known}")
            values[key] = _coerce(raw, table[key].annotation, f"config file {file}: {where}")

    prefix = f"{ENV_PREFIX}{section.upper()}_"
    for name, leaf in table.items():
        var = prefix + name.upper()
        if var in env:
            values[name] = _coerce(env[var], leaf.annotation, f"environment variable {var}")

    for name, raw in (overrides or {}).items():
        if raw is None:
            continue
        if name not in table:
            raise ConfigError(f"unknown option {name} for {section}")
        values[name] = _coerce(raw, table[name].annotation, f"option --{name.replace('_', '-')}")

    cfg = build(cls, values)
    for name in sections:
        validate = getattr(getattr(cfg, name), "validate", None)
        if callable(validate):
            validate()
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# The command line: one flag per leaf, the same for every service.


def add_config_flags(parser: Any, cls: type, fields: Iterable[str] | None = None) -> None:
    """One ``--field-name`` flag per leaf of ``cls`` (all, or ``fields``), grouped by section.

    ``parser`` is an ``ArgumentParser`` or an argument group.  Defaults are ``None`` so a flag that is not
    given leaves the file and env layers in force.  A boolean reads three ways: ``--x`` (on), ``--no-x``
    (off) and ``--x VALUE`` (kept as given and coerced with the other layers, so ``--x maybe`` fails
    naming the option; ``--x false`` is how the gateway and the demo documented switching a default-on
    setting off before ``--no-x`` existed).  :func:`overrides_from_args` reads them back.
    """
    wanted = set(fields) if fields is not None else None
    groups: dict[str, Any] = {}
    for name, leaf in leaves(cls).items():
        if wanted is not None and name not in wanted:
            continue
        target = parser
        if leaf.section:
            if leaf.section not in groups:
                groups[leaf.section] = parser.add_argument_group(f"{leaf.section} settings")
            target = groups[leaf.section]
        flag = "--" + name.replace("_", "-")
        help_text = f"{_field_help(leaf.field)} (default: {_default_text(leaf.field)})".replace("%", "%%")
        if leaf.annotation is bool:
            target.add_argument(flag, dest=name, nargs="?", const=True, default=None, metavar="BOOL", help=help_text)
            target.add_argument("--no-" + flag[2:], dest=name, action="store_const", const=False,
                                help=f"the same as {flag} false")
        else:
            target.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def _default_text(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default if f.default != "" else '""'
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "required"


def overrides_from_args(args: Any, cls: type, fields: Iterable[str] | None = None) -> dict[str, Any]:
    """The leaves of ``cls`` that were given on the command line (``add_config_flags``'s flags)."""
    names = set(fields) if fields is not None else set(leaves(cls))
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# ---------------------------------------------------------------------------------------------
# Endpoints: empty addresses are filled from the local stack (a development convenience).


def fill_endpoints(cfg: T, needed: Mapping[str, bool], stack_run_dir: str | os.PathLike | None = None) -> T:
    """A copy of ``cfg`` whose leaves named in ``needed`` (with True) come from the local stack.

    ``needed`` maps a leaf (``kafka_bootstrap``, ``redis_url``, ``ray_address``) to whether it must be
    filled; the stack's run dir is ``stack_run_dir``, else ``PREFSTREAM_STACK_RUN_DIR``, else
    ``.run/stack`` (:func:`services.endpoints.stack_run_dir`).  Fails with a ConfigError naming the
    missing setting and the flag that sets it.  Every service spells its run-dir setting
    ``stack_run_dir`` and fills its endpoints here.
    """
    wanted = [name for name, want in needed.items() if want]
    if not wanted:
        return cfg
    from services.endpoints import StackNotRunning, load_stack_endpoints

    try:
        ep = load_stack_endpoints(stack_run_dir or None)
    except StackNotRunning as e:
        flag = "--" + wanted[0].replace("_", "-")
        raise ConfigError(f"{', '.join(wanted)}: not set and {e}; or pass {flag}") from None
    changes: dict[str, Any] = {}
    for name in wanted:
        value = getattr(ep, name, "")
        if not value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{name}: not set and the local stack does not run that component; "
                              f"pass {flag} or start the stack with it")
        changes[name] = value
    return replace(cfg, **changes)


def require(condition: bool, field_name: str, message: str) -> None:
    """Raise ConfigError naming ``field_name`` when ``condition`` is false (validate() helper)."""
    if not condition:
        raise ConfigError(f"{field_name}: {message}")
