"""The handler's view of a request, with DJL Serving's method names (djl_python.inputs.Input).

`properties` hold the model's properties (what get_model receives) plus the request's headers, lower-cased;
`content` holds named byte strings, the HTTP body under "data". A batch (rank 0 grouped several requests)
is an Input whose get_batches() returns one Input per request.
"""
import json
from typing import Any, Callable


class Input:
    def __init__(self, properties: dict[str, str] | None = None, content: dict[str, bytes] | None = None,
                 batch: list["Input"] | None = None, cancelled: Callable[[], bool] | None = None,
                 chunk_writer: Callable[[Any], None] | None = None):
        self.properties = dict(properties or {})
        self.content = dict(content or {})
        self._batch = batch
        self._cancelled = cancelled or (lambda: False)
        self._chunk_writer = chunk_writer or (lambda item: None)

    # --- DJL's API -----------------------------------------------------------------------------
    def get_properties(self) -> dict[str, str]:
        return self.properties

    def get_property(self, key: str, default: Any = None) -> Any:
        return self.properties.get(key.lower(), self.properties.get(key, default))

    def get_content(self) -> dict[str, bytes]:
        return self.content

    def get_as_bytes(self, key: str | None = None) -> bytes:
        if key is not None:
            if key not in self.content:
                raise KeyError(f"the request has no content named {key!r}")
            return self.content[key]
        if "data" in self.content:
            return self.content["data"]
        if not self.content:
            raise ValueError("the request has no content")
        return next(iter(self.content.values()))

    def get_as_string(self, key: str | None = None) -> str:
        return self.get_as_bytes(key).decode("utf-8")

    def get_as_json(self, key: str | None = None) -> Any:
        return json.loads(self.get_as_bytes(key))

    def is_empty(self) -> bool:
        return not self.content and not self._batch

    def is_batch(self) -> bool:
        return self.get_batch_size() > 1

    def get_batch_size(self) -> int:
        return len(self._batch) if self._batch else 1

    def get_batches(self) -> list["Input"]:
        return list(self._batch) if self._batch else [self]

    # --- tpserve's additions -------------------------------------------------------------------
    def is_cancelled(self) -> bool:
        """True once the client of this request went away. Meaningful on rank 0 only: a handler that stops
        early must make every rank stop at the same step (the built-in handler broadcasts the decision)."""
        return self._cancelled()

    def write_chunk(self, item: Any) -> None:
        """Stream `item` to the client now (rank 0; a no-op on the other ranks). The push form of
        Output.add_stream_content for handlers that produce output from inside a call they cannot turn into a
        generator (such as generate() with a callback): it keeps that work on the calling thread. bytes go as
        they are, str as UTF-8, anything else as one JSON line. The Output handle() returns ends the stream."""
        self._chunk_writer(item)

    def __repr__(self) -> str:
        sizes = {key: len(value) for key, value in self.content.items()}
        return f"Input(batch_size={self.get_batch_size()}, content={sizes})"
