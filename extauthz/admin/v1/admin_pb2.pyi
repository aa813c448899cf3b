import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_ALLOW: _ClassVar[Outcome]
    OUTCOME_UNAUTHENTICATED: _ClassVar[Outcome]
    OUTCOME_PERMISSION_DENIED: _ClassVar[Outcome]
    OUTCOME_ERROR: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_ALLOW: Outcome
OUTCOME_UNAUTHENTICATED: Outcome
OUTCOME_PERMISSION_DENIED: Outcome
OUTCOME_ERROR: Outcome

class ExplainRequest(_message.Message):
    __slots__ = ("decision_id", "request", "check_request")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHECK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    request: RequestDescription
    check_request: bytes
    def __init__(self, decision_id: _Optional[str] = ..., request: _Optional[_Union[RequestDescription, _Mapping]] = ..., check_request: _Optional[bytes] = ...) -> None: ...

class RequestDescription(_message.Message):
    __slots__ = ("method", "host", "path", "headers", "principal", "source_ip", "destination_ip", "destination_port", "sni", "token", "claims", "namespace", "labels", "service", "gateway")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_IP_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_IP_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_PORT_FIELD_NUMBER: _ClassVar[int]
    SNI_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    method: str
    host: str
    path: str
    headers: _containers.ScalarMap[str, str]
    principal: str
    source_ip: str
    destination_ip: str
    destination_port: int
    sni: str
    token: str
    claims: _struct_pb2.Struct
    namespace: str
    labels: str
    service: str
    gateway: str
    def __init__(self, method: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., principal: _Optional[str] = ..., source_ip: _Optional[str] = ..., destination_ip: _Optional[str] = ..., destination_port: _Optional[int] = ..., sni: _Optional[str] = ..., token: _Optional[str] = ..., claims: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., namespace: _Optional[str] = ..., labels: _Optional[str] = ..., service: _Optional[str] = ..., gateway: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("id", "outcome", "reason", "message", "policy", "rule", "dry_run_allowed", "dry_run_policy", "audit", "policy_revision", "spiffe_id", "principal", "issuer", "subject")
    ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_POLICY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    id: str
    outcome: Outcome
    reason: str
    message: str
    policy: str
    rule: str
    dry_run_allowed: bool
    dry_run_policy: str
    audit: _containers.RepeatedScalarFieldContainer[str]
    policy_revision: str
    spiffe_id: str
    principal: str
    issuer: str
    subject: str
    def __init__(self, id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., policy: _Optional[str] = ..., rule: _Optional[str] = ..., dry_run_allowed: _Optional[bool] = ..., dry_run_policy: _Optional[str] = ..., audit: _Optional[_Iterable[str]] = ..., policy_revision: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., principal: _Optional[str] = ..., issuer: _Optional[str] = ..., subject: _Optional[str] = ...) -> None: ...

class Workload(_message.Message):
    __slots__ = ("namespace", "labels", "service", "gateway")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    labels: str
    service: str
    gateway: str
    def __init__(self, namespace: _Optional[str] = ..., labels: _Optional[str] = ..., service: _Optional[str] = ..., gateway: _Optional[str] = ...) -> None: ...

class FieldCheck(_message.Message):
    __slots__ = ("path", "line", "passed", "field", "values", "negated", "actual", "description")
    PATH_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NEGATED_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    path: str
    line: int
    passed: bool
    field: str
    values: _containers.RepeatedScalarFieldContainer[str]
    negated: bool
    actual: str
    description: str
    def __init__(self, path: _Optional[str] = ..., line: _Optional[int] = ..., passed: _Optional[bool] = ..., field: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ..., negated: _Optional[bool] = ..., actual: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class RuleResult(_message.Message):
    __slots__ = ("name", "line", "matched", "failures")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    line: int
    matched: bool
    failures: _containers.RepeatedCompositeFieldContainer[FieldCheck]
    def __init__(self, name: _Optional[str] = ..., line: _Optional[int] = ..., matched: _Optional[bool] = ..., failures: _Optional[_Iterable[_Union[FieldCheck, _Mapping]]] = ...) -> None: ...

class PolicyResult(_message.Message):
    __slots__ = ("key", "action", "dry_run", "file", "line", "matched", "matched_rule", "rules")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    LINE_FIELD_NUMBER: _ClassVar[int]
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    MATCHED_RULE_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    key: str
    action: str
    dry_run: bool
    file: str
    line: int
    matched: bool
    matched_rule: str
    rules: _containers.RepeatedCompositeFieldContainer[RuleResult]
    def __init__(self, key: _Optional[str] = ..., action: _Optional[str] = ..., dry_run: _Optional[bool] = ..., file: _Optional[str] = ..., line: _Optional[int] = ..., matched: _Optional[bool] = ..., matched_rule: _Optional[str] = ..., rules: _Optional[_Iterable[_Union[RuleResult, _Mapping]]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("decision", "replayed", "recorded", "workload", "principal", "request_principal", "policies", "text")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    replayed: bool
    recorded: Decision
    workload: Workload
    principal: str
    request_principal: str
    policies: _containers.RepeatedCompositeFieldContainer[PolicyResult]
    text: str
    def __init__(self, decision: _Optional[_Union[Decision, _Mapping]] = ..., replayed: _Optional[bool] = ..., recorded: _Optional[_Union[Decision, _Mapping]] = ..., workload: _Optional[_Union[Workload, _Mapping]] = ..., principal: _Optional[str] = ..., request_principal: _Optional[str] = ..., policies: _Optional[_Iterable[_Union[PolicyResult, _Mapping]]] = ..., text: _Optional[str] = ...) -> None: ...

class PolicyStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyStatusResponse(_message.Message):
    __slots__ = ("revision", "ok", "errors", "loaded_at", "reloads", "failures", "files", "warnings", "watching", "recent_decisions", "recent_capacity")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    WATCHING_FIELD_NUMBER: _ClassVar[int]
    RECENT_DECISIONS_FIELD_NUMBER: _ClassVar[int]
    RECENT_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    revision: str
    ok: bool
    errors: _containers.RepeatedScalarFieldContainer[str]
    loaded_at: _timestamp_pb2.Timestamp
    reloads: int
    failures: int
    files: _containers.RepeatedScalarFieldContainer[str]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    watching: bool
    recent_decisions: int
    recent_capacity: int
    def __init__(self, revision: _Optional[str] = ..., ok: _Optional[bool] = ..., errors: _Optional[_Iterable[str]] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reloads: _Optional[int] = ..., failures: _Optional[int] = ..., files: _Optional[_Iterable[str]] = ..., warnings: _Optional[_Iterable[str]] = ..., watching: _Optional[bool] = ..., recent_decisions: _Optional[int] = ..., recent_capacity: _Optional[int] = ...) -> None: ...
