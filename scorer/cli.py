"""``prefstream scorer serve``: run the scorer (reward scoring, best-of-N, model admin) over gRPC.

Flags override ``--config`` file values and ``PREFSTREAM_SCORER_*`` environment variables; every flag
maps to a :class:`~scorer.config.ScorerConfig` field of the same name.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from scorer.config import ScorerConfig, load_scorer_config
from services.config import describe


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One ``--field-name`` per ScorerConfig field, help text from the dataclass."""
    hints = typing.get_type_hints(ScorerConfig)
    for name, _type, default, help_text in describe(ScorerConfig):
        flag = "--" + name.replace("_", "-")
        if hints[name] is bool:
            p.add_argument(flag, dest=name, default=None, action=argparse.BooleanOptionalAction,
                           help=f"{help_text} (default {default})")
        else:
            p.add_argument(flag, dest=name, default=None, help=f"{help_text} (default {default})")


def config_from_args(args: argparse.Namespace) -> ScorerConfig:
    overrides = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(ScorerConfig)}
    return load_scorer_config(file=args.config, overrides=overrides)


def _serve(args: argparse.Namespace) -> int:
    from scorer.server import serve

    return serve(config_from_args(args))


def register(subparsers: argparse._SubParsersAction) -> None:
    scorer = subparsers.add_parser("scorer", help="reward scoring and best-of-N service")
    sub = scorer.add_subparsers(dest="scorer_command", metavar="COMMAND")
    p = sub.add_parser("serve", help="serve ScorerService and ModelAdminService over gRPC until SIGTERM")
    p.add_argument("--config", default=None, help="YAML/JSON file with scorer settings (top level or under 'scorer:')")
    _add_config_flags(p)
    p.set_defaults(handler=_serve)
