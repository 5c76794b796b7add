"""One error shape for every route: `{"code", "type", "message"}`, also for aiohttp's own 404/405/413."""
from aiohttp import web

from serving.schemas import ErrorBody


def error_response(code: int, type_: str, message: str) -> web.Response:
    return web.json_response(ErrorBody(code=code, type=type_, message=message).model_dump(), status=code)


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason.replace(" ", ""), exc.text or exc.reason)
