"""The health contract, the same for every probe:

    GET /health/live    200 while the front end can serve HTTP (also while loading, failed or draining)
    GET /health/ready   200 only when every model is ready; 503 while loading (with each group's load
                        progress), after a fatal error, and while draining
    GET /ping           DJL's shape and codes: 200 {"status": "Healthy", ...} when ready, else 503 "Unhealthy"
"""
from aiohttp import web

from serving.api.errors import RETRY_AFTER
from serving.drain import DRAIN
from serving.registry import REGISTRY, ModelRegistry

routes = web.RouteTableDef()


@routes.get("/health/live")
async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


@routes.get("/health/ready")
async def ready(request: web.Request) -> web.Response:
    registry, draining = request.app[REGISTRY], request.app[DRAIN].draining
    is_ready = registry.all_ready() and not draining
    status = "draining" if draining else "ready" if is_ready else "not ready"
    models = {}
    for entry in registry.versions():
        groups = [{"state": group.state.value, "restarts": group.restarts,
                   "progress": {stage: round(seconds, 3) for stage, seconds in group.load_progress.items()},
                   **({"error": group.error} if group.error else {})} for group in entry.groups]
        models.setdefault(entry.name, {})[entry.version] = {
            "state": entry.state, "required": entry.required, "workerGroups": groups}
    return web.json_response({"status": status, "models": models}, status=200 if is_ready else 503,
                             headers=None if is_ready else {"Retry-After": RETRY_AFTER})


@routes.get("/ping")
async def ping(request: web.Request) -> web.Response:
    registry: ModelRegistry = request.app[REGISTRY]
    models = {name: {"status": "Healthy" if entry.state == "READY" and not entry.suspect else "Unhealthy",
                     "state": entry.state, **({"error": entry.error} if entry.error else {}),
                     **({"suspect": entry.suspect} if entry.suspect else {})}
              for name, entry in registry.groups.items()}
    healthy = registry.all_ready() and not request.app[DRAIN].draining
    return web.json_response({"status": "Healthy" if healthy else "Unhealthy", "models": models},
                             status=200 if healthy else 503, headers=None if healthy else {"Retry-After": RETRY_AFTER})
