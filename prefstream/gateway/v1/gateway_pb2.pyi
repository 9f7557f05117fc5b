import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from prefstream.events.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LogCompletionRequest(_message.Message):
    __slots__ = ("completion",)
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    completion: _events_pb2.Completion
    def __init__(self, completion: _Optional[_Union[_events_pb2.Completion, _Mapping]] = ...) -> None: ...

class LogCompletionResponse(_message.Message):
    __slots__ = ("completion_id", "event_id", "duplicate", "acked_at")
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    completion_id: str
    event_id: str
    duplicate: bool
    acked_at: _timestamp_pb2.Timestamp
    def __init__(self, completion_id: _Optional[str] = ..., event_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LogFeedbackRequest(_message.Message):
    __slots__ = ("feedback",)
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    feedback: _events_pb2.Feedback
    def __init__(self, feedback: _Optional[_Union[_events_pb2.Feedback, _Mapping]] = ...) -> None: ...

class LogFeedbackResponse(_message.Message):
    __slots__ = ("event_id", "duplicate", "acked_at")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    duplicate: bool
    acked_at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StreamEventsRequest(_message.Message):
    __slots__ = ("seq", "completion", "feedback", "batch")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    completion: _events_pb2.Completion
    feedback: _events_pb2.Feedback
    batch: EventBatch
    def __init__(self, seq: _Optional[int] = ..., completion: _Optional[_Union[_events_pb2.Completion, _Mapping]] = ..., feedback: _Optional[_Union[_events_pb2.Feedback, _Mapping]] = ..., batch: _Optional[_Union[EventBatch, _Mapping]] = ...) -> None: ...

class EventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[StreamEventsRequest]
    def __init__(self, events: _Optional[_Iterable[_Union[StreamEventsRequest, _Mapping]]] = ...) -> None: ...

class EventStatus(_message.Message):
    __slots__ = ("code", "message", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    field: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., field: _Optional[str] = ...) -> None: ...

class StreamEventsResponse(_message.Message):
    __slots__ = ("seq", "event_id", "completion_id", "duplicate", "status", "acked_at", "batch")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    event_id: str
    completion_id: str
    duplicate: bool
    status: EventStatus
    acked_at: _timestamp_pb2.Timestamp
    batch: _containers.RepeatedCompositeFieldContainer[StreamEventsResponse]
    def __init__(self, seq: _Optional[int] = ..., event_id: _Optional[str] = ..., completion_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., status: _Optional[_Union[EventStatus, _Mapping]] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., batch: _Optional[_Iterable[_Union[StreamEventsResponse, _Mapping]]] = ...) -> None: ...
