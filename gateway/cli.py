"""``prefstream gateway serve|process``, ``prefstream keys create|revoke|list`` and ``prefstream import``.

Registered into the ``prefstream`` command by :mod:`prefstream.cli`.  ``gateway`` and ``keys`` accept
one ``--<field>`` flag per :class:`~gateway.config.GatewayConfig` field (plus ``--config FILE``), which
override the config file and ``PREFSTREAM_GATEWAY_*`` variables (:func:`services.config.add_config_flags`;
a boolean is ``--x``, ``--no-x`` or ``--x false``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from typing import Any

from gateway.config import GatewayConfig, load_gateway_config
from services.config import add_config_flags, fill_endpoints, overrides_from_args

log = logging.getLogger(__name__)


def _config_flags() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("gateway configuration (overrides --config and PREFSTREAM_GATEWAY_* env)")
    g.add_argument("--config", default=None, help="YAML/JSON config file (keys at top level or under `gateway:`)")
    add_config_flags(g, GatewayConfig)
    return common


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return load_gateway_config(file=getattr(args, "config", None), overrides=overrides_from_args(args, GatewayConfig))


def _friendly(name: str, fn: Any) -> Any:
    """Run a handler, turning domain and connection errors into one line on stderr and exit status 2."""

    def handler(args: argparse.Namespace) -> int:
        import redis

        from services.errors import PrefstreamError

        try:
            return fn(args)
        except PrefstreamError as e:
            print(f"prefstream {name}: {e}", file=sys.stderr)
            return 2
        except (redis.RedisError, OSError) as e:
            print(f"prefstream {name}: cannot reach Redis ({type(e).__name__}: {e}); is the stack up?", file=sys.stderr)
            return 2

    return handler


def _quiet_clients() -> None:
    logging.getLogger("kafka").setLevel(logging.WARNING)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.service import serve

    _quiet_clients()
    asyncio.run(serve(config_from_args(args)))
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    import signal
    import threading

    from gateway.processor import Processor

    _quiet_clients()
    cfg = config_from_args(args)
    kafka, redis_url = cfg.endpoints()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("feedback processor (group %s) consuming from %s", cfg.processor_group, kafka)
    Processor(cfg, kafka, redis_url).run(stop)
    return 0


def _redis(args: argparse.Namespace) -> tuple[Any, GatewayConfig]:
    from services.redis_client import connect

    cfg = config_from_args(args)
    # Keys live in Redis only: a stack without Kafka is enough here.
    cfg = fill_endpoints(cfg, {"redis_url": not cfg.redis_url}, cfg.stack_run_dir)
    return connect(str(cfg.redis_url)), cfg


def cmd_keys_create(args: argparse.Namespace) -> int:
    from gateway.auth import SCOPES, create_key

    client, cfg = _redis(args)
    key, info = create_key(client, args.project, pepper=cfg.auth_pepper, label=args.label or "",
                           scopes=args.scope or SCOPES)
    print(key)
    print(f"created key {info.key_id} for project {info.project} (may {', '.join(info.scopes)}); it is shown only "
          "once, store it now", file=sys.stderr)
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from gateway.auth import revoke_key

    client, _ = _redis(args)
    info = revoke_key(client, args.key)
    print(f"revoked key {info.key_id} of project {info.project}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    import time

    from gateway.auth import list_keys

    client, _ = _redis(args)
    keys = list_keys(client, args.project)
    if args.json:
        print(json.dumps([dataclasses.asdict(k) for k in keys], indent=2))
        return 0
    if not keys:
        print("no keys" + (f" for project {args.project}" if args.project else ""))
        return 0
    print(f"{'KEY ID':<14}{'PROJECT':<24}{'CREATED':<22}{'STATUS':<10}{'SCOPES':<14}LABEL")
    for k in keys:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k.created_at))
        print(f"{k.key_id:<14}{k.project:<24}{created:<22}{'active' if k.active else 'revoked':<10}"
              f"{','.join(k.scopes):<14}{k.label}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from gateway.importer import import_file
    from services.errors import InvalidArgument, PrefstreamError

    try:
        summary = import_file(
            args.file, gateway=args.gateway, project=args.project, api_key=args.api_key, fmt=args.format,
            split=args.split, batch_size=args.batch_size, progress=not args.no_progress,
        )
    except FileNotFoundError as e:
        print(f"prefstream import: {e}", file=sys.stderr)
        return 2
    except InvalidArgument as e:
        print(f"prefstream import: {e}", file=sys.stderr)
        return 2
    except PrefstreamError as e:  # the call itself failed (bad key, gateway down): nothing more was imported
        print(f"prefstream import: the gateway at {args.gateway} answered {e.grpc_code.name}: {e}; "
              "events acknowledged before this were written, re-running the import resumes (duplicates are skipped)",
              file=sys.stderr)
        return 2
    print(summary.describe())
    return 0 if summary.ok else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    import os

    common = _config_flags()
    gw = subparsers.add_parser("gateway", help="the ingestion gateway (gRPC + HTTP) and its feedback processor")
    gsub = gw.add_subparsers(dest="gateway_command", metavar="COMMAND")
    p = gsub.add_parser("serve", parents=[common], help="run the gateway (and, by default, the processor) until SIGTERM")
    p.set_defaults(handler=cmd_serve)
    p = gsub.add_parser("process", parents=[common], help="run only the feedback->preference processor")
    p.set_defaults(handler=cmd_process)
    gw.set_defaults(handler=lambda a: gw.print_help() or 2)

    keys = subparsers.add_parser("keys", help="per-project API keys of the gateway")
    ksub = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    p = ksub.add_parser("create", parents=[common], help="create a key for a project and print it (once)")
    p.add_argument("--project", required=True)
    p.add_argument("--label", default="", help="a note shown by `keys list` (e.g. which app uses it)")
    p.add_argument("--scope", action="append", choices=("ingest", "score"), default=None,
                   help="what the key may do (repeatable): ingest = log completions and feedback, score = the "
                        "OpenAI-compatible scoring and generation routes; default both")
    p.set_defaults(handler=_friendly("keys create", cmd_keys_create))
    p = ksub.add_parser("revoke", parents=[common], help="revoke a key by its id (or the key itself)")
    p.add_argument("key", help="key id as shown by `keys list`, or the full psk_... key")
    p.set_defaults(handler=_friendly("keys revoke", cmd_keys_revoke))
    p = ksub.add_parser("list", parents=[common], help="list keys (ids, never secrets)")
    p.add_argument("--project", default=None, help="only this project's keys")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_friendly("keys list", cmd_keys_list))
    keys.set_defaults(handler=lambda a: keys.print_help() or 2)

    p = subparsers.add_parser("import", help="stream a preference dataset through the gateway")
    p.add_argument("file", help="JSONL (or JSON array) dataset")
    p.add_argument("--format", choices=("openpipe", "ranked", "trl", "hh"), default=None, help="default: detected from the first line")
    p.add_argument("--split", choices=("train", "test"), default=None, help="force every example's split (default: the file's, else train)")
    p.add_argument("--project", default=os.environ.get("PREFSTREAM_PROJECT", "default"))
    p.add_argument("--gateway", default=os.environ.get("PREFSTREAM_GATEWAY", "127.0.0.1:50051"), help="gateway gRPC host:port")
    p.add_argument("--api-key", default=os.environ.get("PREFSTREAM_API_KEY"), help="project API key (default $PREFSTREAM_API_KEY)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="events per StreamEvents batch (at most the gateway's max_batch_events, 1000 by default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_import)
