"""Errors the API returns, in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

APIError                    500 internal_error (also: any status, via APIError.of_status)
 ├── InvalidRequestError   400 invalid_request_error: bad parameter values, prompt too long
 ├── AuthenticationError   401 missing or wrong API key
 ├── ModelNotFoundError    404 the `model` names neither the base nor an adapter
 └── ServiceUnavailableError 503 the engine is not running (starting up or shutting down)
"""

from __future__ import annotations

import json
from typing import Any


class APIError(Exception):
    status_code = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def of_status(cls, status_code: int, message: str, *, code: str | None = None) -> APIError:
        """An error for an HTTP status raised outside our code (404 route, 405 method...)."""
        error = cls(message, code=code)
        error.status_code = status_code
        error.type = _TYPE_OF_STATUS.get(
            status_code, "invalid_request_error" if status_code < 500 else "internal_error"
        )
        return error

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> str:
        return json.dumps(self.body())


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    type = "authentication_error"

    def __init__(
        self, message: str = "Missing or invalid API key: send 'Authorization: Bearer <key>'."
    ) -> None:
        super().__init__(message, code="invalid_api_key")


class ModelNotFoundError(APIError):
    status_code = 404
    type = "not_found_error"

    def __init__(self, model: str, available: list[str], *, hint: str | None = None) -> None:
        super().__init__(
            f"The model {model!r} does not exist. Served models: {', '.join(available)}."
            + (f" {hint}" if hint else ""),
            param="model",
            code="model_not_found",
        )


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "service_unavailable_error"


_TYPE_OF_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
