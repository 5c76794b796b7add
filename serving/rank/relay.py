"""Rank 0's side of the group: frames from the front end in, units to all ranks out, results back.

Three threads. The reader thread only reads frames (all that arrived together in one read): it queues requests,
drops queued requests whose client left, marks running ones cancelled, and answers heartbeats at once, even
while the main thread is deep in a forward pass. The main thread takes the next units (a control frame, or
handle() calls of up to batch_size requests, the first gathered within max_batch_delay, then every further full
one already queued), broadcasts them together, runs them one after another like every other rank, and queues
rank 0's results; frames queued close together leave in one write, from the queueing thread or from the writer
thread (`_send_bytes`). The other ranks run `follow()`: receive units, run them, repeat.

When the handler offers a rolling-batch engine (the built-in one does, option.rolling_batch=auto), rank 0's main
thread runs the engine's loop instead of units (serving/engine/loop.py): requests join and leave a running batch
at every step, and each step's plan is the unit the other ranks receive.
"""
import collections
import logging
import os
import random
import socket
import threading
import time

from serving.engine.plan import StepPlan
from serving.frames import (TO_RANK, Batch, Cancel, Chunk, Error, Frame, FrameBuffer, Heartbeat, HeartbeatReply, Init,
                            Progress, Ready, Request, Response, Shutdown, Started, Step, encode, encode_all)
from serving.logs import REQUEST_ID
from serving.protocol import ProtocolError
from serving.rank.worker import HandlerError, Worker, encode_chunk

log = logging.getLogger("tpserve.relay")
READ_SIZE = 1 << 18  # bytes one read from the front end may take: every frame that arrived together
MAX_UNITS = 64  # handle() calls one broadcast may carry
FLUSH_AFTER = 0.0002  # seconds a frame may wait for others to share its write (see Relay._send_bytes)
WRITER_PERIOD = 0.002  # seconds between the writer thread's looks at frames a blocked thread left queued
WRITER_IDLE_AFTER = 0.05  # seconds without frames before the writer sleeps until notified


class Relay:
    def __init__(self, comm, worker: Worker, socket_path: str):
        self.comm = comm
        self.worker = worker
        self.socket_path = socket_path
        self.cond = threading.Condition()
        self.control: collections.deque[Frame] = collections.deque()  # Init, Shutdown
        self.pending: collections.OrderedDict[int, Request] = collections.OrderedDict()
        self.cancelled: set[int] = set()
        self.working = False  # a unit or an engine step is under way (heartbeats report has_work)
        self.engine_stats = None  # the engine's occupancy for heartbeats: a callable returning a dict
        self.progress = 0  # steps, chunks and units done; the front end's watchdog wants it to move
        self.batch_size = 1
        self.max_batch_delay = 0.0
        self.conn: socket.socket | None = None
        self._outbox: list[bytes] = []  # encoded frames for the front end, not sent yet
        self._outbox_ready = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()  # one sender at a time: frames leave in the order queued
        self._flushed_at = 0.0
        self._queued_at = 0.0
        self._writer: threading.Thread | None = None
        self._writer_waiting = False

    # --- main thread ---------------------------------------------------------------------------
    def serve(self) -> None:
        remove_stale_socket(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(1)
        log.info("rank 0 listening on %s", self.socket_path)
        self.conn, _ = listener.accept()
        listener.close()
        threading.Thread(target=self._read_frames, name="frame-reader", daemon=True).start()
        while True:
            units = self._next_units()
            self.comm.broadcast(*units)
            first = units[0]
            if isinstance(first, Shutdown):
                log.info("rank 0 shutting down the group")
                self.flush()
                return
            if isinstance(first, Init):
                self._load(first)
                if self.worker.engine is not None:
                    from serving.engine.loop import EngineLoop  # torch and transformers: only for the engine
                    EngineLoop(self.worker.engine, self).run()  # returns when a control frame waits
            else:
                for unit in units:
                    self._run(unit)
                self.flush()  # the last answers now, not after a hand-over to the writer thread
            with self.cond:
                self.working = False
                self.cancelled.clear()
            self.note_progress()
            REQUEST_ID.set(None)  # lines after the unit belong to no request

    def _load(self, unit: Init) -> None:
        props = unit.properties
        self.batch_size = int(props.get("batch_size", 1))
        self.max_batch_delay = int(props.get("max_batch_delay", 0)) / 1000
        # rank 0's load stages go to the front end as they end (/health/ready shows them with their times)
        errors = self.comm.gather(self.worker.load(unit, lambda stage: self._send(Progress(stage))))
        failed = [f"rank {rank}: {error}" for rank, error in enumerate(errors) if error]
        if failed:
            self._send(Error(500, "; ".join(failed)))
        else:
            self._send(Ready(self.worker.facts))

    def _run(self, unit: Batch) -> None:
        ids = [item.id for item in unit.items]
        self._send(Started(ids))  # the front end measures queue wait and batch occupancy from it
        try:
            output, stream = self.worker.run(unit, self._is_cancelled, self._send_chunk)
            for index, chunk in enumerate(stream or ()):
                self._send_chunk(ids[0], chunk, output.properties if index == 0 else None)
        except HandlerError as exc:
            self.send_frames([Error(424, str(exc), rid) for rid in ids])
            return
        except Exception as exc:  # a streaming handler's generator raised after the first chunk
            log.exception("rank 0: streaming handler failed")
            self.send_frames([Error(424, f"{type(exc).__name__}: {exc}", rid) for rid in ids])
            return
        self.send_frames([Response(rid, output.for_item(index, len(ids))) for index, rid in enumerate(ids)])

    def _next_units(self) -> list[Frame]:
        """A control frame alone, or handle() calls of up to batch_size requests each: the first gathered within
        max_batch_delay, then as many more full ones as are already queued, to be broadcast together."""
        with self.cond:
            while True:
                while not self.control and not self.pending:
                    self.cond.wait()
                if self.control:
                    unit = self.control.popleft()
                    self.working = True
                    return [unit]
                if self.batch_size > 1:
                    deadline = time.monotonic() + self.max_batch_delay
                    while len(self.pending) < self.batch_size and not self.control:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or not self.cond.wait(remaining):
                            break
                if self.pending:
                    break  # else every queued request's client left while the batch filled: wait again
            units = []
            while self.pending and len(units) < MAX_UNITS and (not units or len(self.pending) >= self.batch_size):
                count = min(self.batch_size, len(self.pending))
                items = [self.pending.popitem(last=False)[1] for _ in range(count)]
                # rank 0 picks the seed so that every rank samples the same tokens
                units.append(Batch(random.getrandbits(63), items))
            self.working = True
            return units

    def send_frames(self, frames: list[Frame]) -> None:
        """Several frames at once: a rolling-batch step answers many requests."""
        if frames:
            self._send_bytes(encode_all(frames))

    @staticmethod
    def chunk_frame(rid: int, value) -> Chunk:
        return Chunk(rid, encode_chunk(value))

    def note_progress(self) -> None:
        """Something moved (a decode step, a chunk, a finished unit). The front end's watchdog only asks whether
        the counter moved, so a plain += is enough, even from two threads."""
        self.progress += 1

    def _send_chunk(self, rid: int, data: bytes, properties: dict | None = None) -> None:
        self.note_progress()
        # the front end takes the response headers from a request's first chunk
        self._send(Chunk(rid, data, properties or None))

    def _is_cancelled(self, rid: int) -> bool:
        with self.cond:
            return rid in self.cancelled

    # --- reader thread -------------------------------------------------------------------------
    def _read_frames(self) -> None:
        """Every frame that arrived together is taken in one read; heartbeats are answered at once, the rest
        queued under one lock."""
        buffer = FrameBuffer(TO_RANK)
        while True:
            try:
                data = self.conn.recv(READ_SIZE)
                frames = buffer.feed(data) if data else None
            except OSError:
                frames = None
            except ProtocolError as exc:
                log.error("rank 0: the front end sent something that is not a frame (%s); stopping the group", exc)
                frames = None
            if frames is None:
                log.warning("rank 0: the front end closed the connection; stopping the group")
                frames = [Shutdown()]
            queued = [frame for frame in frames if not isinstance(frame, Heartbeat)]
            for frame in frames:
                if isinstance(frame, Heartbeat):
                    self._answer_heartbeat(frame)
            if not queued:
                continue
            with self.cond:
                for frame in queued:
                    if isinstance(frame, Request):
                        self.pending[frame.id] = frame
                    elif isinstance(frame, Cancel):
                        if self.pending.pop(frame.id, None) is None:
                            self.cancelled.add(frame.id)
                        else:
                            log.info("rank 0: request %d dropped from the queue, its client left", frame.id)
                    else:  # Init, Shutdown
                        self.control.append(frame)
                self.cond.notify_all()  # the main loop, and the engine's intake thread, may be waiting
            if any(isinstance(frame, Shutdown) for frame in queued):
                return

    def _answer_heartbeat(self, frame: Heartbeat) -> None:
        with self.cond:
            has_work = bool(self.working or self.pending or self.control)
        engine = self.engine_stats() if self.engine_stats is not None else None
        self._send(HeartbeatReply(frame.seq, self.progress, has_work, len(self.pending), engine))

    def _send(self, frame: Frame) -> None:
        self._send_bytes(encode(frame))

    # --- sending -------------------------------------------------------------------------------
    def _send_bytes(self, data: bytes) -> None:
        """Queue encoded frames. The first frame after a quiet spell (FLUSH_AFTER since the last write) goes out at
        once, from the calling thread; frames that follow closely wait, so the answers of fast units, started
        frames and the chunks of a fast stream share one write (one system call, one wake-up of the front end)
        every FLUSH_AFTER; rank 0's main thread also writes at the end of every broadcast. What a thread left
        queued when it blocked (a slow handler after its started frame) is sent by the writer thread within
        WRITER_PERIOD. While frames keep coming the writer wakes on its own period, not once per frame: a wake-up
        costs a context switch and a GIL hand-over."""
        with self._outbox_ready:
            self._outbox.append(data)
            self._queued_at = now = time.monotonic()
            due = now - self._flushed_at >= FLUSH_AFTER
            if not due and self._writer_waiting:
                self._outbox_ready.notify_all()
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_frames, name="frame-writer", daemon=True)
                self._writer.start()
        if due:
            self.flush()

    def flush(self) -> None:
        """Send everything queued, from the calling thread; the send lock keeps writes in the order queued."""
        with self._send_lock:
            with self._outbox_ready:
                data = b"".join(self._outbox)
                self._outbox.clear()
                self._flushed_at = time.monotonic()
            if data:
                try:
                    self.conn.sendall(data)
                except OSError:
                    log.warning("rank 0: could not send %d bytes of frames; the front end is gone", len(data))

    def _write_frames(self) -> None:
        while True:
            with self._outbox_ready:
                # asleep only once nothing was queued for a while; notified by the next frame that is not due
                while not self._outbox and time.monotonic() - self._queued_at > WRITER_IDLE_AFTER:
                    self._writer_waiting = True
                    self._outbox_ready.wait()
                self._writer_waiting = False
            time.sleep(WRITER_PERIOD)
            self.flush()


def follow(comm, worker: Worker) -> None:
    """Ranks > 0: run whatever rank 0 broadcasts until it says shutdown."""
    while True:
        for unit in comm.receive():
            if isinstance(unit, Shutdown):
                return
            if isinstance(unit, Init):
                comm.gather(worker.load(unit))
                continue
            if isinstance(unit, Step):
                worker.engine.step(StepPlan.unpack(unit.plan))  # a failure here diverges the ranks: let it end the rank
                continue
            try:
                _, stream = worker.run(unit, lambda rid: False)
                for _ in stream or ():
                    pass
            except Exception:  # rank 0 reports the failure; a diverged rank is caught by the front end's watchdog
                log.exception("rank %d: unit failed", comm.rank)
            REQUEST_ID.set(None)


def remove_stale_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
