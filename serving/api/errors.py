"""One error shape for every route: `{"code", "type", "message"}`, also for aiohttp's own 404/405/413, and for
anything unexpected (a 500 in JSON with a log line, never a text/plain traceback). Every 503 says when to come
back (Retry-After)."""
import logging

from aiohttp import web
from pydantic import ValidationError

from serving.schemas import ErrorBody

log = logging.getLogger("tpserve.api")

RETRY_AFTER = "5"  # seconds; a restarting group needs about that, a full queue less
UNION_BRANCHES = {"str", "list[str]", "list[ChatMessage]", "int", "float", "bool", "none", "constrained-str",
                  "list[constrained-str]"}


def error_response(code: int, type_: str, message: str) -> web.Response:
    response = web.json_response(ErrorBody(code=code, type=type_, message=message).model_dump(), status=code)
    if code == 503:
        response.headers["Retry-After"] = RETRY_AFTER
    return response


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.replace(" ", ""), exc.text or exc.reason)
    except RecursionError:
        return error_response(400, "BadRequest", "the body is nested too deeply")
    except Exception:  # noqa: BLE001 - a bug must still answer in the API's shape
        log.exception("unexpected error serving %s %s", request.method, request.path)
        return error_response(500, "InternalServerError", "unexpected server error; the server log has details")


def describe_validation_error(exc: ValidationError) -> str:
    """A 422's message: each problem with the field it is in (`parameters.top_p: ...`) and what was given."""
    messages = []
    for error in exc.errors():
        # a union's alternatives add their type name to the location (inputs.str, inputs.list[str])
        field = ".".join(str(part) for part in error["loc"] if str(part) not in UNION_BRANCHES)
        messages.append(f"{field or 'body'}: {error['msg']} (got {error.get('input')!r:.80})")
    return "; ".join(messages)
