"""The aiohttp application: routes of every API surface, and the worker groups as a cleanup context."""
from aiohttp import web

from serving.api import health, inference, management, openai, openapi
from serving.api.errors import json_errors
from serving.config import ModelConfig
from serving.registry import REGISTRY, ModelRegistry
MAX_BODY = 64 * 1024 * 1024


def make_app(configs: list[ModelConfig]) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    app[REGISTRY] = ModelRegistry(configs)
    for module in (inference, openai, health, management, openapi):
        app.add_routes(module.routes)
    app.cleanup_ctx.append(_worker_groups)
    return app


async def _worker_groups(app: web.Application):
    registry = app[REGISTRY]
    registry.start()
    yield
    await registry.stop()
