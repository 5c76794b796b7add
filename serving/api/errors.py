"""One error shape for every route: `{"code", "type", "message"}`, also for aiohttp's own 404/405/413, and for
anything unexpected (a 500 in JSON with a log line, never a text/plain traceback). Every 503 says when to come
back (Retry-After)."""
import logging

from aiohttp import web

from serving.schemas import ErrorBody

log = logging.getLogger("tpserve.api")

RETRY_AFTER = "5"  # seconds; a restarting group needs about that, a full queue less


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
