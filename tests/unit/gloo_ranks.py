"""Real CPU ranks for unit tests of tensor-parallel pieces: `Ranks(size)` spawns `size` processes, each with
DeepSpeed's communication over gloo set up as serving/rank sets it up, and `run(body, timeout)` calls `body(rank)`
in each (a module-level function, since the processes are spawned), failing the test if any rank fails or all
have not finished in time. The processes stay for the next body (tests/unit/conftest.py shares one pair between
the tests of this package), so their start, imports and process group are paid once; a failure or a timeout
ends them, and the next run starts fresh ones. Ending them removes the shared-memory buffers DeepSpeed's CPU
all-reduce made for their group (/dev/shm/deepspeed_allreduce_buffer_*_<port>_<rank>, ~70 MB each), which nothing
else would: these ranks run outside a server's namespace (serving/namespace.py).
"""
import os
import queue
from pathlib import Path
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


class Ranks:
    def __init__(self, size: int):
        self.size = size
        self.processes: list = []
        self.inboxes: list = []
        self.port = None

    def run(self, body, timeout: float) -> None:
        if not self.processes:
            self._start()
        for inbox in self.inboxes:
            inbox.put(body)
        deadline = time.monotonic() + timeout
        errors = {}
        try:
            while len(errors) < self.size:
                assert time.monotonic() < deadline, f"the {self.size} ranks did not finish in {timeout:.0f} s"
                dead = [p.exitcode for p in self.processes if not p.is_alive()]
                assert not dead, f"a rank exited with {dead[0]} before it finished"
                try:
                    rank, error = self.results.get(timeout=1)
                except queue.Empty:
                    continue
                errors[rank] = error
            failed = {rank: error for rank, error in errors.items() if error}
            assert not failed, "\n".join(f"rank {rank} failed:\n{error}" for rank, error in sorted(failed.items()))
        except BaseException:
            self.close()  # a rank may wait in a collective the other never joins: the next body gets fresh ranks
            raise

    def close(self) -> None:
        for process, inbox in zip(self.processes, self.inboxes):
            if process.is_alive():
                inbox.put(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes = []
        if self.port is not None:
            for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{self.port}_*"):
                buffer.unlink(missing_ok=True)

    def _start(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = self.port = sock.getsockname()[1]
        context = mp.get_context("spawn")
        self.inboxes = [context.SimpleQueue() for _ in range(self.size)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, args=(rank, self.size, port, self.inboxes[rank], self.results),
                                          daemon=True) for rank in range(self.size)]
        for process in self.processes:
            process.start()


def _serve(rank: int, size: int, port: int, inbox, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    try:
        while (body := inbox.get()) is not None:
            try:
                body(rank)
                results.put((rank, None))
            except BaseException:  # noqa: BLE001 - every failure goes back to the test, with its traceback
                results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
