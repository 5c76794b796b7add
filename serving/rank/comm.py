"""How rank 0 hands each unit of work to the other ranks.

Over one local stream socket per rank, not an MPI broadcast. A blocking mpi4py broadcast busy-polls: a waiting rank
burns a whole core (measured: 6 s of CPU in 6 s of waiting, with or without mpi_yield_when_idle), and so does the
root, until every rank has joined (measured with Open MPI 5: a 512-byte Bcast held the root 20 ms at full CPU
while the other rank slept 20 ms). A rank waiting in recv() sleeps in the kernel and wakes when data comes; rank 0's
write returns as soon as the kernel has the bytes, so it never waits for a rank to wake (only for a rank that has
fallen a socket buffer behind). All ranks of a group run on one host (one mpirun on localhost), so rank 0 listens
on an abstract Unix socket whose name the ranks learn from MPI once, at start; MPI stays for that and for `gather`.

Each broadcast is an 8-byte length and a msgpack array of units (serving/frames.py: pack_units).
"""
import os
import socket
import struct
from typing import Any

from serving.frames import Frame, pack_units, unpack_units

LENGTH = struct.Struct(">q")
READ_SIZE = 1 << 18  # bytes a rank reads at once: every broadcast that is already waiting


class SoloComm:
    """engine=Python: one process, nothing to broadcast."""

    rank, size = 0, 1

    def broadcast(self, *units: Frame) -> None:
        pass

    def receive(self) -> list[Frame]:
        raise RuntimeError("a single process never receives units")

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def finalize(self) -> None:
        pass


class MpiComm:
    def __init__(self):
        from mpi4py import MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.peers: list[socket.socket] = []  # rank 0: one socket per other rank, in rank order
        self.source: socket.socket | None = None  # other ranks: the socket from rank 0
        self._pending = bytearray()  # other ranks: bytes read past the last whole broadcast
        name = None
        if self.rank == 0:
            name = f"\0tpserve-units-{os.getpid()}-{os.urandom(6).hex()}"  # abstract: no file to clean up
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(name)
            listener.listen(self.size)
        name = self.comm.bcast(name, root=0)
        if self.rank == 0:
            joined = {}
            for _ in range(self.size - 1):
                conn, _ = listener.accept()
                joined[LENGTH.unpack(_recv_exactly(conn, LENGTH.size))[0]] = conn
            listener.close()
            self.peers = [joined[rank] for rank in range(1, self.size)]
        else:
            self.source = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.source.connect(name)
            self.source.sendall(LENGTH.pack(self.rank))
        self.comm.Barrier()  # every rank connected before anyone broadcasts

    def broadcast(self, *units: Frame) -> None:
        """Rank 0: send `units` to every other rank, in one message (requests that arrived together travel
        together: one system call per rank for all of them)."""
        payload = pack_units(list(units))
        message = LENGTH.pack(len(payload)) + payload
        for peer in self.peers:
            peer.sendall(message)

    def receive(self) -> list[Frame]:
        """Ranks > 0: sleep until rank 0 broadcasts, then return its units. Rank 0 gone: the rank exits."""
        while True:
            if len(self._pending) >= LENGTH.size:
                (length,) = LENGTH.unpack_from(self._pending)
                end = LENGTH.size + length
                if len(self._pending) >= end:
                    with memoryview(self._pending) as view:
                        units = unpack_units(view[LENGTH.size:end])
                    del self._pending[:end]
                    return units
            data = self.source.recv(READ_SIZE)
            if not data:
                raise SystemExit(f"rank {self.rank}: rank 0 closed the unit socket; exiting")
            self._pending += data

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's `value` at rank 0 (None elsewhere); used once per model load, so blocking is fine."""
        return self.comm.gather(value, root=0)

    def finalize(self) -> None:
        """MPI_Finalize, which mpi4py leaves to the interpreter's exit: a rank that leaves with os._exit calls it
        here (it waits for every rank of the group to call it too)."""
        from mpi4py import MPI
        MPI.Finalize()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        part = sock.recv(size - len(buf))
        if not part:
            raise ConnectionError("peer closed the socket while joining")
        buf += part
    return bytes(buf)
