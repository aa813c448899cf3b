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

class DecisionRecord(_message.Message):
    __slots__ = ("decision_id", "time", "trace_id", "span_id", "outcome", "reason", "http_status", "policy", "rule", "audit_policies", "dry_run", "policy_revision", "latency_us", "caller", "jwt", "request", "workload", "message", "minted_token_audience", "sample_rate")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    AUDIT_POLICIES_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    POLICY_REVISION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    JWT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MINTED_TOKEN_AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    time: _timestamp_pb2.Timestamp
    trace_id: str
    span_id: str
    outcome: Outcome
    reason: str
    http_status: int
    policy: str
    rule: str
    audit_policies: _containers.RepeatedScalarFieldContainer[str]
    dry_run: DryRun
    policy_revision: str
    latency_us: int
    caller: Caller
    jwt: Jwt
    request: Request
    workload: Workload
    message: str
    minted_token_audience: str
    sample_rate: float
    def __init__(self, decision_id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ..., span_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., reason: _Optional[str] = ..., http_status: _Optional[int] = ..., policy: _Optional[str] = ..., rule: _Optional[str] = ..., audit_policies: _Optional[_Iterable[str]] = ..., dry_run: _Optional[_Union[DryRun, _Mapping]] = ..., policy_revision: _Optional[str] = ..., latency_us: _Optional[int] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ..., jwt: _Optional[_Union[Jwt, _Mapping]] = ..., request: _Optional[_Union[Request, _Mapping]] = ..., workload: _Optional[_Union[Workload, _Mapping]] = ..., message: _Optional[str] = ..., minted_token_audience: _Optional[str] = ..., sample_rate: _Optional[float] = ...) -> None: ...

class DryRun(_message.Message):
    __slots__ = ("outcome", "policy")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    policy: str
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., policy: _Optional[str] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("spiffe_id", "principal", "source")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    principal: str
    source: str
    def __init__(self, spiffe_id: _Optional[str] = ..., principal: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class Jwt(_message.Message):
    __slots__ = ("issuer", "subject", "audiences", "claims")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    subject: str
    audiences: _containers.RepeatedScalarFieldContainer[str]
    claims: _struct_pb2.Struct
    def __init__(self, issuer: _Optional[str] = ..., subject: _Optional[str] = ..., audiences: _Optional[_Iterable[str]] = ..., claims: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Address(_message.Message):
    __slots__ = ("address", "port")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    def __init__(self, address: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("method", "host", "path", "query", "scheme", "protocol", "headers", "request_id", "source", "destination", "sni")
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
    QUERY_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    SNI_FIELD_NUMBER: _ClassVar[int]
    method: str
    host: str
    path: str
    query: str
    scheme: str
    protocol: str
    headers: _containers.ScalarMap[str, str]
    request_id: str
    source: Address
    destination: Address
    sni: str
    def __init__(self, method: _Optional[str] = ..., host: _Optional[str] = ..., path: _Optional[str] = ..., query: _Optional[str] = ..., scheme: _Optional[str] = ..., protocol: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ..., source: _Optional[_Union[Address, _Mapping]] = ..., destination: _Optional[_Union[Address, _Mapping]] = ..., sni: _Optional[str] = ...) -> None: ...

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
