"""Hugging Face TGI's API (text-generation-inference 3.x) for TGI's clients: huggingface_hub's InferenceClient, the
`text-generation` package, and benchmarks with a `tgi` backend.

    POST /                 TGI's compat route: {"inputs", "parameters", "stream"} -> [generation], or a stream
    POST /generate         {"inputs", "parameters"} -> {"generated_text", "details"?}
    POST /generate_stream  Server-Sent Events whatever the Accept header: one `data:` event per token, the last
                           one with generated_text (and details when asked)
    GET  /info             the model and this server's limits
    GET  /health           200 (empty body) when every model is ready; 503 {"error", "error_type"} otherwise

They serve the only model, or the one ?model_name= names (as /invocations does). The built-in handler writes TGI's
shapes on the ranks (serving/engine/formats.py); here the body is validated (422 naming the field), TGI's
defaults are applied, the request is relayed, and errors take TGI's shape {"error", "error_type"}: an HTTP error
with TGI's status code before a stream starts, a last `data:` event after. /predictions of a model with
option.tgi_compat=true goes through `predict` here too.
"""
import importlib.metadata
import json

from aiohttp import web
from pydantic import ValidationError

from serving.api.dispatch import DispatchError, dispatch
from serving.api.errors import RETRY_AFTER, describe_validation_error
from serving.config import BUILTIN_HANDLER
from serving.drain import DRAIN
from serving.engine.formats import FORMAT_PROPERTY, TGI, TGI_LIST
from serving.frames import Chunk, Response
from serving.registry import REGISTRY, ModelVersion, UnknownModel
from serving.schemas import (MAX_BEST_OF, MAX_PROMPTS, MAX_STOP_SEQUENCES, GenerateRequest, TGIError,
                             TGIGenerateRequest)

routes = web.RouteTableDef()
# TGI's error_type for each status (text-generation and huggingface_hub raise their exception types from it)
ERROR_TYPES = {400: "validation", 404: "not_found", 408: "validation", 413: "validation", 422: "validation",
               424: "generation", 429: "overloaded", 500: "incomplete_generation", 503: "unhealthy", 504: "timeout"}
try:
    VERSION = importlib.metadata.version("tpserve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    VERSION = "unknown"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@routes.post("/")
async def compat_generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, stream=None)


@routes.post("/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    return await _generate(request, stream=False)


@routes.post("/generate_stream")
async def generate_stream(request: web.Request) -> web.StreamResponse:
    return await _generate(request, stream=True)


@routes.get("/info")
async def info(request: web.Request) -> web.Response:
    try:
        model = _pick(request)
    except UnknownModel as exc:
        return tgi_error(404, str(exc))
    facts = next((group.model_facts for group in model.groups if group.model_facts), None)
    if facts is None:
        return tgi_error(503, f"model {model.name} is {model.state.lower()}; /info answers once it is ready")
    total = facts.get("max_total_tokens")
    return web.json_response({
        "model_id": model.name, "model_sha": None, "model_dtype": f"torch.{facts.get('dtype')}",
        "model_device_type": facts.get("device_type"), "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": model.config.job_queue_size, "max_best_of": MAX_BEST_OF,
        "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": total - 1 if total else None,
        "max_total_tokens": total, "validation_workers": 1, "max_client_batch_size": MAX_PROMPTS,
        "router": "tpserve", "version": VERSION, "sha": None, "docker_label": None})


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """TGI's health check; the Kubernetes probes stay /health/live and /health/ready (serving/api/health.py)."""
    if request.app[REGISTRY].all_ready() and not request.app[DRAIN].draining:
        return web.Response(status=200)
    return web.json_response(TGIError(error="unhealthy", error_type="healthcheck").model_dump(), status=503,
                             headers={"Retry-After": RETRY_AFTER})


async def _generate(request: web.Request, stream: bool | None) -> web.StreamResponse:
    """`stream` None: the body's `stream` decides (TGI's `/`, whose whole answer is a list of one)."""
    try:
        model = _pick(request)
    except UnknownModel as exc:
        return tgi_error(404, str(exc))
    try:
        body = TGIGenerateRequest.model_validate(json.loads(await request.read()))
    except RecursionError:
        return tgi_error(400, "the body is nested too deeply")
    except ValidationError as exc:
        return tgi_error(422, describe_validation_error(exc))
    except ValueError as exc:  # JSON or UTF-8 decoding
        return tgi_error(400, f"the body is not valid JSON: {exc}")
    streaming = body.stream if stream is None else stream
    if streaming and body.parameters.decoder_input_details:
        return tgi_error(422, "parameters.decoder_input_details: not supported when streaming tokens")
    if streaming and body.parameters.best_of > 1:
        return tgi_error(422, "parameters.best_of: must be 1 when streaming tokens")
    lmi = {"inputs": body.inputs, "parameters": body.parameters.model_dump(exclude_defaults=True), "stream": streaming}
    headers = {"content-type": "application/json", FORMAT_PROPERTY: TGI_LIST if stream is None else TGI}
    return await relay(request, model, json.dumps(lmi).encode(), headers)


async def predict(request: web.Request, model: ModelVersion, headers: dict[str, str]) -> web.StreamResponse:
    """/predictions and /invocations of a model with option.tgi_compat: the DJL body, TGI's answers and errors,
    and streams as Server-Sent Events whatever the client accepts."""
    body = await request.read()
    if request.content_type == "application/json":
        try:
            payload = json.loads(body)
        except RecursionError:
            return tgi_error(400, "the body is nested too deeply")
        except ValueError as exc:
            return tgi_error(400, f"the body is not valid JSON: {exc}")
        if model.config.entry_point_module() == BUILTIN_HANDLER:
            try:
                GenerateRequest.model_validate(payload)
            except ValidationError as exc:
                return tgi_error(422, describe_validation_error(exc))
    elif not body:
        return tgi_error(400, "the request body is empty")
    return await relay(request, model, body, headers)


async def relay(request: web.Request, model: ModelVersion, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
    """Send the request to the model's ranks; their answer as it is, their chunks (TGI's events) as SSE."""
    stream: web.StreamResponse | None = None
    try:
        async with dispatch(model, body, headers) as frames:
            async for frame in frames:
                if isinstance(frame, Chunk):
                    if stream is None:
                        stream = web.StreamResponse(headers=SSE_HEADERS)
                        await stream.prepare(request)
                    await stream.write(b"data:" + frame.data.rstrip(b"\n") + b"\n\n")
                elif isinstance(frame, Response) and stream is None:
                    return answer(frame.output)
                elif isinstance(frame, Response):
                    break
                else:
                    return await fail(stream, frame.code, frame.message)  # an Error frame
    except DispatchError as exc:
        return await fail(stream, 429 if exc.type == "QueueFull" else exc.code, exc.message)
    if stream is None:  # the frames ended without an answer
        return tgi_error(500, "the model answered nothing")
    await stream.write_eof()
    return stream


def answer(output: dict) -> web.Response:
    """A handler's whole answer; an error answer (422 from the ranks' checks, a handler's error) in TGI's shape."""
    content = output["content"][0][1] if output["content"] else b""
    if output["code"] >= 400:
        try:
            message = json.loads(content).get("message") or output["message"]
        except (ValueError, AttributeError):
            message = content[:500].decode("utf-8", "replace") or output["message"]
        return tgi_error(output["code"], message)
    if not content:
        return tgi_error(424, "the handler returned no content for this request")
    content_type = output["properties"].get("content-type", "application/json")
    return web.Response(body=content, headers={"Content-Type": content_type})


async def fail(stream: web.StreamResponse | None, code: int, message: str) -> web.StreamResponse:
    """Before the first event, an HTTP error; after it the status line is gone, so the stream ends with TGI's
    error event (`data:{"error", "error_type"}`)."""
    if stream is None:
        return tgi_error(code, message)
    error = TGIError(error=message, error_type=ERROR_TYPES.get(code, "generation"))
    await stream.write(b"data:" + error.model_dump_json().encode() + b"\n\n")
    await stream.write_eof()
    return stream


def tgi_error(code: int, message: str) -> web.Response:
    headers = {"Retry-After": RETRY_AFTER} if code in (429, 503) else None
    error = TGIError(error=message, error_type=ERROR_TYPES.get(code, "generation"))
    return web.json_response(error.model_dump(), status=code, headers=headers)


def _pick(request: web.Request) -> ModelVersion:
    name = request.query.get("model_name")
    registry = request.app[REGISTRY]
    return registry.get(name) if name else registry.only()
