"""Rank 0's relay without ranks: which units one broadcast carries, and frames going out through the writer."""
import socket
import threading
import time

import pytest

from serving.frames import FROM_RANK, Batch, Cancel, FrameBuffer, Request, Response, Started, encode
from serving.rank.comm import SoloComm
from serving.rank.relay import MAX_UNITS, Relay

INPUT = {"properties": {}, "content": {"data": b"x"}}


@pytest.fixture
def relay():
    relay = Relay(SoloComm(), worker=None, socket_path="unused")
    relay.conn, peer = socket.socketpair()
    yield relay, peer
    relay.conn.close()
    peer.close()


def queue(relay: Relay, *ids: int) -> None:
    with relay.cond:
        for rid in ids:
            relay.pending[rid] = Request(rid, INPUT)
        relay.cond.notify_all()


def test_one_broadcast_carries_every_full_batch_already_queued(relay):
    relay, _ = relay
    relay.batch_size = 2
    queue(relay, *range(1, 8))
    units = relay._next_units()
    assert [[item.id for item in unit.items] for unit in units] == [[1, 2], [3, 4], [5, 6]]
    assert all(isinstance(unit, Batch) for unit in units)
    assert list(relay.pending) == [7]  # a partial batch waits for its own max_batch_delay


def test_a_broadcast_carries_at_most_max_units(relay):
    relay, _ = relay
    queue(relay, *range(MAX_UNITS + 5))
    assert len(relay._next_units()) == MAX_UNITS
    assert len(relay._next_units()) == 5


def test_requests_cancelled_while_a_batch_fills_leave_no_empty_unit(relay):
    relay, _ = relay
    relay.batch_size, relay.max_batch_delay = 4, 0.2
    queue(relay, 1)
    result = []
    taker = threading.Thread(target=lambda: result.append(relay._next_units()))
    taker.start()
    time.sleep(0.05)
    with relay.cond:  # what the reader thread does with a cancel for a queued request
        relay.pending.pop(1)
        relay.cond.notify_all()
    time.sleep(0.3)  # the batch delay passes with nothing queued: still waiting
    assert taker.is_alive()
    queue(relay, 2)
    taker.join(5)
    assert [[item.id for item in unit.items] for unit in result[0]] == [[2]]


def test_frames_queued_together_leave_in_order(relay):
    relay, peer = relay
    relay._send(Started([1, 2]))
    relay.send_frames([Response(1, {"code": 200, "message": "OK", "properties": {}, "content": []}),
                       Response(2, {"code": 200, "message": "OK", "properties": {}, "content": []})])
    relay.flush()
    peer.settimeout(5)
    buffer, frames = FrameBuffer(FROM_RANK), []
    while len(frames) < 3:
        frames += buffer.feed(peer.recv(1 << 16))
    assert [(type(f).__name__, getattr(f, "id", None)) for f in frames] == \
        [("Started", None), ("Response", 1), ("Response", 2)]


def test_cancel_of_a_queued_request_drops_it(relay):
    relay, peer = relay
    reader = threading.Thread(target=relay._read_frames, daemon=True)
    reader.start()
    peer.sendall(encode(Request(5, INPUT)) + encode(Request(6, INPUT)) + encode(Cancel(5)))
    deadline = time.monotonic() + 5
    while list(relay.pending) != [6] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(relay.pending) == [6]
    assert not relay.cancelled
