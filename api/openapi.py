"""The OpenAPI 3.1 document of the HTTP API, built from ``api/schema.py``: no I/O, no aiohttp.

Nothing here is written twice: the request's fields and bounds are
``api/schema.py``'s constants, the response shapes its ``TypedDict``s (turned
into JSON Schema by ``typed_dict_schema``), the error codes its ``ERROR_CODES``.
``tests/test_openapi.py`` validates a real daemon's answers against the result.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

from api.schema import (
    DEFAULT_POOL,
    ENCODINGS,
    ENV_NAME,
    ERROR_CODES,
    MAX_ARGV_BYTES,
    MAX_ARGV_ITEMS,
    MAX_ENV_BYTES,
    MAX_ENV_ENTRIES,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    RUN_FIELDS,
    SESSION_RUN_FIELDS,
    DisplayBody,
    ErrorBody,
    FileBody,
    PoolSummary,
    RunResultBody,
    RuntimeSummary,
    SessionSummary,
)
from pool.wire import FILE_KINDS

OPENAPI_VERSION = "3.1.0"
Schema = dict[str, Any]

# The response bodies' TypedDicts, by the name they have under components/schemas.
BODY_TYPES: dict[str, type] = {
    "RunResult": RunResultBody,
    "OutFile": FileBody,
    "Display": DisplayBody,
    "RunError": ErrorBody,
    "PoolSummary": PoolSummary,
    "Runtime": RuntimeSummary,
    "Session": SessionSummary,
}
# What a TypedDict cannot say: bounds, choices and meaning, by schema and field.
FIELD_DETAILS: dict[str, dict[str, Schema]] = {
    "RunResult": {
        "exit_code": {"minimum": 0, "maximum": 255, "description":
                      "the program's status; 128 + N when signal N killed it; null when "
                      "sandpool killed the sandbox (timeout, output over the cap)"},
        "timed_out": {"description": "from the daemon's clock"},
        "oom_killed": {"description": "from the kernel"},
        "duration_ms": {"minimum": 0, "description": "code handed over to result"},
        "queued_ms": {"minimum": 0, "description": "waiting for a warm sandbox"},
        "files_omitted": {"minimum": 0},
        "results_omitted": {"minimum": 0},
        "error": {"description": "the program's uncaught exception, if it reported one"},
    },
    "OutFile": {
        "type": {"enum": list(FILE_KINDS)},
        "size": {"minimum": 0},
        "content": {"contentEncoding": "base64",
                    "description": "base64; null for anything but a regular file"},
    },
    "Display": {
        "data": {"description": "text for text/* types, else base64"},
    },
    "Session": {
        "session_id": {"description": "256 random bits; only its creator can use it"},
        "expires_at": {"format": "date-time", "description": "created_at + ttl_s"},
        "created_at": {"format": "date-time"},
        "idle_expires_at": {"description": "the last run's end + idle_timeout_s; null while "
                            "a run is in flight"},
        "runs": {"minimum": 0},
    },
    "PoolSummary": {
        "idle": {"minimum": 0},
        "busy": {"minimum": 0},
        "leased": {"minimum": 0, "description": "sandboxes leased to sessions"},
        "max_sessions": {"minimum": 0, "description": "sessions the pool may hold; 0: none "
                         "(wasm and javascript pools, or max_sessions = 0)"},
        "starting": {"minimum": 0},
        "min_idle": {"minimum": 0},
        "max_size": {"minimum": 1},
        "problem": {"description": "why the pool cannot serve at once (its backend's last "
                    "start error, or warming); null when nothing keeps it"},
    },
}


def build_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every endpoint the daemon serves, for sandpool ``version``.

    Pure and cheap (well under a millisecond); the server builds it once.
    """
    schemas: dict[str, Schema] = {
        name: typed_dict_schema(body, FIELD_DETAILS.get(name, {}))
        for name, body in BODY_TYPES.items()
    }
    schemas["RunRequest"] = run_request_schema()
    schemas["SessionRunRequest"] = session_run_request_schema(schemas["RunRequest"])
    schemas["SessionRequest"] = {
        "type": "object", "additionalProperties": False,
        "properties": {
            "pool": {"type": "string", "description": f"default: the pool {DEFAULT_POOL!r}"},
            "ttl_s": {"type": "number", "exclusiveMinimum": 0, "description":
                      "the session's lifetime; default server.session_ttl_s, at most "
                      "server.session_max_ttl_s"},
            "idle_timeout_s": {"type": "number", "exclusiveMinimum": 0, "description":
                               "ends the session after this long without a run; default "
                               "server.session_idle_timeout_s, at most ttl_s"},
        },
    }
    schemas["Error"] = error_schema(sorted(e.code for e in ERROR_CODES))
    schemas["RunStreamLine"] = run_stream_line_schema(
        schemas["RunResult"], sorted(e.code for e in ERROR_CODES)
    )
    any_errors = _error_responses("any")
    run_errors = _error_responses("run", "any")
    session_errors = _error_responses("session", "any")
    session_create_errors = _error_responses("session", "any", also=SESSION_CREATE_RUN_CODES)
    session_run_errors = _error_responses("session", "run", "any")
    session_ref = {"$ref": "#/components/schemas/Session"}
    session_id = [{"name": "session_id", "in": "path", "required": True,
                   "schema": {"type": "string"}}]
    routing = _error_responses("routing")
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "sandpool",
            "version": version,
            "description": (
                "Runs untrusted code in single-use sandboxes from warm pools. HTTP/JSON on "
                "a Unix socket (curl --unix-socket PATH http://sandpool/...). Every error is "
                "{\"error\": {\"code\", \"message\"}} with a stable code; every 429 and 503 error "
                "carries Retry-After. A path not listed here answers NotFound, a method a "
                "path does not take MethodNotAllowed (components/responses)."
            ),
        },
        "servers": [
            {"url": "http://sandpool", "description": "the Unix socket"},
            {"url": "https://{listen}", "description": "the TCP listener (server.listen): TLS, "
             "and a bearer token on every request",
             "variables": {"listen": {"default": "localhost:8443"}}},
        ],
        # On the TCP listener only; the Unix socket checks the peer's uid instead.
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/run": {"post": {
                "operationId": "run",
                "summary": "Run code in a fresh sandbox, which is destroyed afterwards",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/RunRequest"}},
                }},
                "responses": {
                    "200": {
                        "description": (
                            "the run's result, whatever the program did. With Accept: "
                            "application/x-ndjson, one RunStreamLine per line: stdout and "
                            "stderr as the program writes them (joined, each equals the "
                            "result's, within max_output_bytes), then one result line, or "
                            "an error line if the run failed once the stream had begun; an "
                            "error before that is the usual JSON error with its status"
                        ),
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/RunResult"}},
                            "application/x-ndjson": {
                                "schema": {"$ref": "#/components/schemas/RunStreamLine"}},
                        },
                    },
                    **run_errors,
                },
            }},
            "/v1/sessions": {
                "post": {
                    "operationId": "createSession",
                    "summary": "Lease a sandbox to the caller until the session ends "
                               "(docs/sessions.md)",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/SessionRequest"}}}},
                    "responses": {"201": _json_response("the session", session_ref),
                                  **session_create_errors},
                },
                "get": {
                    "operationId": "listSessions",
                    "summary": "The caller's live sessions",
                    "responses": {
                        "200": _json_response("the sessions", _object({"sessions": {
                            "type": "array", "items": session_ref}})),
                        **session_errors,
                    },
                },
            },
            "/v1/sessions/{session_id}": {
                "parameters": session_id,
                "get": {
                    "operationId": "getSession",
                    "summary": "One of the caller's sessions",
                    "responses": {"200": _json_response("the session", session_ref),
                                  **session_errors},
                },
                "delete": {
                    "operationId": "deleteSession",
                    "summary": "End the session and destroy its sandbox; a session that "
                               "ended already answers the reason it ended for",
                    "responses": {
                        "200": _json_response("ended", _object({
                            "session_id": {"type": "string"},
                            "ended": {"type": "string", "description": "why it ended"}})),
                        **session_errors,
                    },
                },
            },
            "/v1/sessions/{session_id}/run": {
                "parameters": session_id,
                "post": {
                    "operationId": "runInSession",
                    "summary": "Run code in the session's sandbox, which keeps its state",
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/SessionRunRequest"}}}},
                    "responses": {
                        "200": {
                            "description": "the run's result, as /v1/run answers it (and "
                                           "streamed likewise with Accept: "
                                           "application/x-ndjson)",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/RunResult"}},
                                "application/x-ndjson": {
                                    "schema": {"$ref": "#/components/schemas/RunStreamLine"}},
                            },
                        },
                        **session_run_errors,
                    },
                },
            },
            "/v1/pools": {"get": {
                "operationId": "listPools",
                "summary": "Each pool's settings, runtime and sandboxes by state",
                "responses": {
                    "200": _json_response("the pools", _object({"pools": {
                        "type": "array", "items": {"$ref": "#/components/schemas/PoolSummary"},
                    }})),
                    **any_errors,
                },
            }},
            "/healthz": {"get": {
                "operationId": "healthz",
                "summary": "Alive",
                "responses": {
                    "200": _json_response("alive", _object({"status": {"const": "ok"}})),
                    **any_errors,
                },
            }},
            "/readyz": {"get": {
                "operationId": "readyz",
                "summary": "Every pool reached min_idle and its backend answers",
                "responses": {
                    "200": _json_response("ready", _readiness(True)),
                    "503": _json_response("not ready: the pools that are not are false",
                                          {"anyOf": [_readiness(False), *_schemas(any_errors)]}),
                    **{k: v for k, v in any_errors.items() if k != "503"},
                },
            }},
            "/metrics": {"get": {
                "operationId": "metrics",
                "summary": "Prometheus text format (also served over TCP: metrics_address)",
                "responses": {
                    "200": {"description": "the metrics", "content": {
                        "text/plain": {"schema": {"type": "string"}},
                    }},
                    **any_errors,
                },
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": _json_response("the OpenAPI document", {"type": "object"}),
                    **any_errors,
                },
            }},
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "responses": {
                "NotFound": routing["404"],
                "MethodNotAllowed": routing["405"],
            },
        },
    }


def run_request_schema() -> Schema:
    """The ``/v1/run`` body. Bounds that are a pool's setting are said, not enforced.

    Raises AssertionError when its fields and ``RUN_FIELDS`` differ, which the
    tests, building the document, catch before a client could.
    """
    properties: dict[str, Schema] = {
        "code": {"type": "string", "description": "NUL bytes and any Unicode allowed"},
        "language": {"type": "string",
                     "description": "the pool named after it, else the first that runs it"},
        "pool": {"type": "string", "description":
                 f"wins over language; with neither, the pool {DEFAULT_POOL!r}"},
        "stdin": {"type": "string", "default": ""},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0,
                      "description": "at most the pool's max_timeout_s; default its timeout_s"},
        "files": {
            "type": "array",
            "description": "written under the working directory before the code runs; at "
                           "most the pool's max_files, max_file_bytes each, max_files_bytes "
                           "together (decoded)",
            "items": {
                "type": "object",
                "required": ["path", "content"],
                "additionalProperties": False,
                "properties": {
                    "path": {"type": "string", "minLength": 1, "description":
                             f"relative, '/'-separated, no '.', '..' or empty name, no NUL or "
                             f"backslash; names of at most {MAX_NAME_BYTES} bytes, "
                             f"{MAX_PATH_BYTES} in all (UTF-8)"},
                    "content": {"type": "string"},
                    "encoding": {"enum": list(ENCODINGS), "default": ENCODINGS[0]},
                },
            },
        },
        "env": {
            "type": "object",
            "maxProperties": MAX_ENV_ENTRIES,
            "propertyNames": {"pattern": f"^(?:{ENV_NAME.pattern})$"},
            "additionalProperties": {"type": "string"},
            "description": f"no NUL; names and values at most {MAX_ENV_BYTES} bytes together",
        },
        "argv": {
            "type": "array",
            "maxItems": MAX_ARGV_ITEMS,
            "items": {"type": "string"},
            "description": f"no NUL; at most {MAX_ARGV_BYTES} bytes together",
        },
    }
    if set(properties) != RUN_FIELDS:
        raise AssertionError(f"RunRequest documents {sorted(properties)}, "
                             f"the schema takes {sorted(RUN_FIELDS)}")
    return {"type": "object", "required": ["code"], "additionalProperties": False,
            "properties": properties}


def session_run_request_schema(run_request: Schema) -> Schema:
    """A session's run: the ``/v1/run`` body without ``pool`` and ``language``."""
    properties = {k: v for k, v in run_request["properties"].items() if k in SESSION_RUN_FIELDS}
    if set(properties) != SESSION_RUN_FIELDS:
        raise AssertionError("SessionRunRequest and SESSION_RUN_FIELDS differ")
    return {**run_request, "properties": properties}


def run_stream_line_schema(run_result: Schema, codes: list[str]) -> Schema:
    """One line of a streamed run (api/streaming.py): output, the result, or an error."""
    result_line = {**run_result, "required": ["type", *run_result["required"]],
                   "properties": {"type": {"const": "result"}, **run_result["properties"]}}
    return {"oneOf": [
        _object({"type": {"enum": ["stdout", "stderr"]},
                 "data": {"type": "string", "description": "output as captured, UTF-8 "
                          "decoded with U+FFFD (a character split across reads is whole)"}}),
        result_line,
        _object({"type": {"const": "error"}, "code": {"enum": codes},
                 "message": {"type": "string"}}),
    ]}


def error_schema(codes: list[str]) -> Schema:
    """An error body whose code is one of ``codes``; ``session_ended`` also says why."""
    error = _object({"code": {"enum": codes}, "message": {"type": "string"}})
    if "session_ended" in codes:
        error["properties"]["reason"] = {"type": "string", "description":
                                         "session_ended only: why (docs/sessions.md)"}
    return _object({"error": error})


def typed_dict_schema(body: type, details: Mapping[str, Schema]) -> Schema:
    """The JSON Schema of a total TypedDict: every key required, no other key.

    Nested TypedDicts become ``$ref``s to their ``BODY_TYPES`` name. Raises
    TypeError for an annotation it cannot express.
    """
    hints = typing.get_type_hints(body)
    unknown = set(details) - set(hints)
    if unknown:
        raise TypeError(f"details for fields {sorted(unknown)} that {body.__name__} lacks")
    return _object({
        name: {**_type_schema(hint), **details.get(name, {})} for name, hint in hints.items()
    })


def _type_schema(hint: Any) -> Schema:
    names = {body: name for name, body in BODY_TYPES.items()}
    if hint in names:
        return {"$ref": f"#/components/schemas/{names[hint]}"}
    scalar = {str: "string", bool: "boolean", int: "integer", float: "number",
              type(None): "null"}
    if hint in scalar:
        return {"type": scalar[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict and args[0] is str:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if origin in (types.UnionType, typing.Union):
        return {"anyOf": [_type_schema(arg) for arg in args]}
    raise TypeError(f"no JSON Schema for {hint!r}")


def _object(properties: dict[str, Schema]) -> Schema:
    return {"type": "object", "required": list(properties), "additionalProperties": False,
            "properties": properties}


def _readiness(ready: bool) -> Schema:
    return _object({"ready": {"const": ready},
                    "pools": {"type": "object", "additionalProperties": {"type": "boolean"}},
                    # pool -> why it is not ready (warming, or the backend's last error)
                    "reasons": {"type": "object", "additionalProperties": {"type": "string"}}})


def _json_response(description: str, schema: Schema) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _schemas(responses: Mapping[str, dict[str, Any]]) -> list[Schema]:
    return [r["content"]["application/json"]["schema"] for r in responses.values()]


# What creating a session shares with /v1/run: reading the body, naming a pool,
# the token's pools, and waiting for a sandbox of it.
SESSION_CREATE_RUN_CODES = frozenset({
    "invalid_json", "invalid_encoding", "invalid_request", "unknown_field", "body_timeout",
    "unknown_pool", "request_too_large", "unsupported_media_type", "pool_forbidden",
    "pool_exhausted", "acquire_timeout", "backend_unavailable", "sandbox_lost", "shutting_down",
})


def _error_responses(*scopes: str, also: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """One response per status (``default`` for a code without one) of the codes in ``scopes``,
    and of ``also``."""
    by_status: dict[str, list[str]] = {}
    for error in ERROR_CODES:
        if error.scope in scopes or error.code in also:
            key = "default" if error.status is None else str(error.status)
            by_status.setdefault(key, []).append(error.code)
    responses: dict[str, dict[str, Any]] = {}
    for status, codes in sorted(by_status.items()):
        whens = "; ".join(f"{e.code}: {e.when}" for e in ERROR_CODES if e.code in codes)
        response = _json_response(whens, error_schema(codes))
        if status == "401":
            response["headers"] = {"WWW-Authenticate": {
                "required": True,
                "description": "the scheme the TCP listener takes: Bearer",
                "schema": {"type": "string"},
            }}
        if status in ("429", "503"):
            response["headers"] = {"Retry-After": {
                "required": True,
                "description": "seconds after which a retry may succeed",
                "schema": {"type": "integer", "minimum": 1},
            }}
        responses[status] = response
    return responses
