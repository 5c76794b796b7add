"""What a handler returns, with DJL Serving's method names (djl_python.outputs.Output).

Content is a list of (key, bytes, batch_index) entries. The HTTP response body of a request is the first
entry meant for it; a batch handler tags entries with batch_index (DJL's contract). A streaming handler
passes a generator to add_stream_content(); every item it yields is sent to the client as one chunk.
"""
import json
from typing import Any, Iterable

JSON = "application/json"
ERROR_TYPES = {400: "BadRequest", 422: "ValidationError", 503: "ServiceUnavailable"}


class Output:
    def __init__(self, code: int = 200, message: str = "OK"):
        self.code = code
        self.message = message
        self.properties: dict[str, str] = {}
        self.content: list[tuple[str, bytes, int | None]] = []
        self.item_errors: dict[int, tuple[int, str]] = {}
        self.stream_content: Iterable[Any] | None = None

    def set_code(self, code: int) -> "Output":
        self.code = code
        return self

    def set_message(self, message: str) -> "Output":
        self.message = message
        return self

    def add_property(self, key: str, value: str) -> "Output":
        self.properties[key.lower()] = str(value)
        return self

    def add(self, value: Any, key: str | None = None, batch_index: int | None = None) -> "Output":
        """bytes go as they are, str as UTF-8, anything else as JSON."""
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, str):
            data = value.encode("utf-8")
        else:
            data = json.dumps(value, ensure_ascii=False).encode("utf-8")
            self.properties.setdefault("content-type", JSON)
        self.content.append((key or "data", data, batch_index))
        return self

    def add_as_json(self, value: Any, key: str | None = None, batch_index: int | None = None) -> "Output":
        self.properties.setdefault("content-type", JSON)
        self.content.append((key or "data", json.dumps(value, ensure_ascii=False).encode("utf-8"), batch_index))
        return self

    def add_stream_content(self, stream: Iterable[Any], output_formatter: Any = None) -> "Output":
        """Stream `stream`'s items to the client as they are produced. Every rank iterates the generator (it
        usually drives the forward passes); rank 0's items are sent. `output_formatter` (DJL) is accepted:
        a callable applied to each item before it is sent."""
        self.stream_content = stream if output_formatter is None else (output_formatter(item) for item in stream)
        return self

    def error(self, error: str, code: int = 424, message: str = "prediction failure", key: str | None = None,
              batch_index: int | None = None) -> "Output":
        """Fail the request (or one item of a batch) with `code` and a JSON body in the server's error shape
        (`{"code", "type", "message"}`, plus DJL's `error`)."""
        if batch_index is None:
            self.code, self.message = code, message
        else:
            self.item_errors[batch_index] = (code, message)
        body = {"code": code, "type": ERROR_TYPES.get(code, "HandlerError"), "message": message, "error": error}
        return self.add_as_json(body, key, batch_index)

    # --- used by the relay ---------------------------------------------------------------------
    def for_item(self, index: int, batch_size: int) -> dict:
        """The wire form of this Output for item `index` of a batch of `batch_size` requests."""
        code, message = self.item_errors.get(index, (self.code, self.message))
        entries = [(key, data) for key, data, i in self.content if i == index or (i is None and batch_size == 1)]
        return {"code": code, "message": message, "properties": self.properties, "content": entries}
