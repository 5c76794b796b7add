"""The aiohttp application: routes of every API surface, the server-wide limits, and the worker groups (with
this instance's file namespace) as a cleanup context."""
import asyncio
from dataclasses import dataclass

from aiohttp import web

from serving import namespace
from serving.api import health, inference, management, openai, openapi
from serving.api.auth import API_KEY, require_token
from serving.api.errors import error_response, json_errors
from serving.config import ModelConfig
from serving.registry import REGISTRY, ModelRegistry


@dataclass(frozen=True)
class ServerSettings:
    """What applies to the whole server rather than to one model (the CLI's flags)."""

    api_key: str | None = None
    """Bearer token every route but the health probes requires; None: no authentication."""
    max_request_size: int = 4 * 1024 * 1024
    """Largest request body in bytes; a larger one gets 413 before it is read."""
    idle_timeout: float = 15.0
    """Seconds a connection may sit without sending a complete request head (half-open, slow headers, idle
    keep-alive) before it is closed."""
    read_timeout: float = 60.0
    """Seconds a client has to send its whole body once its headers arrived (408 after)."""


SETTINGS = web.AppKey("settings", ServerSettings)


def make_app(configs: list[ModelConfig], settings: ServerSettings | None = None) -> web.Application:
    settings = settings or ServerSettings()
    app = web.Application(middlewares=[json_errors, require_token, bounded_body],
                          client_max_size=settings.max_request_size)
    app[SETTINGS] = settings
    if settings.api_key:
        app[API_KEY] = settings.api_key
    app[REGISTRY] = ModelRegistry(configs)
    for module in (inference, openai, health, management, openapi):
        app.add_routes(module.routes)
    app.cleanup_ctx.append(_worker_groups)
    return app


@web.middleware
async def bounded_body(request: web.Request, handler):
    """A body too large is refused from its Content-Length, unread; the rest must arrive within read_timeout.
    Handlers then read it from memory."""
    if request.body_exists:
        settings = request.app[SETTINGS]
        if (request.content_length or 0) > settings.max_request_size:
            return error_response(413, "RequestEntityTooLarge",
                                  f"the body has {request.content_length} bytes; this server takes at most "
                                  f"{settings.max_request_size} (--max-request-size)")
        try:
            async with asyncio.timeout(settings.read_timeout):
                await request.read()
        except TimeoutError:
            return error_response(408, "RequestTimeout", f"the body did not arrive within {settings.read_timeout} s")
    return await handler(request)


async def _worker_groups(app: web.Application):
    registry = app[REGISTRY]
    namespace.sweep_stale()
    registry.space.create().start_reaper()
    registry.start()
    try:
        yield
    finally:
        await registry.stop()
        registry.space.remove()
