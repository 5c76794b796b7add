"""The aiohttp application: routes of every API surface, the request middleware (ids, drain gate, metrics,
access log), and the worker groups as a cleanup context."""
from aiohttp import web

from serving.api import health, inference, management, metrics, openai, openapi
from serving.api.errors import json_errors
from serving.api.observe import ACCESS_LOG, METRICS, observe, send_request_id
from serving.config import ModelConfig, ServerSettings
from serving.drain import DRAIN, Drain
from serving.metrics import Metrics
from serving.registry import REGISTRY, ModelRegistry
MAX_BODY = 64 * 1024 * 1024


def make_app(configs: list[ModelConfig], settings: ServerSettings | None = None) -> web.Application:
    settings = settings or ServerSettings()
    app = web.Application(middlewares=[observe, json_errors], client_max_size=MAX_BODY)
    registry = app[REGISTRY] = ModelRegistry(configs)
    drain = app[DRAIN] = Drain()
    app[METRICS] = Metrics(models=lambda: registry.versions() + list(registry.retiring),
                           draining=lambda: drain.draining)
    app[ACCESS_LOG] = settings.access_log
    if settings.model_store is not None:
        app[management.MODEL_STORE] = settings.model_store
    for module in (inference, openai, health, management, metrics, openapi):
        app.add_routes(module.routes)
    app.on_response_prepare.append(send_request_id)
    app.cleanup_ctx.append(_worker_groups)
    return app


async def _worker_groups(app: web.Application):
    registry = app[REGISTRY]
    registry.start()
    yield
    await registry.stop()
