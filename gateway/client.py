"""A small synchronous client for the gateway, for apps, scripts and the demo.

It speaks gRPC with the project's API key and takes plain Python values, so callers never build
generated messages::

    client = GatewayClient("127.0.0.1:50051", api_key=key)
    cid = client.log_completion("my-app", [{"role": "user", "content": "Hi"}], ["Hello!", "Hey."])
    client.log_feedback("my-app", cid, choice=0)
    client.log_feedback("my-app", cid, ranking=[1, 0])
    client.log_feedback("my-app", cid, scores=[{"index": 0, "score": 4.0}, {"index": 1, "attributes": {"helpfulness": 2.0}}])

Errors are raised as the domain errors of :mod:`services.errors` (InvalidArgument naming the field,
Unauthenticated, PermissionDenied, Unavailable, ...).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import grpc

from prefstream.events.v1 import events_pb2
from prefstream.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.errors import InvalidArgument, from_grpc_error
from services.grpc_server import channel

_ROLES = {"system": events_pb2.ROLE_SYSTEM, "user": events_pb2.ROLE_USER, "assistant": events_pb2.ROLE_ASSISTANT,
          "tool": events_pb2.ROLE_TOOL}
_SPLITS = {None: events_pb2.SPLIT_UNSPECIFIED, "train": events_pb2.SPLIT_TRAIN, "test": events_pb2.SPLIT_TEST}


def _messages(prompt: Sequence[Mapping[str, str]] | str) -> list[events_pb2.ChatMessage]:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    out = []
    for i, m in enumerate(prompt):
        role = _ROLES.get(str(m.get("role", "")).lower())
        if role is None:
            raise InvalidArgument(f"prompt[{i}].role", f"unknown role {m.get('role')!r}; use system, user, assistant or tool")
        out.append(events_pb2.ChatMessage(role=role, content=str(m.get("content", ""))))
    return out


class GatewayClient:
    """Blocking calls to one gateway with one API key (see the module docstring)."""

    def __init__(self, address: str, *, api_key: str | None = None, timeout_s: float = 30.0) -> None:
        self._channel = channel(address, aio=False)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._timeout = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=self._timeout)
        except grpc.RpcError as e:
            raise from_grpc_error(e) from None

    def log_completion(
        self,
        project: str,
        prompt: Sequence[Mapping[str, str]] | str,
        candidates: Sequence[str],
        *,
        event_id: str = "",
        model: str = "",
        model_version: str = "",
        metadata: Mapping[str, str] | None = None,
        split: str | None = None,
    ) -> str:
        """Log the prompt and the candidates shown; returns the completion id once Kafka has it."""
        c = events_pb2.Completion(event_id=event_id, project=project, prompt=_messages(prompt), candidates=list(candidates),
                                  model=model, model_version=model_version, metadata=dict(metadata or {}),
                                  split=_SPLITS[split])
        return self._call(self._stub.LogCompletion, gateway_pb2.LogCompletionRequest(completion=c)).completion_id

    def log_feedback(
        self,
        project: str,
        completion_id: str | None = None,
        *,
        inline: tuple[Sequence[Mapping[str, str]] | str, Sequence[str]] | None = None,
        choice: int | None = None,
        regeneration: tuple[Sequence[int], int] | None = None,
        edit: tuple[int, str] | None = None,
        ranking: Sequence[int] | None = None,
        scores: Iterable[Mapping[str, Any]] | None = None,
        thumbs: tuple[int, bool] | None = None,
        event_id: str = "",
        split: str | None = None,
        user_id: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Log one piece of feedback (exactly one kind) about ``completion_id`` or an ``inline`` (prompt, outputs).

        ``regeneration`` is (rejected indices, accepted index), ``edit`` (draft index, edited text),
        ``thumbs`` (index, up), ``scores`` dicts with ``index`` and ``score`` and/or ``attributes``.
        Returns the event id.
        """
        given = [k for k, v in (("choice", choice), ("regeneration", regeneration), ("edit", edit), ("ranking", ranking),
                                ("scores", scores), ("thumbs", thumbs)) if v is not None]
        if len(given) != 1:
            raise InvalidArgument("feedback.kind", f"give exactly one of choice, regeneration, edit, ranking, scores, thumbs (got {given or 'none'})")
        fb = events_pb2.Feedback(event_id=event_id, project=project, split=_SPLITS[split], user_id=user_id,
                                 metadata=dict(metadata or {}))
        if inline is not None:
            fb.inline.prompt.extend(_messages(inline[0]))
            fb.inline.outputs.extend(inline[1])
        elif completion_id:
            fb.completion_id = completion_id
        if choice is not None:
            fb.choice.chosen_index = choice
        if regeneration is not None:
            fb.regeneration.rejected_indices.extend(regeneration[0])
            fb.regeneration.accepted_index = regeneration[1]
        if edit is not None:
            fb.edit.draft_index, fb.edit.edited_text = edit
        if ranking is not None:
            fb.ranking.ranked_indices.extend(ranking)
        if scores is not None:
            for s in scores:
                out = fb.scores.scores.add(index=int(s["index"]))
                if s.get("score") is not None:
                    out.score = float(s["score"])
                for k, v in (s.get("attributes") or {}).items():
                    out.attributes[k] = float(v)
        if thumbs is not None:
            fb.thumbs.index, fb.thumbs.up = thumbs
        return self._call(self._stub.LogFeedback, gateway_pb2.LogFeedbackRequest(feedback=fb)).event_id
