"""Sending one request to a model's worker group and reading its frames back, shared by the inference and
OpenAI APIs: queueing errors become HTTP errors, the whole exchange is bounded by option.predict_timeout,
and a request whose client goes away (or times out) is cancelled on the ranks.

Every request passes here, so this is where its latencies are measured (serving/metrics.py's RequestTimer,
from the frames relayed: any handler, custom streams included) and where its X-Request-Id joins the
properties the ranks see.
"""
import asyncio

from serving.api.observe import current
from serving.frames import Chunk, Frame
from serving.metrics import RequestTimer
from serving.registry import ModelVersion
from serving.worker_group import GroupUnavailable, Pending, QueueFull, WorkerGroup

TIMED_OUT = object()  # pushed to a request's frames when option.predict_timeout passes


class DispatchError(Exception):
    def __init__(self, code: int, type_: str, message: str):
        super().__init__(message)
        self.code, self.type, self.message = code, type_, message


def dispatch(model: ModelVersion, body: bytes, headers: dict[str, str]) -> "Exchange":
    """`async with dispatch(...) as frames: async for frame in frames:` yields the request's chunk frames, then
    its response or error frame. Leaving the block early (client gone, timeout, error) cancels the request.
    `frames.ready()` tells whether more frames are already here, so a stream can write them in one go."""
    return Exchange(model, body, headers)


class Exchange:
    """One request's submission and its frames (see dispatch)."""

    __slots__ = ("model", "body", "headers", "context", "timer", "group", "pending", "_deadline", "_done")

    def __init__(self, model: ModelVersion, body: bytes, headers: dict[str, str]):
        self.model, self.body, self.headers = model, body, headers
        self._done = False

    async def __aenter__(self) -> "Exchange":
        context = self.context = current()
        model = self.model
        context.model, context.version = model.name, model.version
        self.timer = RequestTimer(context.metrics, model.name, model.version)
        try:
            self.group: WorkerGroup = model.pick()
            self.pending: Pending = self.group.submit({"properties": {**self.headers, "x-request-id": context.id},
                                                       "content": {"data": self.body}})
        except QueueFull as exc:
            raise DispatchError(503, "QueueFull", str(exc)) from None
        except GroupUnavailable as exc:
            raise DispatchError(503, "ServiceUnavailable", str(exc)) from None
        self.timer.pending_id = self.pending.id
        self.pending.on_started = self.timer.on_frame  # the queue wait is timed as the frame arrives
        # one timer for the whole exchange rather than a timeout around every frame
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_at(loop.time() + model.config.predict_timeout, self.pending.push, TIMED_OUT)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._deadline.cancel()
        self.group.cancel(self.pending)  # a no-op once the final frame has arrived
        self.timer.finish()
        record(self.context, self.timer)

    def __aiter__(self) -> "Exchange":
        return self

    async def __anext__(self) -> Frame:
        if self._done:
            raise StopAsyncIteration
        frame = await self.pending.next()
        if frame is TIMED_OUT:
            self._done = True
            raise DispatchError(504, "Timeout", f"no answer within option.predict_timeout="
                                                f"{self.model.config.predict_timeout} s")
        self.timer.on_frame(frame)
        if not isinstance(frame, Chunk):
            self._done = True
        return frame

    def ready(self) -> bool:
        return self.pending.ready() > 0


def record(context, timer: RequestTimer) -> None:
    """What the access log tells of this request (several dispatches, as for OpenAI's n > 1, add up)."""
    context.prompt_tokens += timer.prompt_tokens or 0
    context.generated_tokens += timer.generated_tokens or 0
    for name, value in (("queue", timer.queue_wait), ("ttft", timer.first and timer.first - timer.submitted),
                        ("e2e", timer.ended and timer.ended - timer.submitted)):
        if value is not None:
            context.timings.setdefault(name, value)
