"""The management API, in DJL Serving's shapes:

    GET    /models?limit=&next_page_token=       served model versions, a page at a time
    GET    /models/{m}[/{version}]               one model (default version unless named), with its versions
    POST   /models?url=&model_name=&model_version=&tensor_parallel_degree=&min_worker=&synchronous=...
                                                 register a model folder from inside the model store
    PUT    /models/{m}[/{version}]?min_worker=&max_worker=&synchronous=
                                                 scale to min_worker worker groups (each its own mpirun)
    DELETE /models/{m}[/{version}]               drain (requests in flight finish), stop, forget

Changes (POST, PUT, DELETE) need the API key when the server has one (serving/api/auth.py checks it on every
route); without one they are allowed from loopback only. Configuration values whose key names a credential
are shown as *** (they never leave the process).
"""
import ipaddress
import re
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from aiohttp import web

from serving.api.auth import API_KEY, ENV as API_KEY_ENV
from serving.api.errors import error_response
from serving.api.observe import METRICS
from serving.config import ConfigError, load_model_config
from serving.drain import DRAIN
from serving.registry import REGISTRY, ModelExists, ModelVersion, NoDevices, UnknownModel

routes = web.RouteTableDef()
MODEL_STORE = web.AppKey("model_store", Path)  # absent: registration is refused
SECRET_KEY = re.compile(r"token|secret|passw|key|credential|auth|s3url", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
REDACTED = "***"
PAGE_LIMIT, MAX_PAGE_LIMIT = 100, 1000
# registration query parameters -> serving.properties keys (any option.* key passes as it is)
PROPERTY_PARAMS = {"engine": "engine", "tensor_parallel_degree": "option.tensor_parallel_degree",
                   "model_version": "model_version", "batch_size": "batch_size", "max_batch_delay": "max_batch_delay",
                   "job_queue_size": "job_queue_size", "entry_point": "option.entryPoint",
                   "dtype": "option.dtype", "model_loading_timeout": "option.model_loading_timeout",
                   "predict_timeout": "option.predict_timeout"}
CONTROL_PARAMS = {"url", "model_name", "min_worker", "max_worker", "synchronous"}


class BadRequest(Exception):
    pass


def change_refused(request: web.Request) -> web.Response | None:
    """None when the caller may change what is served: anyone the API-key middleware let through when the
    server has a key; from loopback only when it has none. Otherwise the 403 answer."""
    if request.app.get(API_KEY):
        return None
    try:
        if request.remote and ipaddress.ip_address(request.remote).is_loopback:
            return None
    except ValueError:
        pass
    return error_response(403, "Forbidden", f"management changes are allowed from loopback only (set {API_KEY_ENV} "
                                            f"to allow them with a bearer token)")


def guarded(handler):
    """Management changes: the caller check, no changes while draining, 400 for bad parameters."""
    async def wrapper(request: web.Request) -> web.StreamResponse:
        refused = change_refused(request)
        if refused is not None:
            return refused
        if request.app[DRAIN].draining:
            return error_response(503, "ServiceUnavailable", "the server is shutting down")
        try:
            return await handler(request)
        except BadRequest as exc:
            return error_response(400, "BadRequest", str(exc))
        except UnknownModel as exc:
            return error_response(404, "ModelNotFound", str(exc))
    return wrapper


# --- reading -------------------------------------------------------------------------------------
@routes.get("/models")
async def list_models(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", PAGE_LIMIT))
        start = int(request.query.get("next_page_token", 0))
    except ValueError:
        return error_response(400, "BadRequest", "limit and next_page_token must be integers")
    if not 1 <= limit <= MAX_PAGE_LIMIT or start < 0:
        return error_response(400, "BadRequest", f"limit must be 1..{MAX_PAGE_LIMIT}, next_page_token >= 0")
    entries = request.app[REGISTRY].versions()
    body = {"models": [summary(request, entry) for entry in entries[start:start + limit]]}
    if start + limit < len(entries):
        body["nextPageToken"] = str(start + limit)
    return web.json_response(body)


@routes.get("/models/{model}")
@routes.get("/models/{model}/{version}")
async def describe_model(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    name = request.match_info["model"]
    try:
        entry = registry.get(name, request.match_info.get("version"))
    except UnknownModel as exc:
        return error_response(404, "ModelNotFound", str(exc))
    groups = [{"id": index, "state": group.state.value, "pid": group.pid, "devices": group.devices,
               "loaded_in_ms": None if group.loaded_in is None else round(group.loaded_in * 1000),
               "progress": {stage: round(seconds, 3) for stage, seconds in group.load_progress.items()},
               "restarts": group.restarts, "consecutive_failures": group.failures, "suspect": group.suspect, "inFlight": len(group.requests), "error": group.error}
              for index, group in enumerate(entry.groups)]
    return web.json_response({**summary(request, entry),
                              "config": redact(entry.config.model_dump(mode="json", by_alias=True, exclude={"options"})),
                              "handler_properties": redact(entry.config.handler_properties()), "workerGroups": groups,
                              "versions": [summary(request, v) for v in registry.versions_of(name)]})


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


def summary(request: web.Request, entry: ModelVersion) -> dict:
    loaded = [group.loaded_in for group in entry.groups if group.loaded_in is not None]
    return {"modelName": entry.name, "version": entry.version,
            "default": request.app[REGISTRY].defaults.get(entry.name) == entry.version,
            "modelUrl": str(entry.config.model_dir), "state": entry.state, "engine": entry.config.engine,
            "tensor_parallel_degree": entry.config.world_size, "workers": len(entry.groups),
            "maxWorkers": entry.max_workers, "loaded_in_ms": round(loaded[0] * 1000) if loaded else None,
            "restarts": entry.restarts, "consecutive_failures": max((g.failures for g in entry.groups), default=0),
            "suspect": entry.suspect, "queued": sum(len(group.requests) for group in entry.groups),
            "error": entry.error}


# --- changing ------------------------------------------------------------------------------------
@routes.post("/models")
@guarded
async def register(request: web.Request) -> web.Response:
    query = request.query
    store = request.app.get(MODEL_STORE)
    if store is None:
        return error_response(400, "BadRequest", "registration needs a model store: start tpserve with --model-store")
    unknown = set(query) - CONTROL_PARAMS - set(PROPERTY_PARAMS) - {k for k in query if k.startswith("option.")}
    if unknown:
        raise BadRequest(f"unknown parameter(s) {', '.join(sorted(unknown))} (known: "
                         f"{', '.join(sorted(CONTROL_PARAMS | set(PROPERTY_PARAMS)))}, option.*)")
    folder = resolve_in_store(store, query.get("url", ""))
    overrides = {PROPERTY_PARAMS.get(key, key): value for key, value in query.items() if key not in CONTROL_PARAMS}
    try:
        config = load_model_config(folder, name=query.get("model_name") or None, overrides=overrides)
    except ConfigError as exc:
        raise BadRequest(str(exc)) from None
    workers, max_workers = worker_counts(query, default=1)
    registry = request.app[REGISTRY]
    try:
        entry = registry.add(config)
    except ModelExists as exc:
        return error_response(409, "ModelExists", str(exc))
    entry.max_workers = max_workers
    try:
        groups = entry.scale(workers)
    except NoDevices as exc:
        await registry.remove(entry.name, entry.version)
        return error_response(409, "InsufficientDevices", str(exc))
    label = f'Model "{entry.name}" version {entry.version}'
    if not synchronous(query):
        return web.json_response({"status": f"{label} registration scheduled."}, status=202)
    if not await loaded(entry, groups):
        error = entry.error or "did not load"
        await registry.remove(entry.name, entry.version)
        return error_response(500, "ModelLoadFailed", f"{label} failed to load and was unregistered: {error}")
    return web.json_response({"status": f"{label} registered."})


@routes.put("/models/{model}")
@routes.put("/models/{model}/{version}")
@guarded
async def scale(request: web.Request) -> web.Response:
    entry = request.app[REGISTRY].get(request.match_info["model"], request.match_info.get("version"))
    workers, max_workers = worker_counts(request.query, default=len(entry.groups))
    entry.max_workers = max_workers
    if workers < len(entry.groups):
        await entry.shrink(workers)
    else:
        try:
            groups = entry.scale(workers)
        except NoDevices as exc:
            return error_response(409, "InsufficientDevices", str(exc))
        if synchronous(request.query) and not await loaded(entry, groups):
            return error_response(500, "ModelLoadFailed", f"new worker groups of {entry.name} failed: {entry.error}")
    return web.json_response({"status": f'Model "{entry.name}" version {entry.version} worker scaled. '
                                        f'New Worker count: {len(entry.groups)}'})


@routes.delete("/models/{model}")
@routes.delete("/models/{model}/{version}")
@guarded
async def unregister(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    removed = await request.app[REGISTRY].remove(name, request.match_info.get("version"))
    for entry in removed:
        request.app[METRICS].forget(entry.name, entry.version)
    versions = ", ".join(entry.version for entry in removed)
    return web.json_response({"status": f'Model "{name}" unregistered (version {versions}).'})


# --- helpers -------------------------------------------------------------------------------------
def resolve_in_store(store: Path, url: str) -> Path:
    """A registration url names a folder inside the model store: `name`, `sub/dir`, an absolute path inside
    the store, or `file://` + such a path. No `..`, no other scheme (nothing is downloaded)."""
    if not url:
        raise BadRequest("url is required: a folder inside the model store")
    parts = urlsplit(url)
    if parts.scheme not in ("", "file"):
        raise BadRequest(f"url scheme {parts.scheme!r} is not supported: give a folder inside the model store "
                         f"(a name, a relative path or file:///path)")
    if parts.scheme == "file" and parts.netloc not in ("", "localhost"):
        raise BadRequest(f"url {url!r}: file urls name a local path (file:///...)")
    raw = unquote(parts.path) if parts.scheme == "file" else url
    if ".." in PurePosixPath(raw).parts:
        raise BadRequest(f"url {url!r}: '..' is not allowed")
    root = store.resolve()
    folder = (root / raw).resolve()  # an absolute raw replaces root
    if folder == root or not folder.is_relative_to(root):
        raise BadRequest(f"url {url!r} is outside the model store {root}")
    if not folder.is_dir():
        raise BadRequest(f"url {url!r}: no such folder in the model store")
    return folder


def worker_counts(query, default: int) -> tuple[int, int]:
    try:
        workers = int(query.get("min_worker", default))
        max_workers = int(query.get("max_worker", max(workers, 1)))
    except ValueError:
        raise BadRequest("min_worker and max_worker must be integers") from None
    if workers < 1 or max_workers < workers:
        raise BadRequest(f"need 1 <= min_worker <= max_worker (got {workers}, {max_workers})")
    return workers, max_workers


def synchronous(query) -> bool:
    return query.get("synchronous", "true").lower() != "false"


async def loaded(entry: ModelVersion, groups) -> bool:
    try:
        return await entry.wait_loaded(groups, entry.config.model_loading_timeout + 30)
    except TimeoutError:
        return False

