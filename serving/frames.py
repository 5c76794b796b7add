"""The frames between the front end and rank 0, and the units rank 0 broadcasts to the other ranks: one class per
kind, its fields declared once here, and their encoding (serving/protocol.py does the byte framing).

    front end -> rank 0           rank 0 -> front end                      rank 0 -> other ranks (UNITS)
    Init      init                Ready          ready                     Init      init
    Request   request             Progress       progress   (load stages)  Batch     batch  (one handle() call)
    Cancel    cancel              Started        started                   Step      step   (an engine step)
    Heartbeat heartbeat           Chunk          chunk                     Shutdown  shutdown
    Shutdown  shutdown            Response       response
                                  Error          error
                                  HeartbeatReply heartbeat

Each direction has its own set of kinds (`TO_RANK`, `FROM_RANK`, `UNITS`), so a frame can only be decoded as
one that may travel that way; `heartbeat` is a Heartbeat towards rank 0 and a HeartbeatReply back. On the wire
a frame is a msgpack map: its `kind` and its fields, a field that is None and may be None left out. Decoding
refuses an unknown kind, a missing field and a field the kind does not have (FrameError, a ProtocolError: the
peer cannot be trusted any more); the types of values are not checked, both ends being this code.

Why plain dataclasses (slots) over msgpack: frames are on the per-token hot path, and measured on the
development box a dataclass frame costs ~0.4 us to build, ~2 us to encode and ~3 us to decode (msgpack's C
code does the work), against ~0.1 / 0.4 / 0.8 us for msgspec Structs and several times ours for pydantic
models. A request costs the front end hundreds of microseconds and a chunk tens, and frames travel in batches
(one read, one write for many), so the few microseconds do not show in the benchmark (bench/frontend.py),
while msgspec would be one more compiled dependency for every image and the network-less GPU machines.
Payloads stay maps: a request's `input` is DJL's Input in wire form, a response's `output` is what
`Output.for_item` returns (both described below as TypedDicts).
"""
import threading
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, Iterable, TypedDict

import msgpack

from serving.protocol import HEADER, MAX_FRAME, ProtocolError


class FrameError(ProtocolError):
    """A map that is not a frame of the kinds that may travel this way, or lacks or adds fields."""


class RequestInput(TypedDict):
    """A request as the ranks' Input gets it: HTTP headers (lower-cased) and the body under content["data"]."""

    properties: dict[str, str]
    content: dict[str, bytes]


class OutputBody(TypedDict):
    """A handler's Output for one request (serving/rank/outputs.py: Output.for_item)."""

    code: int
    message: str
    properties: dict[str, str]
    content: list[tuple[str, bytes]]


class Frame:
    """Base of every frame class; `kind` names it on the wire."""

    __slots__ = ()
    kind: ClassVar[str] = ""
    _names: ClassVar[tuple[str, ...]] = ()

    def to_map(self) -> dict:
        message = {"kind": self.kind}
        for name in self._names:
            value = getattr(self, name)
            if value is not None:
                message[name] = value
        return message

    @classmethod
    def from_map(cls, message: dict) -> "Frame":
        """`message` without its kind; raises TypeError when its keys are not the class's fields."""
        return cls(**message)


def frame(kind: str):
    """Class decorator: a slotted dataclass frame of `kind`."""
    def make(cls):
        cls = dataclass(slots=True)(cls)
        cls.kind = kind
        cls._names = tuple(f.name for f in fields(cls))
        return cls
    return make


# --- front end -> rank 0 ---------------------------------------------------------------------------------

@frame("init")
class Init(Frame):
    """Load the handler on every rank (rank 0 broadcasts it as it came)."""

    properties: dict[str, str]
    entry_point: str


@frame("request")
class Request(Frame):
    id: int
    input: RequestInput


@frame("cancel")
class Cancel(Frame):
    """The client left: drop the request if it is queued, tell a running handler (Input.is_cancelled)."""

    id: int


@frame("heartbeat")
class Heartbeat(Frame):
    seq: int


@frame("shutdown")
class Shutdown(Frame):
    pass


# --- rank 0 -> front end ---------------------------------------------------------------------------------

@frame("ready")
class Ready(Frame):
    """The model loaded on every rank; `model` is what the handler tells of it (TGI's GET /info)."""

    model: dict | None = None


@frame("progress")
class Progress(Frame):
    """A load stage ended on rank 0 (model_loaded, engine_ready): /health/ready shows them with their times."""

    stage: str


@frame("started")
class Started(Frame):
    """Rank 0 began one unit of work with these requests (the front end times queue wait and batch occupancy)."""

    ids: list[int]


@frame("chunk")
class Chunk(Frame):
    """One streamed piece; the first chunk of a request may carry the response headers (`properties`)."""

    id: int
    data: bytes
    properties: dict[str, str] | None = None


@frame("response")
class Response(Frame):
    """The request's answer, or the end of its stream; an engine reports token counts in `usage`."""

    id: int
    output: OutputBody
    usage: dict[str, int] | None = None


@frame("error")
class Error(Frame):
    """The request failed (code, message for the client); without an id the whole group failed."""

    code: int
    message: str
    id: int | None = None


@frame("heartbeat")
class HeartbeatReply(Frame):
    """`progress` counts steps, chunks and finished units (it must move while `has_work`); `queued` requests wait
    on rank 0; `engine` is the rolling-batch engine's occupancy (running, waiting, kv_used_tokens, kv_total_tokens)."""

    seq: int
    progress: int
    has_work: bool
    queued: int
    engine: dict[str, int] | None = None


# --- rank 0 -> the other ranks ---------------------------------------------------------------------------

@frame("batch")
class Batch(Frame):
    """One handle() call on every rank: up to batch_size requests, and rank 0's seed so every rank samples alike."""

    seed: int
    items: list[Request]

    def to_map(self) -> dict:
        return {"kind": "batch", "seed": self.seed, "items": [[item.id, item.input] for item in self.items]}

    @classmethod
    def from_map(cls, message: dict) -> "Batch":
        if message.keys() != {"seed", "items"}:
            raise TypeError("fields")
        return cls(message["seed"], [Request(rid, data) for rid, data in message["items"]])


@frame("step")
class Step(Frame):
    """One rolling-batch engine step: the plan (serving/engine/plan.py), packed."""

    plan: bytes


# --- decoding --------------------------------------------------------------------------------------------

class Kinds:
    """The frame kinds that may travel one way, and decoding of their maps."""

    def __init__(self, name: str, *classes: type[Frame]):
        self.name = name
        self.classes = {cls.kind: cls for cls in classes}

    def decode(self, message: Any) -> Frame:
        if not isinstance(message, dict):
            raise FrameError(f"{self.name}: a frame is a map, not {type(message).__name__}: {message!r:.200}")
        kind = message.pop("kind", None)
        cls = self.classes.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise FrameError(f"{self.name}: unknown frame kind {kind!r} (expected one of "
                             f"{', '.join(sorted(self.classes))})")
        try:
            return cls.from_map(message)
        except (TypeError, KeyError, ValueError):
            raise FrameError(f"{self.name}: {describe_fields(cls, message)}") from None

    def unpack(self, body: bytes) -> Frame:
        """One frame body (the bytes after the length) -> its frame."""
        try:
            message = msgpack.unpackb(body, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise ProtocolError(f"{self.name}: frame is not msgpack: {exc}") from None
        return self.decode(message)


def describe_fields(cls: type[Frame], message: dict) -> str:
    declared = fields(cls)
    required = [f.name for f in declared if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in message]
    unknown = [str(key) for key in message if key not in cls._names]
    problems = []
    if missing:
        problems.append(f"missing field(s) {', '.join(missing)}")
    if unknown:
        problems.append(f"unknown field(s) {', '.join(unknown)}")
    return f"{cls.kind!r} frame: " + ("; ".join(problems) or f"malformed fields {message!r:.200}")


TO_RANK = Kinds("front end -> rank 0", Init, Request, Cancel, Heartbeat, Shutdown)
FROM_RANK = Kinds("rank 0 -> front end", Ready, Progress, Started, Chunk, Response, Error, HeartbeatReply)
UNITS = Kinds("rank 0 -> ranks", Init, Batch, Step, Shutdown)


class FrameBuffer:
    """Splits a byte stream into frames: feed whatever one read returned, get every frame it completed. One read
    of many frames costs one system call and one wake-up instead of two reads per frame."""

    def __init__(self, kinds: Kinds):
        self.kinds = kinds
        self._pieces: list[bytes] = []  # the start of an incomplete frame
        self._buffered = 0
        self._needed = 0  # bytes the incomplete frame needs before it is worth parsing again

    def feed(self, data: bytes) -> list[Frame]:
        if self._pieces:
            self._pieces.append(data)
            self._buffered += len(data)
            if self._buffered < self._needed:
                return []  # a large frame arriving in pieces is joined once, not once per piece
            data = b"".join(self._pieces)
            self._pieces, self._buffered = [], 0
        frames = []
        size, position, needed = len(data), 0, HEADER.size
        with memoryview(data) as view:
            while size - position >= HEADER.size:
                (length,) = HEADER.unpack_from(view, position)
                if length > MAX_FRAME:
                    raise ProtocolError(f"frame length {length} exceeds the {MAX_FRAME}-byte limit")
                needed = HEADER.size + length
                if position + needed > size:
                    break
                frames.append(self.kinds.unpack(view[position + HEADER.size:position + needed]))
                position += needed
                needed = HEADER.size
        if position < size:
            self._pieces, self._buffered, self._needed = [data[position:]], size - position, needed
        return frames


# --- encoding --------------------------------------------------------------------------------------------

_local = threading.local()  # a Packer per thread: reusing one halves the cost of packing (1.8 -> 0.9 us a frame)


def _packer() -> msgpack.Packer:
    try:
        return _local.packer
    except AttributeError:
        _local.packer = msgpack.Packer(use_bin_type=True)
        return _local.packer


def encode(frame: Frame) -> bytes:
    """One frame as it goes on the socket: a 4-byte big-endian length, then the msgpack map."""
    body = _packer().pack(frame.to_map())
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"{frame.kind} frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def encode_all(frames: Iterable[Frame]) -> bytes:
    """Several frames for one write."""
    return b"".join([encode(frame) for frame in frames])


def pack_units(units: list[Frame]) -> bytes:
    """What one broadcast carries to the other ranks: a msgpack array of units."""
    return _packer().pack([unit.to_map() for unit in units])


def unpack_units(data: bytes) -> list[Frame]:
    try:
        messages = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"broadcast is not msgpack: {exc}") from None
    if not isinstance(messages, list):
        raise FrameError(f"a broadcast is an array of units, not {type(messages).__name__}")
    return [UNITS.decode(message) for message in messages]


