"""POST /predictions/{model}[/{version}] and POST /invocations: relay the body to the model's ranks, relay the answer.

The front end checks what it can without the model (a JSON body that does not parse: 400; for the
built-in handler, LMI parameters against the schema: 422 naming the field) and queues the rest. When the
client goes away, the request is cancelled on the ranks. A model with option.tgi_compat=true answers in TGI's
shapes instead (serving/api/tgi.py: `predict`).
"""
import json

from aiohttp import web
from pydantic import ValidationError

from serving.api import tgi
from serving.api.dispatch import DispatchError, dispatch
from serving.api.errors import UNION_BRANCHES, describe_validation_error, error_response  # noqa: F401 (openai.py)
from serving.config import BUILTIN_HANDLER
from serving.engine.formats import FORMAT_PROPERTY
from serving.frames import Chunk, OutputBody, Response
from serving.registry import REGISTRY, ModelVersion, UnknownModel
from serving.schemas import GenerateRequest

routes = web.RouteTableDef()


@routes.post("/predictions/{model}")
async def predictions(request: web.Request) -> web.StreamResponse:
    return await _infer(request, lambda registry: registry.get(request.match_info["model"]))


@routes.post("/predictions/{model}/{version}")
async def predictions_of_version(request: web.Request) -> web.StreamResponse:
    return await _infer(request, lambda registry: registry.get(request.match_info["model"],
                                                               request.match_info["version"]))


@routes.post("/invocations")
async def invocations(request: web.Request) -> web.StreamResponse:
    name = request.query.get("model_name")
    return await _infer(request, lambda registry: registry.get(name) if name else registry.only())


async def _infer(request: web.Request, pick) -> web.StreamResponse:
    try:
        group = pick(request.app[REGISTRY])
    except UnknownModel as exc:
        return error_response(404, "ModelNotFound", str(exc))
    # the format of the answer is the route's and the model's choice, not a header's
    headers = {key.lower(): value for key, value in request.headers.items() if key.lower() != FORMAT_PROPERTY}
    if group.config.tgi_compat:
        return await tgi.predict(request, group, headers)
    body = await request.read()
    problem = check_body(group, request.content_type, body)
    if problem is not None:
        return problem
    stream: web.StreamResponse | None = None
    lines: list[bytes] = []  # chunks that arrived together, written together
    try:
        async with dispatch(group, body, headers) as frames:
            async for frame in frames:
                if isinstance(frame, Chunk):
                    if stream is None:
                        stream = await start_stream(request, group, frame.properties or {})
                    lines.append(stream_line(stream, frame.data))
                    if not frames.ready():
                        await stream.write(b"".join(lines))
                        lines.clear()
                    continue
                if lines:
                    await stream.write(b"".join(lines))
                    lines.clear()
                if isinstance(frame, Response):  # the whole answer, or the end of a stream
                    if stream is None:
                        return output_response(frame.output)
                    await stream.write_eof()
                    return stream
                return await finish_with_error(stream, frame.code, frame.message)  # an Error frame
    except DispatchError as exc:
        if lines:
            await stream.write(b"".join(lines))
        return await finish_with_error(stream, exc.code, exc.message, exc.type)
    return stream


def wants_sse(request: web.Request, group: ModelVersion) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "") or group.config.output_formatter == "sse"


async def start_stream(request: web.Request, group: ModelVersion, properties: dict) -> web.StreamResponse:
    sse = wants_sse(request, group)
    content_type = "text/event-stream" if sse else properties.get("content-type", "application/jsonlines")
    stream = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    stream["sse"] = sse
    await stream.prepare(request)
    return stream


def stream_line(stream: web.StreamResponse, data: bytes) -> bytes:
    return b"data: " + data.rstrip(b"\n") + b"\n\n" if stream["sse"] else data


async def finish_with_error(stream: web.StreamResponse | None, code: int, message: str,
                            type_: str | None = None) -> web.StreamResponse:
    """Before the first chunk, an ordinary error response; after it the status line is gone, so the stream
    ends with a last object whose finish_reason is `error`."""
    type_ = type_ or ("HandlerError" if code == 424 else "ServiceUnavailable")
    if stream is None:
        return error_response(code, type_, message)
    last = {"token": None, "generated_text": None, "details": {"finish_reason": "error"},
            "error": {"code": code, "type": type_, "message": message}}
    await stream.write(stream_line(stream, (json.dumps(last) + "\n").encode()))
    await stream.write_eof()
    return stream


def check_body(group: ModelVersion, content_type: str, body: bytes) -> web.Response | None:
    """What the front end can refuse without the model: unparsable JSON, and bad LMI parameters."""
    if content_type != "application/json":
        if not body:
            return error_response(400, "BadRequest", "the request body is empty")
        if content_type.startswith("text/") and not is_utf8(body):
            return error_response(400, "BadRequest", "the text body is not valid UTF-8")
        return None
    try:
        payload = json.loads(body)
    except RecursionError:
        return error_response(400, "BadRequest", "the body is nested too deeply")
    except ValueError as exc:  # a JSON or UTF-8 decoding error
        return error_response(400, "BadRequest", f"the body is not valid JSON: {exc}")
    if group.config.entry_point_module() == BUILTIN_HANDLER:
        try:
            GenerateRequest.model_validate(payload)
        except ValidationError as exc:
            return error_response(422, "ValidationError", describe_validation_error(exc))
    return None


def is_utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def output_response(output: OutputBody) -> web.Response:
    """A handler's Output as an HTTP response: its code, its properties as headers, its first content."""
    code = output["code"]
    content = output["content"]
    if code < 400 and not content:
        return error_response(424, "HandlerError", "the handler returned no content for this request")
    properties = dict(output["properties"])
    content_type = properties.pop("content-type", "application/octet-stream" if content else "application/json")
    headers = {key: value for key, value in properties.items() if key.isascii()}
    headers["Content-Type"] = content_type  # as the handler wrote it, charset included
    return web.Response(status=code, body=content[0][1] if content else b"", headers=headers)
