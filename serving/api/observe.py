"""What every request goes through first: its id (X-Request-Id, accepted or generated, sent back, passed to the
ranks and put on every log line), the drain gate (503 + Retry-After for new inference once SIGTERM came), the
request counter, and one access-log line.

The request's context travels in a contextvar, so serving/api/dispatch.py fills in the model, tokens and
latencies without the API modules passing anything along.
"""
import asyncio
import contextvars
import logging
import random
import re
import time
from dataclasses import dataclass, field

from aiohttp import web

from serving.api.errors import error_response
from serving.drain import DRAIN, RETRY_AFTER
from serving.logs import REQUEST_ID
from serving.metrics import Metrics

log = logging.getLogger("tpserve.access")

METRICS = web.AppKey("metrics", Metrics)
ACCESS_LOG = web.AppKey("access_log", bool)
INFERENCE_ROUTES = {"/predictions/{model}", "/predictions/{model}/{version}", "/invocations",
                    "/v1/completions", "/v1/chat/completions", "/", "/generate", "/generate_stream"}
# probes and scrapes: not access-logged
QUIET_ROUTES = {"/health", "/health/live", "/health/ready", "/ping", "/metrics"}
REQUEST_ID_HEADER = "X-Request-Id"
VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")  # what may go into logs and frames unescaped
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # a random 128-bit number's version nibble and variant bits
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant


@dataclass(slots=True)
class RequestContext:
    id: str
    metrics: Metrics | None = None
    model: str = ""
    version: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # queue, ttft, e2e (seconds), first dispatch's


CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar("request_context", default=None)


def current() -> RequestContext:
    """The request being handled (a throwaway one outside a request, e.g. in unit tests)."""
    context = CURRENT.get()
    return context if context is not None else RequestContext(id=new_request_id())


def new_request_id() -> str:
    """A random version-4 UUID in hex, from Python's generator: uuid4() asks the kernel for 16 bytes per request.
    An id for logs and tracing, not a secret."""
    return f"{random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET:032x}"


@web.middleware
async def observe(request: web.Request, handler):
    given = request.headers.get(REQUEST_ID_HEADER, "")
    context = RequestContext(id=given if VALID_ID.match(given) else new_request_id(), metrics=request.app[METRICS])
    request["context"] = context
    CURRENT.set(context)  # the handler's task has a copy of this context: no reset needed
    REQUEST_ID.set(context.id)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    started = time.monotonic()
    drain = request.app[DRAIN]
    inference = route in INFERENCE_ROUTES
    status = 500
    try:
        if inference and drain.draining:
            response = error_response(503, "ServiceUnavailable", "the server is shutting down; retry on another instance")
            response.headers["Retry-After"] = str(RETRY_AFTER)
        elif inference:
            drain.enter()
            try:
                response = await handler(request)
            finally:
                drain.leave()
        else:
            response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it)
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        context.metrics.count_request(context.model, context.version, route, status)
        if request.app[ACCESS_LOG] and route not in QUIET_ROUTES:
            access_line(request, context, status, time.monotonic() - started)


async def send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones included, names its request id."""
    context = request.get("context")
    if context is not None:
        response.headers[REQUEST_ID_HEADER] = context.id


def access_line(request: web.Request, context: RequestContext, status: int, seconds: float) -> None:
    fields = {"request_id": context.id, "method": request.method, "path": request.path, "status": status,
              "model": context.model or None, "version": context.version or None,
              "prompt_tokens": context.prompt_tokens or None, "generated_tokens": context.generated_tokens or None,
              "duration_ms": round(seconds * 1000, 1),
              **{f"{name}_ms": round(value * 1000, 1) for name, value in context.timings.items()}}
    text = " ".join(f"{key}={value}" for key, value in fields.items() if value is not None and key != "request_id")
    log.info("%s", text, extra={"fields": fields})
