"""The front end's side of one model's ranks: launch `mpirun -np TP`, connect to rank 0, relay frames,
watch the group's health, and tear it all down.

A group is one failure domain. If mpirun exits, rank 0 stops answering heartbeats, or a unit of work runs
far past predict_timeout (a diverged rank waits in a collective forever), the whole process tree is killed,
DeepSpeed's shared-memory files are removed, every request in flight gets an error, and `run()` starts a
fresh group after a backoff.
"""
import asyncio
import collections
import enum
import glob
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil

from serving.config import ModelConfig
from serving.protocol import ProtocolError, encode, read_frame

log = logging.getLogger("tpserve.worker_group")

HEARTBEAT_INTERVAL = 2.0
HEARTBEAT_TIMEOUT = 30.0  # rank 0's reader thread answers even mid-forward-pass; silence this long is a hang
HUNG_GRACE = 30.0  # seconds past predict_timeout before a busy group counts as hung
RESTART_BACKOFF = (1, 2, 4, 8, 16, 30)


class State(str, enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


class GroupUnavailable(Exception):
    """The group cannot take a request now (loading, failed, restarting); maps to 503."""


class QueueFull(GroupUnavailable):
    pass


@dataclass
class Pending:
    """One request in flight: rank 0's frames for it (chunk..., then response or error) arrive on `frames`."""

    id: int
    frames: asyncio.Queue = field(default_factory=asyncio.Queue)


class WorkerGroup:
    def __init__(self, config: ModelConfig, devices: list[str] | None = None):
        self.config = config
        self.devices = devices  # GPU ids for CUDA_VISIBLE_DEVICES when groups get their own GPUs; None: all
        self.progress: dict[str, float] = {}  # load stage -> seconds since launch (launched, ranks_up, ...)
        self.engine_stats: dict | None = None  # rank 0's heartbeat `engine` report, when its engine sends one
        self.rank_queued = 0  # requests waiting on rank 0, from its heartbeat
        self.state = State.LOADING
        self.error: str | None = None
        self.loaded_in: float | None = None
        self.restarts = 0
        self.requests: dict[int, Pending] = {}
        self._ids = itertools.count(1)
        self._process: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task] = []  # the frame reader and the watchdog of the current group
        self._log_task: asyncio.Task | None = None
        self._failed = asyncio.Event()
        self._stopping = False
        self._tmpdir: str | None = None
        self._master_port: int | None = None
        self._last_heartbeat = 0.0
        self._busy_for = 0.0
        self.recent_log: collections.deque[str] = collections.deque(maxlen=40)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pid(self) -> int | None:
        """mpirun's (or the single rank's) process id while the group runs."""
        return self._process.pid if self._process is not None and self._process.returncode is None else None

    # --- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        """Start the group and keep it running: restart after a failure, with backoff. A group that never
        became ready stays FAILED (its handler or config is broken; restarting would fail the same way)."""
        attempt = 0
        ever_ready = False
        while not self._stopping:
            try:
                await self.start()
                ever_ready = True
                attempt = 0
                await self._failed.wait()
            except GroupUnavailable as exc:
                self._mark_failed(str(exc))
                if not ever_ready:
                    log.error("model %s failed to load: %s", self.name, exc)
                    return
            if self._stopping:
                return
            delay = RESTART_BACKOFF[min(attempt, len(RESTART_BACKOFF) - 1)]
            attempt += 1
            self.restarts += 1
            log.warning("model %s: restarting its worker group in %d s (%s)", self.name, delay, self.error)
            await asyncio.sleep(delay)

    async def start(self) -> None:
        """Launch the ranks and load the model on all of them; returns once the group is READY."""
        self.state, self.error, self._failed = State.LOADING, None, asyncio.Event()
        started = time.monotonic()
        self.progress = {"launched": 0.0}
        self._tmpdir = tempfile.mkdtemp(prefix=f"tpserve-{self.name}-")
        socket_path = os.path.join(self._tmpdir, "rank0.sock")
        self._master_port = free_port()
        mode = f"MPI mode with TP: {self.config.world_size}" if self.config.uses_mpi else "Python mode"
        log.info("Loading model %s in %s.", self.name, mode)
        self._process = await asyncio.create_subprocess_exec(
            *launch_command(self.config, socket_path), env=rank_environment(self._master_port, self.devices),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)  # its own process group, so the whole tree can be signalled
        self._log_task = asyncio.create_task(self._pump_log())  # ends by itself when the ranks' output closes
        self._tasks = []
        try:
            async with asyncio.timeout(self.config.model_loading_timeout):
                reader = await self._connect(socket_path)
                self.progress["ranks_up"] = time.monotonic() - started  # rank 0 listens once all ranks joined
                self._send({"kind": "init", "properties": self.config.handler_properties(),
                            "entry_point": self.config.entry_point_module()})
                frame = await read_frame(reader)
                while frame["kind"] == "progress":  # optional load stages from rank 0 (weights_loaded, ...)
                    self.progress[str(frame.get("stage"))] = time.monotonic() - started
                    frame = await read_frame(reader)
        except TimeoutError:
            await self._kill()
            raise GroupUnavailable(f"model {self.name} did not load within option.model_loading_timeout="
                                   f"{self.config.model_loading_timeout} s") from None
        except (GroupUnavailable, OSError, asyncio.IncompleteReadError) as exc:
            await self._kill()
            raise GroupUnavailable(f"model {self.name}: the ranks exited while loading "
                                   f"({self._exit_status()}): {self._last_lines()}") from exc
        if frame["kind"] != "ready":
            await self._kill()
            raise GroupUnavailable(f"model {self.name} failed to load: {frame.get('message')}")
        self.loaded_in = time.monotonic() - started
        self.progress["ready"] = self.loaded_in
        self._last_heartbeat = time.monotonic()
        self.state = State.READY
        self._tasks += [asyncio.create_task(self._read_frames(reader)), asyncio.create_task(self._watch())]
        log.info("Model [%s] initialized: loaded on %d rank(s) in %d ms.", self.name, self.config.world_size,
                 self.loaded_in * 1000)

    async def stop(self) -> None:
        """Ask the ranks to shut down, then make sure the whole tree is gone."""
        self._stopping = True
        self.state = State.STOPPED
        if self._writer is not None and self._process is not None and self._process.returncode is None:
            self._send({"kind": "shutdown"})
            try:
                await asyncio.wait_for(self._process.wait(), 5)
            except TimeoutError:
                log.warning("model %s: ranks did not exit within 5 s of shutdown; killing them", self.name)
        await self._kill()
        self._fail_requests(503, f"model {self.name} is shutting down")
        self._failed.set()

    # --- requests ------------------------------------------------------------------------------
    def submit(self, request_input: dict) -> Pending:
        """Queue one request for rank 0; its frames arrive on the returned Pending's queue."""
        if self.state != State.READY:
            raise GroupUnavailable(f"model {self.name} is {self.state.value.lower()}"
                                   + (f": {self.error}" if self.error else ""))
        if len(self.requests) >= self.config.job_queue_size:
            raise QueueFull(f"model {self.name} has {len(self.requests)} requests queued "
                            f"(job_queue_size={self.config.job_queue_size})")
        pending = Pending(next(self._ids))
        self.requests[pending.id] = pending
        self._send({"kind": "request", "id": pending.id, "input": request_input})
        return pending

    def cancel(self, pending: Pending) -> None:
        """The client is gone: drop the request if queued, stop its generation if running."""
        if self.requests.pop(pending.id, None) is not None and self.state == State.READY:
            self._send({"kind": "cancel", "id": pending.id})

    # --- inside the group ----------------------------------------------------------------------
    async def _connect(self, socket_path: str) -> asyncio.StreamReader:
        while True:
            if self._process.returncode is not None:
                raise GroupUnavailable("exited")
            try:
                reader, self._writer = await asyncio.open_unix_connection(socket_path, limit=2**20)
                return reader
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.05)

    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await read_frame(reader)
                kind = frame["kind"]
                if kind == "heartbeat":
                    self._last_heartbeat, self._busy_for = time.monotonic(), frame.get("busy_for", 0.0)
                    self.rank_queued, self.engine_stats = frame.get("queued", 0), frame.get("engine")
                elif kind == "started":  # rank 0 began a unit of these requests: the front end times queue wait
                    for rid in frame.get("ids", ()):
                        if rid in self.requests:
                            self.requests[rid].frames.put_nowait(frame)
                elif "id" in frame:
                    pending = self.requests.get(frame["id"])
                    if pending is None:
                        continue  # its client left and the request was cancelled
                    if kind != "chunk":
                        del self.requests[frame["id"]]
                    pending.frames.put_nowait(frame)
                else:
                    await self._group_failed(f"rank 0 reported: {frame.get('message')}")
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as exc:
            await self._group_failed(f"connection to rank 0 lost ({type(exc).__name__}: {exc}; {self._exit_status()})")

    async def _watch(self) -> None:
        """Heartbeats out; a dead, silent or hung group is failed."""
        seq = 0
        while self.state == State.READY:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            if self._process.returncode is not None:
                return await self._group_failed(f"ranks exited ({self._exit_status()}): {self._last_lines()}")
            if time.monotonic() - self._last_heartbeat > HEARTBEAT_TIMEOUT:
                return await self._group_failed(f"rank 0 has not answered heartbeats for {HEARTBEAT_TIMEOUT:.0f} s")
            if self._busy_for > self.config.predict_timeout + HUNG_GRACE:
                return await self._group_failed(
                    f"one unit of work has run {self._busy_for:.0f} s, past option.predict_timeout="
                    f"{self.config.predict_timeout} s: a rank is hung")
            seq += 1
            self._send({"kind": "heartbeat", "seq": seq})

    async def _group_failed(self, reason: str) -> None:
        if self.state != State.READY:
            return
        log.error("model %s: worker group failed: %s", self.name, reason)
        self._mark_failed(reason)
        await self._kill()
        self._fail_requests(503, f"model {self.name}'s worker group failed and is restarting: {reason}")
        self._failed.set()

    def _mark_failed(self, reason: str) -> None:
        self.state, self.error = State.FAILED, reason

    def _fail_requests(self, code: int, message: str) -> None:
        for pending in self.requests.values():
            pending.frames.put_nowait({"kind": "error", "id": pending.id, "code": code, "message": message})
        self.requests.clear()

    def _send(self, frame: dict) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(frame))

    async def _pump_log(self) -> None:
        """Forward the ranks' output (mpirun tags each line with [job,rank]) into our log."""
        rank_log = logging.getLogger(f"tpserve.model.{self.name}")
        async for line in self._process.stdout:
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.recent_log.append(text)
                rank_log.info("%s", text)

    async def _kill(self) -> None:
        """Kill mpirun and every process under it, then remove what the ranks leave behind."""
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._process is not None:
            await asyncio.to_thread(kill_tree, self._process.pid)
            await self._process.wait()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        if self._master_port:
            remove_shared_memory(self._master_port)

    def _exit_status(self) -> str:
        code = self._process.returncode if self._process else None
        return "still running" if code is None else f"exit code {code}"

    def _last_lines(self, count: int = 8) -> str:
        return " | ".join(list(self.recent_log)[-count:])


def launch_command(config: ModelConfig, socket_path: str) -> list[str]:
    rank = [sys.executable, "-m", "serving.rank", "--socket", socket_path, "--engine", config.engine]
    if not config.uses_mpi:
        return rank
    size = config.world_size
    # By name, not by absolute path: mpirun puts its own bin folder first on the ranks' PATH.
    command = ["mpirun", "-np", str(size), "--bind-to", "none", "--tag-output"]
    if size > (os.cpu_count() or 1):
        command.append("--oversubscribe")
    return command + rank


def rank_environment(master_port: int, devices: list[str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    bin_dir = os.path.dirname(sys.executable)
    env.update(
        PATH=bin_dir + os.pathsep + env.get("PATH", ""),  # the venv's mpirun, when Open MPI came from PyPI
        PYTHONUNBUFFERED="1",
        MASTER_ADDR="127.0.0.1",  # DeepSpeed's discovery would pick a non-loopback address
        MASTER_PORT=str(master_port),
        OMPI_ALLOW_RUN_AS_ROOT="1",  # containers run as root
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    )
    project_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [project_root, env.get("PYTHONPATH")]))
    return env


def kill_tree(pid: int, grace: float = 3.0) -> None:
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    try:
        os.killpg(pid, signal.SIGKILL)  # anything that escaped the tree but kept the process group
    except (ProcessLookupError, PermissionError):
        pass


def remove_shared_memory(master_port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_<n>_<addr>_<port>_<rank>."""
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{master_port}_*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
