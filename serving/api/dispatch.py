"""Sending one request to a model's worker group and reading its frames back, shared by the inference and
OpenAI APIs: queueing errors become HTTP errors, the whole exchange is bounded by option.predict_timeout,
and a request whose client goes away (or times out) is cancelled on the ranks.

Every request passes here, so this is where its latencies are measured (serving/metrics.py's RequestTimer,
from the frames relayed: any handler, custom streams included) and where its X-Request-Id joins the
properties the ranks see.
"""
import asyncio
import contextlib
from typing import AsyncIterator

from serving.api.observe import current
from serving.metrics import RequestTimer
from serving.registry import ModelVersion
from serving.worker_group import GroupUnavailable, QueueFull


class DispatchError(Exception):
    def __init__(self, code: int, type_: str, message: str):
        super().__init__(message)
        self.code, self.type, self.message = code, type_, message


@contextlib.asynccontextmanager
async def dispatch(model: ModelVersion, body: bytes, headers: dict[str, str]) -> AsyncIterator[AsyncIterator[dict]]:
    """`async with dispatch(...) as frames: async for frame in frames:` yields the request's chunk frames, then
    its response or error frame. Leaving the block early (client gone, timeout, error) cancels the request."""
    context = current()
    context.model, context.version = model.name, model.version
    timer = RequestTimer(context.metrics, model.name, model.version)
    try:
        group = model.pick()
        pending = group.submit({"properties": {**headers, "x-request-id": context.id}, "content": {"data": body}})
    except QueueFull as exc:
        raise DispatchError(503, "QueueFull", str(exc)) from None
    except GroupUnavailable as exc:
        raise DispatchError(503, "ServiceUnavailable", str(exc)) from None
    timer.pending_id = pending.id
    deadline = asyncio.get_running_loop().time() + model.config.predict_timeout

    async def frames() -> AsyncIterator[dict]:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    frame = await pending.frames.get()
            except TimeoutError:
                raise DispatchError(504, "Timeout", f"no answer within option.predict_timeout="
                                                    f"{model.config.predict_timeout} s") from None
            timer.on_frame(frame)
            if frame["kind"] == "started":  # for the timer only
                continue
            yield frame
            if frame["kind"] != "chunk":
                return

    try:
        yield frames()
    finally:
        group.cancel(pending)  # a no-op once the final frame has arrived
        timer.finish()
        record(context, timer)


def record(context, timer: RequestTimer) -> None:
    """What the access log tells of this request (several dispatches, as for OpenAI's n > 1, add up)."""
    context.prompt_tokens += timer.prompt_tokens or 0
    context.generated_tokens += timer.generated_tokens or 0
    for name, value in (("queue", timer.queue_wait), ("ttft", timer.first and timer.first - timer.submitted),
                        ("e2e", timer.ended and timer.ended - timer.submitted)):
        if value is not None:
            context.timings.setdefault(name, value)
