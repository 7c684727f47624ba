"""Router-generated errors: OpenAI-style JSON bodies with the right status
(docs/fastdeploy.md#errors)."""

from __future__ import annotations

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


def error_body(message: str, type_: str, code: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "code": code}})


def error_response(status: int, message: str, type_: str, code: str,
                   headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message, type_, code), status, headers=headers)


def invalid_body(err: str) -> RouterError:
    return RouterError(400, f"Invalid request body: {err}", "invalid_request_error",
                       "invalid_request_body", "invalid_request")


def invalid_json(err: str) -> RouterError:
    return RouterError(400, f"Invalid JSON format: {err}", "invalid_request_error",
                       "invalid_json", "invalid_request")


def invalid_value(message: str) -> RouterError:
    return RouterError(400, message, "invalid_request_error", "invalid_value", "invalid_request")


def too_large(max_mb: float) -> RouterError:
    return RouterError(413, f"Request body exceeds {max_mb:g} MB", "invalid_request_error",
                       "request_too_large", "invalid_request")


def no_instance(message: str) -> RouterError:
    return RouterError(503, message, "service_unavailable", "no_available_instance", "no_instance")


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
