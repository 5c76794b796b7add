"""GET /ping: 200 only when every model is ready (a Kubernetes readiness probe), 503 otherwise, with each
model's state either way."""
from aiohttp import web

from serving.registry import REGISTRY

routes = web.RouteTableDef()


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    models = {name: {"status": "Healthy" if group.state.value == "READY" else "Unhealthy",
                     "state": group.state.value, **({"error": group.error} if group.error else {})}
              for name, group in registry.groups.items()}
    healthy = registry.all_ready()
    return web.json_response({"status": "Healthy" if healthy else "Unhealthy", "models": models},
                             status=200 if healthy else 503)
