"""Frames between the front end and rank 0 on the wire: a 4-byte big-endian length, then a msgpack map.

Every frame is a map with a `kind` and, where it concerns one request, its request `id`, so many requests
can be in flight on one socket. The kinds, their fields and their classes are in serving/frames.py; this
module only frames bytes (and `read_frame` / `recv_frame` read one raw map, as the front end does while a
group loads).
"""
import asyncio
import socket
import struct

import msgpack

HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # a request body can be large (images, long prompts), but not unbounded


class ProtocolError(Exception):
    """The peer sent something that is not a frame: the connection cannot be trusted any more."""


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict:
    try:
        message = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:  # FormatError, ExtraData, StackError...
        raise ProtocolError(f"frame is not msgpack: {exc}") from None
    if not isinstance(message, dict) or "kind" not in message:
        raise ProtocolError(f"frame is not a map with a kind: {message!r:.200}")
    return message


def encode(message: dict) -> bytes:
    body = pack(message)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict:
    """Read one frame; raises asyncio.IncompleteReadError when the peer closed the socket."""
    (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} exceeds the {MAX_FRAME}-byte limit")
    return unpack(await reader.readexactly(length))


def recv_frame(sock: socket.socket) -> dict | None:
    """Blocking read of one frame for the rank side; None when the peer closed the socket."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} exceeds the {MAX_FRAME}-byte limit")
    body = _recv_exactly(sock, length)
    if body is None:
        return None
    return unpack(body)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        part = sock.recv(size - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)
