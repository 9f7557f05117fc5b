"""The audit log: one JSON line per action that changes what is served or who may call.

Lines go to the ``prefstream.audit`` logger (route it to its own sink in production).  They name the
action, who asked (a gRPC peer, or ``cli``), the outcome and the target: model and version names,
reasons, projects, key ids and scopes.  Never a secret (tokens, keys) nor a payload (definitions, events).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

audit_log = logging.getLogger("prefstream.audit")

#: Fields an audit line may carry: names and short operator text, never payloads or secrets.
AUDITED_FIELDS = ("name", "version", "reason", "project", "criterion", "enabled", "force", "scopes")


def audit(action: str, peer: str, outcome: str, request: Any = None) -> None:
    """Log ``action`` (a gRPC method path or a name like ``keys.create``) by ``peer`` with ``outcome``;
    ``request`` (a message or a mapping) gives the target."""
    target = {}
    for f in AUDITED_FIELDS:
        if request is None:
            break
        value = request.get(f) if isinstance(request, Mapping) else getattr(request, f, None)
        if value not in (None, ""):
            target[f] = value if isinstance(value, bool) else str(value)[:200]
    parts = action.rsplit("/", 2)
    audit_log.info(json.dumps({"audit": parts[-1], "service": parts[-2] if len(parts) == 3 else "", "peer": peer,
                               "outcome": outcome, "target": target}, sort_keys=True))
