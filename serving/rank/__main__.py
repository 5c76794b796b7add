"""Entry point of one rank: `python -m serving.rank --socket PATH --engine DeepSpeed` (under mpirun).

Maps Open MPI's environment to the names torch.distributed and DeepSpeed read, joins the process group
(NCCL with one GPU per local rank, gloo on CPUs), then rank 0 serves the front end's socket and every other
rank follows rank 0's broadcasts. After a shutdown every rank leaves with os._exit (see `leave`).
"""
import argparse
import atexit
import contextlib
import ctypes
import os
import sys
from typing import NoReturn

from serving.rank import beat


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m serving.rank")
    parser.add_argument("--socket", required=True, help="Unix socket rank 0 listens on")
    parser.add_argument("--engine", default="DeepSpeed", choices=["Python", "DeepSpeed", "MPI"])
    args = parser.parse_args(argv)

    map_mpi_environment()
    rank = int(os.environ.get("RANK", 0))
    beat.start(rank)  # from the first moment, so a rank that stalls even while loading is seen
    from serving.logs import configure  # every line a request causes carries its X-Request-Id
    configure("text", f"%(asctime)s %(levelname)s rank{rank} %(name)s%(request_tag)s: %(message)s")

    from serving.rank.comm import MpiComm, SoloComm
    from serving.rank.relay import Relay, follow
    from serving.rank.worker import Worker

    comm = MpiComm() if args.engine != "Python" else SoloComm()
    if args.engine != "Python":
        join_process_group(args.engine)
    worker = Worker(comm.rank)
    if comm.rank == 0:
        Relay(comm, worker, args.socket).serve()  # returns after a shutdown, its last frames sent
    else:
        follow(comm, worker)  # returns after a shutdown
    leave(comm)


def leave(comm) -> NoReturn:
    """End the rank now that its work is done. An ordinary exit first tears down every module and object (torch,
    DeepSpeed, gloo): about 1 s of CPU per rank, so on 2 cores an 18-rank server's groups outlived WorkerGroup.stop's
    5 s and were killed. Only what matters of that exit runs here: the atexit handlers (logging's flush, torch's
    compile workers, whatever a model.py registered), MPI_Finalize (without it mpirun reports the rank as failed),
    and output still buffered, C libraries' printf included. The kernel frees the memory; the front end removes
    the group's files (the socket, DeepSpeed's /dev/shm buffers, which DeepSpeed never removes itself)."""
    atexit._run_exitfuncs()  # not public, but the very call CPython's own exit makes
    comm.finalize()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # mpirun's pipe may be gone with the front end
            stream.flush()
    ctypes.CDLL(None).fflush(None)  # a pipe makes C's stdout block-buffered
    os._exit(0)


def map_mpi_environment() -> None:
    """torch.distributed and DeepSpeed read RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_SIZE; Open MPI sets OMPI_*.
    Without LOCAL_SIZE, DeepSpeed's CPU shared-memory all-reduce crashes."""
    names = {"RANK": "OMPI_COMM_WORLD_RANK", "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE",
             "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK", "LOCAL_SIZE": "OMPI_COMM_WORLD_LOCAL_SIZE"}
    for name, ompi in names.items():
        os.environ.setdefault(name, os.environ.get(ompi, "0" if "RANK" in name else "1"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def join_process_group(engine: str) -> None:
    import torch

    local_rank, local_size = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        # Ranks share the cores: without this each rank starts one thread per core and they fight.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
        backend = "gloo"
    if engine == "DeepSpeed":
        import deepspeed
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    else:
        torch.distributed.init_process_group(backend=backend)


if __name__ == "__main__":
    main()
