"""Rank 0's step timeline, for benchmarks (issue 8): where a served workload's time goes, step by step.

With TPSERVE_STEP_TIMELINE=FILE in the server's environment, the engine loop records each step: its kind and
size, the host's clock when it began (also as Unix time, to line up with a client's clock), queued its forward,
streamed last step's tokens and queued its sampling, and on CUDA two events around the forward, so the device's
own time and the gaps between steps are known; and the garbage collector's pauses in the loop's process. The
records are appended to FILE as JSON lines each time the loop goes idle (the events are complete by then), so a
benchmark reads them between load levels without stopping the server. bench/metrics.py's timeline_summary() turns
them into the GPU's busy share, the gaps, the time by step kind and the collections.

    Timeline.from_env(device)   a Timeline if TPSERVE_STEP_TIMELINE is set, else None
    begin(kind, tokens, padded) a step starts (host clock; CUDA event)
    queued()                    its forward is queued (CUDA event after it)
    mark(phase)                 the host finished a later phase of the step ("emitted", "sampled")
    flush()                     append every finished step to the file
    close()                     stop hearing of garbage collections
"""
import gc
import json
import logging
import os
import time
from pathlib import Path

import torch

ENV = "TPSERVE_STEP_TIMELINE"
log = logging.getLogger("tpserve.engine.timeline")


class Timeline:
    def __init__(self, path: Path, device: torch.device):
        self.path = path
        self.cuda = device.type == "cuda"
        self.records: list[dict] = []
        self.origin: tuple[float, torch.cuda.Event | None] | None = None  # host clock and event of the first step
        self._collecting: float | None = None
        gc.callbacks.append(self._collection)

    @classmethod
    def from_env(cls, device: torch.device) -> "Timeline | None":
        path = os.environ.get(ENV)
        return cls(Path(path), device) if path else None

    def begin(self, kind: str, tokens: int, padded: int) -> None:
        record = {"kind": kind, "tokens": tokens, "padded": padded, "unix_ms": time.time() * 1000, "host_ms": {}}
        now, event = time.perf_counter(), self._event()
        if self.origin is None:
            self.origin = (now, event)
        record["host_ms"]["begin"] = (now - self.origin[0]) * 1000
        record["_events"] = [event]
        self.records.append(record)

    def queued(self) -> None:
        self.records[-1]["_events"].append(self._event())
        self.mark("queued")

    def mark(self, phase: str) -> None:
        if self.records:
            self.records[-1]["host_ms"][phase] = (time.perf_counter() - self.origin[0]) * 1000

    def flush(self) -> None:
        """Write the recorded steps (waits for their events: call it when the device is idle anyway)."""
        if not self.records:
            return
        origin = self.origin[1]
        lines = []
        for record in self.records:
            events = record.pop("_events")
            if self.cuda and len(events) == 2:
                events[1].synchronize()
                record["gpu_ms"] = [origin.elapsed_time(events[0]), origin.elapsed_time(events[1])]
            record["host_ms"] = {phase: round(ms, 3) for phase, ms in record["host_ms"].items()}
            lines.append(json.dumps(record) + "\n")
        try:
            with self.path.open("a") as file:
                file.write("".join(lines))
        except OSError as error:  # a benchmark's aid never stops the loop
            log.warning("step timeline not written to %s: %s", self.path, error)
        self.records.clear()  # after the write: a reader that sees no records left finds them all in the file

    def close(self) -> None:
        if self._collection in gc.callbacks:
            gc.callbacks.remove(self._collection)

    def _collection(self, phase: str, info: dict) -> None:
        """A garbage collection (any thread of the process): its time goes to the step recorded last."""
        if phase == "start":
            self._collecting = time.perf_counter()
        elif self._collecting is not None and self.records:
            pauses = self.records[-1].setdefault("gc", [])
            pauses.append([info["generation"], round((time.perf_counter() - self._collecting) * 1000, 3)])

    def _event(self) -> "torch.cuda.Event | None":
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
