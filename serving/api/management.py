"""GET /models and GET /models/{model}: what is served, its state and its effective configuration, with
secrets redacted (a configuration value never leaves the process if its key looks like a credential)."""
import re

from aiohttp import web

from serving.api.errors import error_response
from serving.registry import REGISTRY, UnknownModel

routes = web.RouteTableDef()
SECRET_KEY = re.compile(r"token|secret|passw|key|credential|auth|s3url", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
REDACTED = "***"


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
    return web.json_response({**_summary(group), "config": redact(config),
                              "handler_properties": redact(group.config.handler_properties())})


def redact(values: dict) -> dict:
    """Values of keys that name a credential become ***, and so do user:password@ parts of URLs."""
    result = {}
    for key, value in values.items():
        if SECRET_KEY.search(key) and value not in (None, ""):
            result[key] = REDACTED
        elif isinstance(value, str):
            result[key] = URL_CREDENTIALS.sub(REDACTED + "@", value)
        else:
            result[key] = value
    return result


def _summary(group) -> dict:
    return {"modelName": group.name, "modelUrl": str(group.config.model_dir), "state": group.state.value,
            "engine": group.config.engine, "tensor_parallel_degree": group.config.world_size,
            "loaded_in_ms": None if group.loaded_in is None else round(group.loaded_in * 1000),
            "restarts": group.restarts, "consecutive_failures": group.failures, "suspect": group.suspect,
            "queued": len(group.requests), "error": group.error}
