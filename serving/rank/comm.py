"""How rank 0 hands each unit of work to the other ranks.

A blocking mpi4py broadcast busy-polls: a waiting rank burns a whole core (measured: 6 s of CPU in 6 s of
waiting, with or without mpi_yield_when_idle). So the other ranks sleep in select() on a loopback UDP socket.
Rank 0 posts a non-blocking broadcast of the payload's length, then sends each rank a one-byte wake-up; a
woken rank polls its posted broadcast (it completes within microseconds, rank 0 is already in it) and then
takes the payload in a plain broadcast. Idle ranks wake twice a second to test the broadcast anyway, so even a
lost datagram costs at most half a second, never a hang. All ranks of a group run on one host (one mpirun
on localhost), which is what makes a loopback wake-up enough.

While units keep coming (the engine's steps, every few milliseconds), a woken rank would pay the wake-up's
latency on every step, and every rank's step waits for the slowest at its first all-reduce. So for HOT seconds
after each unit a rank spins on the posted broadcast instead of sleeping: a core per rank while the group
generates, none when it is idle. Only with GPUs: on a CPU the ranks' cores compute the forward themselves.
"""
import select
import socket
import struct
import time
from typing import Any

from serving.protocol import pack, unpack

LENGTH = struct.Struct(">q")
IDLE_CHECK = 0.5  # seconds a sleeping rank waits between checks of its posted broadcast
WOKEN_POLL_LIMIT = 1.0  # seconds a woken rank polls before going back to sleep
HOT = 0.05  # seconds after a unit during which a rank spins for the next one


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
        self.wake = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.wake.bind(("127.0.0.1", 0))
        self.wake.setblocking(False)
        self.peers = self.comm.allgather(self.wake.getsockname()[1])[1:]
        self.hot_until = 0.0
        import torch  # the ranks have it loaded already
        self.hot = HOT if torch.cuda.is_available() else 0.0

    def broadcast(self, unit: dict) -> None:
        """Rank 0: send `unit` to every other rank."""
        payload = bytearray(pack(unit))
        request = self.comm.Ibcast(bytearray(LENGTH.pack(len(payload))), root=0)
        for port in self.peers:
            self.wake.sendto(b"w", ("127.0.0.1", port))
        request.Wait()
        self.comm.Bcast(payload, root=0)

    def receive(self) -> dict:
        """Ranks > 0: sleep until rank 0 broadcasts, then return the unit."""
        header = bytearray(LENGTH.size)
        request = self.comm.Ibcast(header, root=0)
        done = request.Test()
        while not done and time.monotonic() < self.hot_until:
            done = request.Test()
        while not done and not request.Test():
            if select.select([self.wake], [], [], IDLE_CHECK)[0]:
                self._drain_wakeups()
                _poll(request, WOKEN_POLL_LIMIT)
        (length,) = LENGTH.unpack(header)
        payload = bytearray(length)
        self.comm.Bcast(payload, root=0)
        self.hot_until = time.monotonic() + self.hot
        return unpack(bytes(payload))

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` at rank 0 (None elsewhere); used once per model load, so blocking is fine."""
        return self.comm.gather(value, root=0)

    def _drain_wakeups(self) -> None:
        try:
            while True:
                self.wake.recv(64)
        except BlockingIOError:
            pass


def _poll(request, limit: float) -> None:
    """Test a posted request with short sleeps (10 us growing to 1 ms) for at most `limit` seconds."""
    deadline = time.monotonic() + limit
    pause = 1e-5
    while not request.Test() and time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)
