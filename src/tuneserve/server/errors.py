"""Errors the API returns, in OpenAI's shape {"error": {"message", "type", "param", "code"}}.

APIError
 ├── InvalidRequestError   400 invalid_request_error: bad parameter values, prompt too long
 ├── AuthenticationError   401 missing or wrong API key
 └── ModelNotFoundError    404 the `model` names neither the base nor an adapter
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    status_code = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    type = "authentication_error"

    def __init__(self, message: str = "Missing or invalid API key: send 'Authorization: Bearer <key>'.") -> None:
        super().__init__(message, code="invalid_api_key")


class ModelNotFoundError(APIError):
    status_code = 404
    type = "not_found_error"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(
            f"The model {model!r} does not exist. Served models: {', '.join(available)}.",
            param="model",
            code="model_not_found",
        )
