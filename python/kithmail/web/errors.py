"""How the web listener says no: JSON under /api, a page elsewhere.

`ApiError(status, code, detail)` is what routes raise for a refusal they
can name; `install_error_handlers` answers it, FastAPI's validation errors,
Starlette's HTTP errors (404, 405, …), `LoginRequired` and `Forbidden`
alike: under /api as ``{"error": code, "detail": text}``, elsewhere as the
error page (or, for a missing login, a redirect to /login).
"""

from __future__ import annotations

from typing import Final
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from kithmail.web.auth import Forbidden, LoginRequired, optional_principal
from kithmail.web.templating import render

__all__ = ["CODES", "ApiError", "install_error_handlers", "is_api"]

CODES: Final = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "too_many_requests",
}
_HEADINGS: Final = {
    400: "That did not work",
    403: "Not allowed",
    404: "Not found",
    405: "Not allowed",
    409: "That did not work",
    413: "Too large",
    422: "That did not work",
    429: "Too many attempts",
}


class ApiError(Exception):
    """A refusal with its HTTP status, a stable code and a sentence for people."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def error_response(
    request: Request,
    status: int,
    code: str,
    detail: str,
    headers: dict[str, str] | None = None,
) -> Response:
    if is_api(request):
        return JSONResponse({"error": code, "detail": detail}, status, headers=headers)
    try:
        await optional_principal(request)  # the error page shows the navigation
    except Exception:
        request.state.principal = None
    heading = _HEADINGS.get(status, "That did not work")
    response = render(request, "error.html", {"heading": heading, "message": detail}, status)
    for k, v in (headers or {}).items():
        response.headers[k] = v
    return response


def _validation_text(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return await error_response(request, exc.status, exc.code, exc.detail, exc.headers)

    async def login_required(request: Request, exc: Exception) -> Response:
        if is_api(request):
            return JSONResponse(
                {"error": "unauthenticated", "detail": "log in, or send an API token"},
                401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        target = request.url.path
        if request.method != "GET":
            target = "/"
        elif request.url.query:
            target += "?" + request.url.query
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    async def forbidden(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Forbidden)
        return await error_response(request, 403, "forbidden", exc.detail)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else CODES.get(status, "error")
        if status == 404 and detail == "Not Found":
            detail = "There is nothing here."
        return await error_response(
            request, status, CODES.get(status, "error"), detail, dict(exc.headers or {})
        )

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        status = 422 if is_api(request) else 400
        return await error_response(request, status, CODES[status], _validation_text(exc))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(Forbidden, forbidden)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
