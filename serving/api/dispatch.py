"""Sending one request to a model's worker group and reading its frames back, shared by the inference and
OpenAI APIs: queueing errors become HTTP errors, the whole exchange is bounded by option.predict_timeout,
and a request whose client goes away (or times out) is cancelled on the ranks."""
import asyncio
import contextlib
from typing import AsyncIterator

from serving.worker_group import GroupUnavailable, QueueFull, WorkerGroup


class DispatchError(Exception):
    def __init__(self, code: int, type_: str, message: str):
        super().__init__(message)
        self.code, self.type, self.message = code, type_, message


@contextlib.asynccontextmanager
async def dispatch(group: WorkerGroup, body: bytes, headers: dict[str, str]) -> AsyncIterator[AsyncIterator[dict]]:
    """`async with dispatch(...) as frames: async for frame in frames:` yields the request's chunk frames, then
    its response or error frame. Leaving the block early (client gone, timeout, error) cancels the request."""
    try:
        pending = group.submit({"properties": headers, "content": {"data": body}})
    except QueueFull as exc:
        raise DispatchError(503, "QueueFull", str(exc)) from None
    except GroupUnavailable as exc:
        raise DispatchError(503, "ServiceUnavailable", str(exc)) from None
    deadline = asyncio.get_running_loop().time() + group.config.predict_timeout

    async def frames() -> AsyncIterator[dict]:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    frame = await pending.frames.get()
            except TimeoutError:
                raise DispatchError(504, "Timeout", f"no answer within option.predict_timeout="
                                                    f"{group.config.predict_timeout} s") from None
            yield frame
            if frame["kind"] != "chunk":
                return

    try:
        yield frames()
    finally:
        group.cancel(pending)  # a no-op once the final frame has arrived
