"""Router-generated errors: OpenAI-style JSON bodies with the right status
(docs/fastdeploy.md#errors)."""

from __future__ import annotations

import re

import orjson

from kvrouter.http.response import Response


class RouterError(Exception):
    """An error the router answers itself, before any backend byte reached the client."""

    def __init__(self, status: int, message: str, type_: str, code: str, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.kind = kind  # label of kvrouter_errors_total, if counted
        self.headers: dict[str, str] = {}  # router headers known when it happened

    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code)


#: the request field an error code is about: OpenAI's ``param``, added to the error object
_PARAMS = {"model_not_found": "model"}


def error_body(message: str, type_: str, code: str) -> bytes:
    param = _PARAMS.get(code)
    if param is None:
        return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}})


def error_response(status: int, message: str, type_: str, code: str,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message, type_, code), status, headers=headers)


def invalid_json(err: str) -> RouterError:
    return RouterError(400, f"Invalid JSON format: {err}", "invalid_request_error",
                       "invalid_json", "invalid_request")


def invalid_value(message: str) -> RouterError:
    return RouterError(400, message, "invalid_request_error", "invalid_value", "invalid_request")


REQUEST_ID_MAX = 256
REQUEST_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{REQUEST_ID_MAX}}}")
"""A client's request id as the router passes it on: it reaches the instances, the
``X-Router-Request-ID`` header and the logs, so visible ASCII only (no space, no control
character) and bounded."""


def invalid_request_id() -> RouterError:
    return invalid_value(f"request_id must be 1 to {REQUEST_ID_MAX} visible ASCII characters "
                         "(0x21-0x7E)")


def too_large(max_mb: float) -> RouterError:
    return RouterError(413, f"Request body exceeds {max_mb:g} MB", "invalid_request_error",
                       "request_too_large", "invalid_request")


def no_instance(message: str) -> RouterError:
    return RouterError(503, message, "service_unavailable", "no_available_instance", "no_instance")


MAX_SHOWN_MODEL = 256   # characters of a requested model name echoed in the 404


def model_not_found(model: str) -> RouterError:
    """No instance serves ``model`` (OpenAI's 404 for an unknown model, ``param: "model"``)."""
    shown = model if len(model) <= MAX_SHOWN_MODEL else model[:MAX_SHOWN_MODEL] + "..."
    return RouterError(404, f"The model '{shown}' does not exist", "invalid_request_error",
                       "model_not_found", "model_not_found")


def connect_failed(url: str, err: str) -> RouterError:
    return RouterError(502, f"Failed to connect to backend service: {url}: {err}", "backend_error",
                       "backend_connection_error", "connect_failed")


def first_byte_timeout(url: str, secs: float) -> RouterError:
    return RouterError(504, f"Backend {url} sent no response within {secs:g}s", "backend_error",
                       "backend_timeout", "first_byte_timeout")


def prefill_failed(url: str, msg: str) -> RouterError:
    return RouterError(502, f"Prefill {url} failed: {msg}", "backend_error", "prefill_failed",
                       "prefill_failed")


INTERNAL_ERROR = (500, "Internal server error", "server_error", "internal_error")
