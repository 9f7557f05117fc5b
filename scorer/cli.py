"""``prefstream scorer serve``: run the scorer (reward scoring, best-of-N, model admin) over gRPC.

Flags override ``--config`` file values and ``PREFSTREAM_SCORER_*`` environment variables; every flag
maps to a :class:`~scorer.config.ScorerConfig` field of the same name (:func:`services.config.add_config_flags`).
"""

from __future__ import annotations

import argparse

from scorer.config import ScorerConfig, load_scorer_config
from services.config import add_config_flags, overrides_from_args


def config_from_args(args: argparse.Namespace) -> ScorerConfig:
    return load_scorer_config(file=args.config, overrides=overrides_from_args(args, ScorerConfig))


def _serve(args: argparse.Namespace) -> int:
    from scorer.server import serve

    return serve(config_from_args(args))


def register(subparsers: argparse._SubParsersAction) -> None:
    scorer = subparsers.add_parser("scorer", help="reward scoring and best-of-N service")
    sub = scorer.add_subparsers(dest="scorer_command", metavar="COMMAND")
    p = sub.add_parser("serve", help="serve ScorerService and ModelAdminService over gRPC until SIGTERM")
    p.add_argument("--config", default=None, help="YAML/JSON file with scorer settings (top level or under 'scorer:')")
    add_config_flags(p, ScorerConfig)
    p.set_defaults(handler=_serve)
