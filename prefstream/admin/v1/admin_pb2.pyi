import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from prefstream.events.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_STATE_UNSPECIFIED: _ClassVar[VersionState]
    VERSION_STATE_PUBLISHED: _ClassVar[VersionState]
    VERSION_STATE_REJECTED: _ClassVar[VersionState]
    VERSION_STATE_ROLLED_BACK: _ClassVar[VersionState]
VERSION_STATE_UNSPECIFIED: VersionState
VERSION_STATE_PUBLISHED: VersionState
VERSION_STATE_REJECTED: VersionState
VERSION_STATE_ROLLED_BACK: VersionState

class ModelVersion(_message.Message):
    __slots__ = ("version", "uri", "kind", "state", "metrics", "reason", "records_seen", "base_model", "created_at")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECORDS_SEEN_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    version: str
    uri: str
    kind: _events_pb2.ModelKind
    state: VersionState
    metrics: _containers.ScalarMap[str, float]
    reason: str
    records_seen: int
    base_model: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[str] = ..., uri: _Optional[str] = ..., kind: _Optional[_Union[_events_pb2.ModelKind, str]] = ..., state: _Optional[_Union[VersionState, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., reason: _Optional[str] = ..., records_seen: _Optional[int] = ..., base_model: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "kind", "latest_version", "pinned_version", "target_version", "serving_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: _events_pb2.ModelKind
    latest_version: str
    pinned_version: str
    target_version: str
    serving_version: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[_events_pb2.ModelKind, str]] = ..., latest_version: _Optional[str] = ..., pinned_version: _Optional[str] = ..., target_version: _Optional[str] = ..., serving_version: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("name", "include_rejected")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REJECTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    include_rejected: bool
    def __init__(self, name: _Optional[str] = ..., include_rejected: _Optional[bool] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class PinVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CreateCriterionRequest(_message.Message):
    __slots__ = ("project", "definition_json", "skip_model_check")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_JSON_FIELD_NUMBER: _ClassVar[int]
    SKIP_MODEL_CHECK_FIELD_NUMBER: _ClassVar[int]
    project: str
    definition_json: str
    skip_model_check: bool
    def __init__(self, project: _Optional[str] = ..., definition_json: _Optional[str] = ..., skip_model_check: _Optional[bool] = ...) -> None: ...

class CriterionInfo(_message.Message):
    __slots__ = ("project", "name", "version", "definition_json", "created", "in_use_by")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFINITION_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    IN_USE_BY_FIELD_NUMBER: _ClassVar[int]
    project: str
    name: str
    version: str
    definition_json: str
    created: bool
    in_use_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, project: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., definition_json: _Optional[str] = ..., created: _Optional[bool] = ..., in_use_by: _Optional[_Iterable[str]] = ...) -> None: ...

class ListCriteriaRequest(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: str
    def __init__(self, project: _Optional[str] = ...) -> None: ...

class ListCriteriaResponse(_message.Message):
    __slots__ = ("criteria",)
    CRITERIA_FIELD_NUMBER: _ClassVar[int]
    criteria: _containers.RepeatedCompositeFieldContainer[CriterionInfo]
    def __init__(self, criteria: _Optional[_Iterable[_Union[CriterionInfo, _Mapping]]] = ...) -> None: ...

class GetCriterionRequest(_message.Message):
    __slots__ = ("project", "criterion")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    project: str
    criterion: str
    def __init__(self, project: _Optional[str] = ..., criterion: _Optional[str] = ...) -> None: ...

class DeleteCriterionRequest(_message.Message):
    __slots__ = ("project", "name", "force", "reason")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    project: str
    name: str
    force: bool
    reason: str
    def __init__(self, project: _Optional[str] = ..., name: _Optional[str] = ..., force: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteCriterionResponse(_message.Message):
    __slots__ = ("deleted_versions",)
    DELETED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    deleted_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class SetCriteriaFeedbackRequest(_message.Message):
    __slots__ = ("project", "name", "enabled", "mode")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    project: str
    name: str
    enabled: bool
    mode: str
    def __init__(self, project: _Optional[str] = ..., name: _Optional[str] = ..., enabled: _Optional[bool] = ..., mode: _Optional[str] = ...) -> None: ...

class CriteriaFeedbackSetting(_message.Message):
    __slots__ = ("enabled", "mode")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    mode: str
    def __init__(self, enabled: _Optional[bool] = ..., mode: _Optional[str] = ...) -> None: ...

class CriteriaFeedbackSettings(_message.Message):
    __slots__ = ("project", "settings")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: CriteriaFeedbackSetting
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[CriteriaFeedbackSetting, _Mapping]] = ...) -> None: ...
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    project: str
    settings: _containers.MessageMap[str, CriteriaFeedbackSetting]
    def __init__(self, project: _Optional[str] = ..., settings: _Optional[_Mapping[str, CriteriaFeedbackSetting]] = ...) -> None: ...
