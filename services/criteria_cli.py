"""``prefstream criteria create|list|show|delete``: manage the named criteria in the registry.

Criteria are read by two deployables (the scorer ranks best-of-N replies by them, the gateway's feedback
processor builds preference records from them), so their definitions, store and this command live in
``services/`` rather than in either area; :mod:`prefstream.cli` collects the command like every
area's ``cli.py``.  The settings are one :class:`CriteriaCliConfig` (``--config``, then
``PREFSTREAM_CRITERIA_*``, then flags); an empty ``redis_url`` is filled from the local stack.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from services.config import add_config_flags, fill_endpoints, load_config, overrides_from_args


@dataclass(frozen=True)
class CriteriaCliConfig:
    """Where the criteria live."""

    redis_url: str = field(default="", repr=False, metadata={"help": "Redis of the registry (empty: the local stack's)"})
    stack_run_dir: str = field(default="", metadata={
        "help": "run dir of the local stack used to fill an empty redis_url "
                "(empty: PREFSTREAM_STACK_RUN_DIR or .run/stack)"})
    namespace: str = field(default="prefstream", metadata={"help": "registry key namespace (the model registry's)"})
    project: str = field(default="default", metadata={"help": "project the criteria belong to"})


def _store(args: argparse.Namespace, *, check_models: bool = False) -> tuple[Any, CriteriaCliConfig]:
    from services.criteria_store import CriteriaStore
    from services.redis_client import connect
    from services.registry import ModelRegistry

    cfg = load_config(CriteriaCliConfig, section="criteria", file=args.config,
                      overrides=overrides_from_args(args, CriteriaCliConfig))
    cfg = fill_endpoints(cfg, {"redis_url": not cfg.redis_url}, cfg.stack_run_dir)
    client = connect(cfg.redis_url)
    registry = ModelRegistry(client, namespace=cfg.namespace) if check_models else None
    return CriteriaStore(client, namespace=cfg.namespace, registry=registry), cfg


def read_definitions(path: str) -> list[dict[str, Any]]:
    """The definitions in a YAML or JSON file: one mapping, a list of them, or YAML documents."""
    import yaml

    from services.errors import InvalidArgument

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgument("file", f"cannot read {path}: {e.strerror or e}") from None
    try:
        if path.endswith(".json"):
            docs = [json.loads(text)]
        else:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (ValueError, yaml.YAMLError) as e:
        raise InvalidArgument("file", f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                              f"{str(e).splitlines()[0]}") from None
    out: list[dict[str, Any]] = []
    for d in docs:
        out.extend(d if isinstance(d, list) else [d])
    if not out:
        raise InvalidArgument("file", f"{path} holds no criterion definition")
    return out


def cmd_create(args: argparse.Namespace) -> int:
    from services.criteria import parse_criterion
    from services.errors import InvalidArgument

    criteria, cfg = _store(args, check_models=not args.skip_model_check)
    definitions = read_definitions(args.file)
    parsed = []
    for i, data in enumerate(definitions):
        # --project must agree with a file that names one; a configured project fills a file that does not.
        if not args.project and isinstance(data, dict):
            data = {"project": cfg.project, **data}
        try:
            parsed.append(parse_criterion(data, project=args.project))
        except InvalidArgument as e:  # name the document too, when the file holds several
            if len(definitions) > 1:
                raise InvalidArgument(f"[{i}].{e.field}", e.message) from None
            raise
    for c in parsed:
        stored, new = criteria.create(c)
        print(f"{'created' if new else 'unchanged'} {stored.project}/{stored.ref}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    criteria, cfg = _store(args)
    rows = criteria.list(cfg.project)
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    if not rows:
        print(f"no criteria in project {cfg.project}")
        return 0
    print(f"{'NAME':<24}{'VERSION':<9}{'KIND':<8}{'WEIGHT':<8}{'IN USE BY':<24}DESCRIPTION")
    for r in rows:
        c = r.latest
        print(f"{c.name:<24}{c.version:<9}{c.kind:<8}{c.weight:<8g}{','.join(r.in_use_by) or '-':<24}{c.description}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    import yaml

    criteria, cfg = _store(args)
    c = criteria.get(cfg.project, args.criterion)
    if args.json:
        print(json.dumps(c.to_dict(), indent=2))
    else:
        print(yaml.safe_dump(c.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    import getpass

    criteria, cfg = _store(args)
    deleted = criteria.delete(cfg.project, args.name, force=args.force, reason=args.reason or "",
                           actor=getpass.getuser())
    print(f"deleted {cfg.project}/{args.name} ({', '.join(deleted)})")
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    from services.criteria_store import ALL

    criteria, cfg = _store(args)
    name = args.name or ALL
    if args.state is not None:
        if name != ALL:
            criteria.get(cfg.project, name)  # a switch for a criterion that does not exist is a typo
        criteria.set_feedback(cfg.project, name, enabled=args.state == "on", mode=args.mode)
    settings = criteria.feedback_settings(cfg.project)
    if args.json:
        print(json.dumps(settings, indent=2, sort_keys=True))
        return 0
    default = settings.get(ALL, {"enabled": True, "mode": "pair"})
    print(f"criteria feedback in project {cfg.project}: {'on' if default.get('enabled', True) else 'off'} "
          f"({default.get('mode', 'pair')}) unless a criterion says otherwise")
    for n, v in sorted(settings.items()):
        if n != ALL:
            print(f"  {n}: {'on' if v.get('enabled', True) else 'off'} ({v.get('mode', 'pair')})")
    return 0


def _friendly(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Domain and connection errors become one line on stderr and exit status 2."""

    def handler(args: argparse.Namespace) -> int:
        import redis

        from services.errors import PrefstreamError

        try:
            return fn(args)
        except PrefstreamError as e:
            print(f"prefstream criteria: {e}", file=sys.stderr)
            return 2
        except redis.RedisError as e:
            print(f"prefstream criteria: cannot reach Redis ({type(e).__name__}: {e}); is the stack up?",
                  file=sys.stderr)
            return 2

    return handler


def register(subparsers: argparse._SubParsersAction) -> None:
    crit = subparsers.add_parser("criteria", help="named, versioned criteria for best-of-N and criteria feedback")
    sub = crit.add_subparsers(dest="criteria_command", metavar="COMMAND")

    def command(name: str, help_text: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML/JSON settings file (top level or under 'criteria:')")
        add_config_flags(p.add_argument_group("criteria settings (override --config and PREFSTREAM_CRITERIA_*)"),
                         CriteriaCliConfig)
        p.set_defaults(handler=_friendly(fn))
        return p

    p = command("create", "record the definitions in a YAML/JSON file (a new version when one changed)", cmd_create)
    p.add_argument("file", help="definition file: one criterion, a list, or several YAML documents")
    p.add_argument("--skip-model-check", action="store_true",
                   help="accept reward/judge models the registry does not know yet")
    p = command("list", "the project's criteria with their latest version and users", cmd_list)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command("show", "one criterion's definition", cmd_show)
    p.add_argument("criterion", metavar="NAME[@VERSION]", help="the latest version, or the one named")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p = command("delete", "delete every version of a criterion (refused while it is in use)", cmd_delete)
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="delete even while in use; recorded in the audit log")
    p.add_argument("--reason", default=None, help="why (kept in the audit log of a forced delete)")
    p = command("feedback", "switch criteria feedback (stored best-of-N -> preference data) on or off; "
                            "without on/off, show the settings", cmd_feedback)
    p.add_argument("state", nargs="?", choices=("on", "off"), help="switch it on or off")
    p.add_argument("--name", default="", help="one criterion; empty = every criterion of the project")
    from services.criteria_eval import FEEDBACK_MODE_SUMMARIES

    p.add_argument("--mode", default="pair", choices=tuple(FEEDBACK_MODE_SUMMARIES),
                   help="what a best-of-N becomes (docs/criteria.md): " + "; ".join(
                       f"{mode}, {what}" for mode, what in FEEDBACK_MODE_SUMMARIES.items()))
    p.add_argument("--json", action="store_true", help="print JSON")
