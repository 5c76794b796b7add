"""GET /ping: 200 only when every model is ready and none is suspected of hanging (a Kubernetes readiness
probe), 503 otherwise (with Retry-After), with each model's state either way."""
from aiohttp import web

from serving.api.errors import RETRY_AFTER
from serving.registry import REGISTRY

routes = web.RouteTableDef()


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    models = {}
    for name, group in registry.groups.items():
        healthy = group.state.value == "READY" and not group.suspect
        models[name] = {"status": "Healthy" if healthy else "Unhealthy", "state": group.state.value,
                        **({"error": group.error} if group.error else {}),
                        **({"suspect": group.suspect} if group.suspect else {})}
    healthy = registry.all_ready()
    return web.json_response({"status": "Healthy" if healthy else "Unhealthy", "models": models},
                             status=200 if healthy else 503, headers=None if healthy else {"Retry-After": RETRY_AFTER})
