"""Real CPU ranks for unit tests of tensor-parallel pieces: `run(body, ranks)` spawns `ranks` processes, each with
DeepSpeed's communication over gloo set up as serving/rank sets it up, calls `body(rank)` in each (a module-level
function, since the processes are spawned), and fails the test if any rank fails or all have not finished in time.
"""
import os
import socket
import time

import torch
import torch.multiprocessing as mp


def run(body, ranks: int, timeout: float) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.start_processes(_rank, args=(body, ranks, port), nprocs=ranks, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"the {ranks} ranks did not finish in {timeout:.0f} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def _rank(rank: int, body, ranks: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_SIZE=str(ranks),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    try:
        body(rank)
    finally:
        dist.destroy_process_group()
