"""The aiohttp application: routes of every API surface, the request middleware (ids, drain gate, metrics,
access log, API key, body limits), and the worker groups (with this instance's file namespace) as a cleanup
context."""
import asyncio

from aiohttp import web

from serving import namespace
from serving.api import health, inference, management, metrics, openai, openapi, tgi
from serving.api.auth import API_KEY, require_token
from serving.api.errors import error_response, json_errors
from serving.api.observe import ACCESS_LOG, METRICS, observe, send_request_id
from serving.config import ModelConfig, ServerSettings
from serving.drain import DRAIN, Drain
from serving.metrics import Metrics
from serving.registry import REGISTRY, ModelRegistry

SETTINGS = web.AppKey("settings", ServerSettings)


def make_app(configs: list[ModelConfig], settings: ServerSettings | None = None) -> web.Application:
    settings = settings or ServerSettings()
    # observe first: every answer, a 401 or a 413 too, is counted and logged with its request id. Without an API
    # key there is nothing to check: no layer for it on every request.
    checks = [require_token] if settings.api_key else []
    app = web.Application(middlewares=[observe, json_errors, *checks, bounded_body],
                          client_max_size=settings.max_request_size)
    app[SETTINGS] = settings
    if settings.api_key:
        app[API_KEY] = settings.api_key
    registry = app[REGISTRY] = ModelRegistry(configs)
    drain = app[DRAIN] = Drain()
    app[METRICS] = Metrics(models=lambda: registry.versions() + list(registry.retiring),
                           draining=lambda: drain.draining)
    app[ACCESS_LOG] = settings.access_log
    if settings.model_store is not None:
        app[management.MODEL_STORE] = settings.model_store
    for module in (inference, openai, tgi, health, management, metrics, openapi):
        app.add_routes(module.routes)
    app.on_response_prepare.append(send_request_id)
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
        if not request.content.is_eof():  # most bodies came with their head: no timer to arm and cancel
            try:
                async with asyncio.timeout(settings.read_timeout):
                    await request.read()
            except TimeoutError:
                return error_response(408, "RequestTimeout",
                                      f"the body did not arrive within {settings.read_timeout} s")
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
