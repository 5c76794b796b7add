"""POST /predictions/{model} and POST /invocations: relay the body to the model's ranks, relay the answer.

The front end checks what it can without the model (a JSON body that does not parse: 400; for the
built-in handler, LMI parameters against the schema: 422 naming the field) and queues the rest. When the
client goes away, the request is cancelled on the ranks.
"""
import asyncio
import json

from aiohttp import web
from pydantic import ValidationError

from serving.api.errors import error_response
from serving.config import BUILTIN_HANDLER
from serving.registry import REGISTRY, UnknownModel
from serving.schemas import GenerateRequest
from serving.worker_group import GroupUnavailable, Pending, QueueFull, WorkerGroup

routes = web.RouteTableDef()


@routes.post("/predictions/{model}")
async def predictions(request: web.Request) -> web.StreamResponse:
    return await _infer(request, lambda registry: registry.get(request.match_info["model"]))


@routes.post("/invocations")
async def invocations(request: web.Request) -> web.StreamResponse:
    name = request.query.get("model_name")
    return await _infer(request, lambda registry: registry.get(name) if name else registry.only())


async def _infer(request: web.Request, pick) -> web.StreamResponse:
    try:
        group = pick(request.app[REGISTRY])
    except UnknownModel as exc:
        return error_response(404, "ModelNotFound", str(exc))
    body = await request.read()
    problem = check_body(group, request.content_type, body)
    if problem is not None:
        return problem
    headers = {key.lower(): value for key, value in request.headers.items()}
    try:
        pending = group.submit({"properties": headers, "content": {"data": body}})
    except QueueFull as exc:
        return error_response(503, "QueueFull", str(exc))
    except GroupUnavailable as exc:
        return error_response(503, "ServiceUnavailable", str(exc))
    try:
        async with asyncio.timeout(group.config.predict_timeout):
            return await _relay(request, pending)
    except TimeoutError:
        group.cancel(pending)
        return error_response(504, "Timeout", f"no answer within option.predict_timeout="
                                              f"{group.config.predict_timeout} s")
    except BaseException:  # the client disconnected (handler cancelled) or we failed: stop the work
        group.cancel(pending)
        raise


def check_body(group: WorkerGroup, content_type: str, body: bytes) -> web.Response | None:
    """What the front end can refuse without the model: unparsable JSON, and bad LMI parameters."""
    if content_type != "application/json":
        if not body:
            return error_response(400, "BadRequest", "the request body is empty")
        return None
    try:
        payload = json.loads(body)
    except ValueError as exc:
        return error_response(400, "BadRequest", f"the body is not valid JSON: {exc}")
    if group.config.entry_point_module() == BUILTIN_HANDLER:
        try:
            GenerateRequest.model_validate(payload)
        except ValidationError as exc:
            return error_response(422, "ValidationError", describe_validation_error(exc))
    return None


def describe_validation_error(exc: ValidationError) -> str:
    messages = []
    for error in exc.errors():
        # a union's alternatives add their type name to the location (inputs.str, inputs.list[str])
        field = ".".join(str(part) for part in error["loc"] if not str(part).startswith(("str", "list[")))
        messages.append(f"{field or 'body'}: {error['msg']} (got {error.get('input')!r:.80})")
    return "; ".join(messages)


async def _relay(request: web.Request, pending: Pending) -> web.StreamResponse:
    frame = await pending.frames.get()
    if frame["kind"] == "error":
        return error_response(frame["code"], "HandlerError" if frame["code"] == 424 else "ServiceUnavailable",
                              frame["message"])
    if frame["kind"] == "response":
        return output_response(frame["output"])
    stream = web.StreamResponse(headers={"Content-Type": "application/jsonlines"})
    await stream.prepare(request)
    while frame["kind"] == "chunk":
        await stream.write(frame["data"])
        frame = await pending.frames.get()
    if frame["kind"] == "error":  # the status line is gone: the error becomes the stream's last line
        line = {"code": frame["code"], "type": "HandlerError", "message": frame["message"]}
        await stream.write((json.dumps(line) + "\n").encode())
    await stream.write_eof()
    return stream


def output_response(output: dict) -> web.Response:
    """A handler's Output as an HTTP response: its code, its properties as headers, its first content."""
    code = output["code"]
    content = output["content"]
    if code < 400 and not content:
        return error_response(424, "HandlerError", "the handler returned no content for this request")
    properties = dict(output["properties"])
    content_type = properties.pop("content-type", "application/octet-stream" if content else "application/json")
    headers = {key: value for key, value in properties.items() if key.isascii()}
    return web.Response(status=code, body=content[0][1] if content else b"", headers=headers,
                        content_type=content_type.split(";")[0])
