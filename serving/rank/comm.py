"""How rank 0 hands each unit of work to the other ranks.

A blocking mpi4py broadcast busy-polls: a waiting rank burns a whole core (measured: 6 s of CPU in 6 s of
waiting, with or without mpi_yield_when_idle). So a waiting rank posts a non-blocking broadcast of an
8-byte length and polls it with a sleep that backs off from 0.2 ms to 10 ms (about 1% of a core when idle;
at most 10 ms added to the first request after a quiet spell). The payload follows as a plain broadcast,
which is quick because every rank is then already waiting for it.
"""
import struct
import time
from typing import Any

from serving.protocol import pack, unpack

LENGTH = struct.Struct(">q")
MIN_SLEEP, MAX_SLEEP = 0.0002, 0.01


class SoloComm:
    """engine=Python: one process, nothing to broadcast."""

    rank, size = 0, 1

    def broadcast(self, unit: dict) -> None:
        pass

    def receive(self) -> dict:
        raise RuntimeError("a single process never receives units")

    def gather(self, value: Any) -> list[Any]:
        return [value]


class MpiComm:
    def __init__(self):
        from mpi4py import MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def broadcast(self, unit: dict) -> None:
        """Rank 0: send `unit` to every other rank."""
        payload = bytearray(pack(unit))
        self.comm.Ibcast(bytearray(LENGTH.pack(len(payload))), root=0).Wait()
        self.comm.Bcast(payload, root=0)

    def receive(self) -> dict:
        """Ranks > 0: sleep until rank 0 broadcasts, then return the unit."""
        header = bytearray(LENGTH.size)
        request = self.comm.Ibcast(header, root=0)
        pause = MIN_SLEEP
        while not request.Test():
            time.sleep(pause)
            pause = min(pause * 2, MAX_SLEEP)
        (length,) = LENGTH.unpack(header)
        payload = bytearray(length)
        self.comm.Bcast(payload, root=0)
        return unpack(bytes(payload))

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` at rank 0 (None elsewhere); used once per model load, so blocking is fine."""
        return self.comm.gather(value, root=0)
