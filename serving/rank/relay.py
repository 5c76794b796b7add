"""Rank 0's side of the group: frames from the front end in, units to all ranks out, results back.

Two threads. The reader thread only reads frames: it queues requests, drops queued requests whose client
left, marks running ones cancelled, and answers heartbeats at once, even while the main thread is deep in
a forward pass. The main thread takes the next unit (a control frame, or a batch of up to batch_size
requests gathered within max_batch_delay), broadcasts it, runs it like every other rank, and sends rank 0's
results back. The other ranks run `follow()`: receive a unit, run it, repeat.

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
from serving.logs import REQUEST_ID
from serving.protocol import encode, recv_frame
from serving.rank.worker import HandlerError, Worker, encode_chunk

log = logging.getLogger("tpserve.relay")


class Relay:
    def __init__(self, comm, worker: Worker, socket_path: str):
        self.comm = comm
        self.worker = worker
        self.socket_path = socket_path
        self.cond = threading.Condition()
        self.control: collections.deque[dict] = collections.deque()
        self.pending: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self.cancelled: set[int] = set()
        self.working = False  # a unit or an engine step is under way (heartbeats report has_work)
        self.engine_stats = None  # the engine's occupancy for heartbeats: a callable returning a dict
        self.progress = 0  # steps, chunks and units done; the front end's watchdog wants it to move
        self.batch_size = 1
        self.max_batch_delay = 0.0
        self.conn: socket.socket | None = None
        self.send_lock = threading.Lock()

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
            unit = self._next_unit()
            self.comm.broadcast(unit)
            if unit["kind"] == "shutdown":
                log.info("rank 0 shutting down the group")
                return
            if unit["kind"] == "init":
                self._load(unit)
                if self.worker.engine is not None:
                    from serving.engine.loop import EngineLoop  # torch and transformers: only for the engine
                    EngineLoop(self.worker.engine, self).run()  # returns when a control frame waits
            else:
                self._run(unit)
            with self.cond:
                self.working = False
                self.cancelled.clear()
            self.note_progress()
            REQUEST_ID.set(None)  # lines after the unit belong to no request

    def _load(self, unit: dict) -> None:
        props = unit["properties"]
        self.batch_size = int(props.get("batch_size", 1))
        self.max_batch_delay = int(props.get("max_batch_delay", 0)) / 1000
        # rank 0's load stages go to the front end as they end (/health/ready shows them with their times)
        errors = self.comm.gather(self.worker.load(unit, lambda stage: self._send({"kind": "progress", "stage": stage})))
        failed = [f"rank {rank}: {error}" for rank, error in enumerate(errors) if error]
        if failed:
            self._send({"kind": "error", "code": 500, "message": "; ".join(failed)})
        else:
            self._send({"kind": "ready", "model": self.worker.facts})

    def _run(self, unit: dict) -> None:
        ids = [item["id"] for item in unit["items"]]
        self._send({"kind": "started", "ids": ids})  # the front end measures queue wait and batch occupancy
        try:
            output, stream = self.worker.run(unit, self._is_cancelled, self._send_chunk)
            for index, chunk in enumerate(stream or ()):
                self._send_chunk(ids[0], chunk, output.properties if index == 0 else None)
        except HandlerError as exc:
            for rid in ids:
                self._send({"kind": "error", "id": rid, "code": 424, "message": str(exc)})
            return
        except Exception as exc:  # a streaming handler's generator raised after the first chunk
            log.exception("rank 0: streaming handler failed")
            for rid in ids:
                self._send({"kind": "error", "id": rid, "code": 424, "message": f"{type(exc).__name__}: {exc}"})
            return
        for index, rid in enumerate(ids):
            self._send({"kind": "response", "id": rid, "output": output.for_item(index, len(ids))})

    def _next_unit(self) -> dict:
        with self.cond:
            while not self.control and not self.pending:
                self.cond.wait()
            if self.control:
                unit = self.control.popleft()
                self.working = True
                return unit
            if self.batch_size > 1:
                deadline = time.monotonic() + self.max_batch_delay
                while len(self.pending) < self.batch_size and not self.control:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self.cond.wait(remaining):
                        break
            count = min(self.batch_size, len(self.pending))
            items = [{"id": rid, "input": frame["input"]}
                     for rid, frame in (self.pending.popitem(last=False) for _ in range(count))]
            self.working = True
            # rank 0 picks the seed so that every rank samples the same tokens
            return {"kind": "batch", "seed": random.getrandbits(63), "items": items}

    def send_frames(self, frames: list[dict]) -> None:
        """Several frames in one write: a rolling-batch step answers many requests at once."""
        if frames:
            self._send_bytes(b"".join(encode(frame) for frame in frames), frames[0]["kind"])

    @staticmethod
    def chunk_frame(rid: int, value) -> dict:
        return {"kind": "chunk", "id": rid, "data": encode_chunk(value)}

    def note_progress(self) -> None:
        """Something moved (a decode step, a chunk, a finished unit). The front end's watchdog only asks whether
        the counter moved, so a plain += is enough, even from two threads."""
        self.progress += 1

    def _send_chunk(self, rid: int, data: bytes, properties: dict | None = None) -> None:
        self.note_progress()
        # the front end takes the response headers from a request's first chunk
        frame = {"kind": "chunk", "id": rid, "data": data}
        if properties:
            frame["properties"] = properties
        self._send(frame)

    def _is_cancelled(self, rid: int) -> bool:
        with self.cond:
            return rid in self.cancelled

    # --- reader thread -------------------------------------------------------------------------
    def _read_frames(self) -> None:
        while True:
            try:
                frame = recv_frame(self.conn)
            except OSError:
                frame = None
            if frame is None:
                log.warning("rank 0: the front end closed the connection; stopping the group")
                frame = {"kind": "shutdown"}
            kind = frame["kind"]
            if kind == "heartbeat":
                with self.cond:
                    has_work = bool(self.working or self.pending or self.control)
                beat = {"kind": "heartbeat", "seq": frame.get("seq", 0), "progress": self.progress,
                        "has_work": has_work, "queued": len(self.pending)}
                if self.engine_stats is not None:
                    beat["engine"] = self.engine_stats()
                self._send(beat)
                continue
            with self.cond:
                if kind == "request":
                    self.pending[frame["id"]] = frame
                elif kind == "cancel":
                    if self.pending.pop(frame["id"], None) is None:
                        self.cancelled.add(frame["id"])
                    else:
                        log.info("rank 0: request %d dropped from the queue, its client left", frame["id"])
                elif kind in ("init", "shutdown"):
                    self.control.append(frame)
                else:
                    log.error("rank 0: unknown frame kind %r ignored", kind)
                self.cond.notify_all()  # the main loop, and the engine's intake thread, may be waiting
            if kind == "shutdown":
                return

    def _send(self, frame: dict) -> None:
        self._send_bytes(encode(frame), frame["kind"])

    def _send_bytes(self, data: bytes, kind: str) -> None:
        with self.send_lock:
            try:
                self.conn.sendall(data)
            except OSError:
                log.warning("rank 0: could not send a %s frame; the front end is gone", kind)


def follow(comm, worker: Worker) -> None:
    """Ranks > 0: run whatever rank 0 broadcasts until it says shutdown."""
    while True:
        unit = comm.receive()
        if unit["kind"] == "shutdown":
            return
        if unit["kind"] == "init":
            comm.gather(worker.load(unit))
            continue
        if unit["kind"] == "step":
            worker.engine.step(StepPlan.unpack(unit["plan"]))  # a failure here diverges the ranks: let it end the rank
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
