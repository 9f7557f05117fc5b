import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SYSTEM: _ClassVar[Role]
    ROLE_USER: _ClassVar[Role]
    ROLE_ASSISTANT: _ClassVar[Role]
    ROLE_TOOL: _ClassVar[Role]

class Split(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPLIT_UNSPECIFIED: _ClassVar[Split]
    SPLIT_TRAIN: _ClassVar[Split]
    SPLIT_TEST: _ClassVar[Split]

class FeedbackKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEEDBACK_KIND_UNSPECIFIED: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_CHOICE: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_REGENERATION: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_EDIT: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_RANKING: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_SCORES: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_THUMBS: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_IMPORT: _ClassVar[FeedbackKind]
    FEEDBACK_KIND_CRITERIA: _ClassVar[FeedbackKind]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_REWARD: _ClassVar[ModelKind]
    MODEL_KIND_POLICY: _ClassVar[ModelKind]

class ModelAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_ACTION_UNSPECIFIED: _ClassVar[ModelAction]
    MODEL_ACTION_PUBLISHED: _ClassVar[ModelAction]
    MODEL_ACTION_REJECTED: _ClassVar[ModelAction]
    MODEL_ACTION_PINNED: _ClassVar[ModelAction]
    MODEL_ACTION_UNPINNED: _ClassVar[ModelAction]
    MODEL_ACTION_ROLLED_BACK: _ClassVar[ModelAction]
ROLE_UNSPECIFIED: Role
ROLE_SYSTEM: Role
ROLE_USER: Role
ROLE_ASSISTANT: Role
ROLE_TOOL: Role
SPLIT_UNSPECIFIED: Split
SPLIT_TRAIN: Split
SPLIT_TEST: Split
FEEDBACK_KIND_UNSPECIFIED: FeedbackKind
FEEDBACK_KIND_CHOICE: FeedbackKind
FEEDBACK_KIND_REGENERATION: FeedbackKind
FEEDBACK_KIND_EDIT: FeedbackKind
FEEDBACK_KIND_RANKING: FeedbackKind
FEEDBACK_KIND_SCORES: FeedbackKind
FEEDBACK_KIND_THUMBS: FeedbackKind
FEEDBACK_KIND_IMPORT: FeedbackKind
FEEDBACK_KIND_CRITERIA: FeedbackKind
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_REWARD: ModelKind
MODEL_KIND_POLICY: ModelKind
MODEL_ACTION_UNSPECIFIED: ModelAction
MODEL_ACTION_PUBLISHED: ModelAction
MODEL_ACTION_REJECTED: ModelAction
MODEL_ACTION_PINNED: ModelAction
MODEL_ACTION_UNPINNED: ModelAction
MODEL_ACTION_ROLLED_BACK: ModelAction

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: Role
    content: str
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., content: _Optional[str] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("event_id", "completion_id", "project", "prompt", "candidates", "model", "model_version", "metadata", "split", "created_at", "acked_at", "criteria")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    completion_id: str
    project: str
    prompt: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    candidates: _containers.RepeatedScalarFieldContainer[str]
    model: str
    model_version: str
    metadata: _containers.ScalarMap[str, str]
    split: Split
    created_at: _timestamp_pb2.Timestamp
    acked_at: _timestamp_pb2.Timestamp
    criteria: CriteriaScores
    def __init__(self, event_id: _Optional[str] = ..., completion_id: _Optional[str] = ..., project: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., candidates: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., split: _Optional[_Union[Split, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., criteria: _Optional[_Union[CriteriaScores, _Mapping]] = ...) -> None: ...

class CriteriaScores(_message.Message):
    __slots__ = ("refs", "scores", "tie_break", "per_criterion", "mode")
    REFS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TIE_BREAK_FIELD_NUMBER: _ClassVar[int]
    PER_CRITERION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    refs: _containers.RepeatedScalarFieldContainer[str]
    scores: _containers.RepeatedScalarFieldContainer[float]
    tie_break: _containers.RepeatedScalarFieldContainer[float]
    per_criterion: _containers.RepeatedCompositeFieldContainer[AttributeScores]
    mode: str
    def __init__(self, refs: _Optional[_Iterable[str]] = ..., scores: _Optional[_Iterable[float]] = ..., tie_break: _Optional[_Iterable[float]] = ..., per_criterion: _Optional[_Iterable[_Union[AttributeScores, _Mapping]]] = ..., mode: _Optional[str] = ...) -> None: ...

class InlineCompletion(_message.Message):
    __slots__ = ("prompt", "outputs")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    prompt: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    outputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., outputs: _Optional[_Iterable[str]] = ...) -> None: ...

class Choice(_message.Message):
    __slots__ = ("chosen_index",)
    CHOSEN_INDEX_FIELD_NUMBER: _ClassVar[int]
    chosen_index: int
    def __init__(self, chosen_index: _Optional[int] = ...) -> None: ...

class Regeneration(_message.Message):
    __slots__ = ("rejected_indices", "accepted_index")
    REJECTED_INDICES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_INDEX_FIELD_NUMBER: _ClassVar[int]
    rejected_indices: _containers.RepeatedScalarFieldContainer[int]
    accepted_index: int
    def __init__(self, rejected_indices: _Optional[_Iterable[int]] = ..., accepted_index: _Optional[int] = ...) -> None: ...

class Edit(_message.Message):
    __slots__ = ("draft_index", "edited_text")
    DRAFT_INDEX_FIELD_NUMBER: _ClassVar[int]
    EDITED_TEXT_FIELD_NUMBER: _ClassVar[int]
    draft_index: int
    edited_text: str
    def __init__(self, draft_index: _Optional[int] = ..., edited_text: _Optional[str] = ...) -> None: ...

class Ranking(_message.Message):
    __slots__ = ("ranked_indices",)
    RANKED_INDICES_FIELD_NUMBER: _ClassVar[int]
    ranked_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ranked_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class OutputScore(_message.Message):
    __slots__ = ("index", "score", "attributes")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    attributes: _containers.ScalarMap[str, float]
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., attributes: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Scores(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[OutputScore]
    def __init__(self, scores: _Optional[_Iterable[_Union[OutputScore, _Mapping]]] = ...) -> None: ...

class Thumbs(_message.Message):
    __slots__ = ("index", "up")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    index: int
    up: bool
    def __init__(self, index: _Optional[int] = ..., up: _Optional[bool] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("event_id", "project", "completion_id", "inline", "choice", "regeneration", "edit", "ranking", "scores", "thumbs", "split", "user_id", "metadata", "created_at", "acked_at")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    INLINE_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    REGENERATION_FIELD_NUMBER: _ClassVar[int]
    EDIT_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    THUMBS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    project: str
    completion_id: str
    inline: InlineCompletion
    choice: Choice
    regeneration: Regeneration
    edit: Edit
    ranking: Ranking
    scores: Scores
    thumbs: Thumbs
    split: Split
    user_id: str
    metadata: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    acked_at: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., project: _Optional[str] = ..., completion_id: _Optional[str] = ..., inline: _Optional[_Union[InlineCompletion, _Mapping]] = ..., choice: _Optional[_Union[Choice, _Mapping]] = ..., regeneration: _Optional[_Union[Regeneration, _Mapping]] = ..., edit: _Optional[_Union[Edit, _Mapping]] = ..., ranking: _Optional[_Union[Ranking, _Mapping]] = ..., scores: _Optional[_Union[Scores, _Mapping]] = ..., thumbs: _Optional[_Union[Thumbs, _Mapping]] = ..., split: _Optional[_Union[Split, str]] = ..., user_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AttributeScores(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PreferenceRecord(_message.Message):
    __slots__ = ("record_id", "project", "prompt", "ranked_responses", "source_kind", "source_event_ids", "completion_id", "split", "response_attributes", "margin", "created_at", "source_acked_at", "unfinished")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RANKED_RESPONSES_FIELD_NUMBER: _ClassVar[int]
    SOURCE_KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ACKED_AT_FIELD_NUMBER: _ClassVar[int]
    UNFINISHED_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    project: str
    prompt: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    ranked_responses: _containers.RepeatedScalarFieldContainer[str]
    source_kind: FeedbackKind
    source_event_ids: _containers.RepeatedScalarFieldContainer[str]
    completion_id: str
    split: Split
    response_attributes: _containers.RepeatedCompositeFieldContainer[AttributeScores]
    margin: float
    created_at: _timestamp_pb2.Timestamp
    source_acked_at: _timestamp_pb2.Timestamp
    unfinished: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, record_id: _Optional[str] = ..., project: _Optional[str] = ..., prompt: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., ranked_responses: _Optional[_Iterable[str]] = ..., source_kind: _Optional[_Union[FeedbackKind, str]] = ..., source_event_ids: _Optional[_Iterable[str]] = ..., completion_id: _Optional[str] = ..., split: _Optional[_Union[Split, str]] = ..., response_attributes: _Optional[_Iterable[_Union[AttributeScores, _Mapping]]] = ..., margin: _Optional[float] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., source_acked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., unfinished: _Optional[_Iterable[int]] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("source_topic", "partition", "offset", "payload", "reason", "field", "event_id", "at")
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    source_topic: str
    partition: int
    offset: int
    payload: str
    reason: str
    field: str
    event_id: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, source_topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., payload: _Optional[str] = ..., reason: _Optional[str] = ..., field: _Optional[str] = ..., event_id: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelUpdate(_message.Message):
    __slots__ = ("model_name", "version", "kind", "action", "uri", "metrics", "records_seen", "reason", "at")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_SEEN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: str
    kind: ModelKind
    action: ModelAction
    uri: str
    metrics: _containers.ScalarMap[str, float]
    records_seen: int
    reason: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., action: _Optional[_Union[ModelAction, str]] = ..., uri: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., records_seen: _Optional[int] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
