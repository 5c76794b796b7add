"""GET /models and GET /models/{model}: what is served, its state and its effective configuration."""
from aiohttp import web

from serving.api.errors import error_response
from serving.registry import REGISTRY, UnknownModel

routes = web.RouteTableDef()


@routes.get("/models")
async def list_models(request: web.Request) -> web.Response:
    groups = request.app[REGISTRY].groups.values()
    return web.json_response({"models": [_summary(group) for group in groups]})


@routes.get("/models/{model}")
async def describe_model(request: web.Request) -> web.Response:
    try:
        group = request.app[REGISTRY].get(request.match_info["model"])
    except UnknownModel as exc:
        return error_response(404, "ModelNotFound", str(exc))
    config = group.config.model_dump(mode="json", by_alias=True, exclude={"options"})
    return web.json_response({**_summary(group), "config": config, "handler_properties":
                              group.config.handler_properties()})


def _summary(group) -> dict:
    return {"modelName": group.name, "modelUrl": str(group.config.model_dir), "state": group.state.value,
            "engine": group.config.engine, "tensor_parallel_degree": group.config.world_size,
            "loaded_in_ms": None if group.loaded_in is None else round(group.loaded_in * 1000),
            "restarts": group.restarts, "queued": len(group.requests), "error": group.error}
