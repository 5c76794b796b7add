"""Frames between the front end and rank 0: a 4-byte big-endian length, then a msgpack map.

Every frame is a map with a `kind` and, where it concerns one request, its request `id`, so many requests
can be in flight on one socket. The kinds:

    front end -> rank 0            rank 0 -> front end
    init       {properties}        ready      {}               model loaded on every rank
    request    {id, input}         response   {id, output}     the handler's Output for that request
    cancel     {id}                chunk      {id, data}       one streamed piece (Output.add_stream_content)
    heartbeat  {seq}               error      {id?, code, message}   id missing: the whole group failed
    shutdown   {}                  heartbeat  {seq, progress, has_work, queued, engine?}  progress: a counter
                                                of steps, chunks and units that must move while has_work;
                                                engine: {running, waiting, kv_used_tokens, kv_total_tokens}
                                   started    {ids}            rank 0 began work on these requests (queue wait)
                                   progress   {stage}          optional, while loading (weights_loaded, ...)

The same encoding is used for the units rank 0 broadcasts to the other ranks (`pack` / `unpack`).
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
