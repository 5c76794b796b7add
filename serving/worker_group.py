"""The front end's side of one model's ranks: launch `mpirun -np TP`, connect to rank 0, relay frames,
watch the group's health, and tear it all down.

A group is one failure domain. It fails when mpirun exits, when any rank stops beating (its beat file, see
serving/rank/beat.py, ages past option.heartbeat_timeout: a stopped or frozen rank), when rank 0 stops answering
heartbeat frames, or when it has work and its progress counter (steps, chunks, finished units) stands still
for option.hang_timeout (a diverged rank waits in a collective forever). Then mpirun, every recorded rank and
their process groups are killed, their files (/dev/shm included) removed, every request in flight gets an
error, and `run()` starts a fresh group after a backoff, giving up after retry_threshold consecutive failures.
"""
import asyncio
import collections
import enum
import itertools
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from serving import namespace
from serving.config import ModelConfig
from serving.frames import (FROM_RANK, Cancel, Chunk, Error, Frame, FrameBuffer, Heartbeat, HeartbeatReply, Init,
                            Progress, Ready, Request, RequestInput, Response, Shutdown, Started, encode)
from serving.namespace import Namespace
from serving.protocol import ProtocolError
from serving.rank import beat

log = logging.getLogger("tpserve.worker_group")

HEARTBEAT_INTERVAL = 1.0
SUSPECT_AFTER = 3.0  # seconds a beat or an answer may be late before /ping calls the group unhealthy
RESTART_BACKOFF = (1, 2, 4, 8, 16, 30)
STABLE_AFTER = 30.0  # a group that served this long before failing starts the failure count afresh


class State(str, enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    RESTARTING = "RESTARTING"  # the group failed; a fresh one starts after a backoff
    FAILED = "FAILED"  # for good: never loaded, or retry_threshold consecutive failures
    STOPPED = "STOPPED"


class GroupUnavailable(Exception):
    """The group cannot take a request now (loading, failed, restarting); maps to 503."""


class QueueFull(GroupUnavailable):
    pass


class Pending:
    """One request in flight: rank 0's frames for it (chunk..., then response or error), in order. Lighter than
    an asyncio.Queue: one deque, and a future only while its reader waits. A `started` frame goes to `on_started`
    when one is set (the request's timer), so it costs no wake-up of the request's task."""

    __slots__ = ("id", "on_started", "_frames", "_waiter")

    def __init__(self, id: int):
        self.id = id
        self.on_started: Callable[[Started], None] | None = None
        self._frames: collections.deque[Frame] = collections.deque()
        self._waiter: asyncio.Future | None = None

    def push(self, frame: Frame) -> None:
        self._frames.append(frame)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> Frame:
        while not self._frames:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._frames.popleft()

    def ready(self) -> int:
        """Frames that arrived and were not taken yet."""
        return len(self._frames)


class RankConnection(asyncio.Protocol):
    """The socket to rank 0. Every frame one read brought is handed to `on_frame` in that read's callback (no
    task to wake per frame); `on_lost` hears why the connection ended (None: rank 0 closed it)."""

    def __init__(self, on_frame: Callable[[Frame], None], on_lost: Callable[[Exception | None], None]):
        self.on_frame, self.on_lost = on_frame, on_lost
        self.transport: asyncio.Transport | None = None
        self._frames = FrameBuffer(FROM_RANK)
        self._lost = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._frames.feed(data)
        except ProtocolError as exc:
            self.transport.close()
            self._report(exc)
            return
        for frame in frames:
            self.on_frame(frame)

    def connection_lost(self, exc: Exception | None) -> None:
        self._report(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def lost(self) -> bool:
        """The connection ended (on_lost was told)."""
        return self._lost

    def _report(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self.on_lost(exc)


class WorkerGroup:
    def __init__(self, config: ModelConfig, space: Namespace | None = None, devices: list[str] | None = None):
        self.config = config
        self.devices = devices  # GPU ids for CUDA_VISIBLE_DEVICES when groups get their own GPUs; None: all
        self.load_progress: dict[str, float] = {}  # load stage -> seconds since launch (launched, ranks_up, ...)
        self.engine_stats: dict | None = None  # rank 0's heartbeat `engine` report, when its engine sends one
        self.model_facts: dict = {}  # what the handler told of its model when it loaded (GET /info)
        self.rank_queued = 0  # requests waiting on rank 0, from its heartbeat
        self.space = space or Namespace()
        self.state = State.LOADING
        self.error: str | None = None
        self.suspect: str | None = None  # why the running group looks unwell (late beat, no progress), or None
        self.loaded_in: float | None = None
        self.restarts = 0
        self.failures = 0  # consecutive
        self.requests: dict[int, Pending] = {}
        self._ids = itertools.count(1)
        self._process: asyncio.subprocess.Process | None = None
        self._connection: RankConnection | None = None
        self._outbox: list[bytes] = []  # frames for rank 0 written together at the end of this event-loop turn
        self._tasks: list[asyncio.Task] = []  # the watchdog of the current group (and a failure being handled)
        self._log_task: asyncio.Task | None = None
        self._failed = asyncio.Event()
        self._stopping = False
        self._dir: Path | None = None
        self._master_port: int | None = None
        self._last_heartbeat = 0.0
        self._progress = -1
        self._progress_at = 0.0
        self._ready_at = 0.0
        self._has_work = False
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
        """Start the group and keep it running: restart after a failure, backing off, and give up (FAILED)
        after retry_threshold consecutive failures. A group that never became ready stays FAILED at once (its
        handler or config is broken; restarting would fail the same way)."""
        ever_ready = False
        while not self._stopping:
            try:
                await self.start()
                ever_ready = True
                up_since = time.monotonic()
                await self._failed.wait()
                if time.monotonic() - up_since >= STABLE_AFTER:
                    self.failures = 0
            except GroupUnavailable as exc:
                self._mark_failed(str(exc))
                if not ever_ready:
                    log.error("model %s failed to load: %s", self.name, exc)
                    return
            if self._stopping:
                return
            self.failures += 1
            if self.failures > self.config.retry_threshold:
                self.state = State.FAILED
                self.error = f"gave up after {self.failures} consecutive failures (retry_threshold=" \
                             f"{self.config.retry_threshold}); the last: {self.error}"
                log.error("model %s: %s", self.name, self.error)
                return
            delay = RESTART_BACKOFF[min(self.failures - 1, len(RESTART_BACKOFF) - 1)]
            self.state = State.RESTARTING
            self.restarts += 1
            log.warning("model %s: restarting its worker group in %d s (failure %d of at most %d in a row: %s)",
                        self.name, delay, self.failures, self.config.retry_threshold + 1, self.error)
            await asyncio.sleep(delay)

    async def start(self) -> None:
        """Launch the ranks and load the model on all of them; returns once the group is READY."""
        # A fresh group starts from nothing the last one left: state, progress, files.
        self.state, self.error, self.suspect, self._failed = State.LOADING, None, None, asyncio.Event()
        self._progress, self._has_work = -1, False
        started = time.monotonic()
        self.load_progress = {"launched": 0.0}
        self._dir = self.space.group_dir(self.name)
        socket_path = str(self._dir / "rank0.sock")
        self._master_port = free_port()
        mode = f"MPI mode with TP: {self.config.world_size}" if self.config.uses_mpi else "Python mode"
        log.info("Loading model %s in %s.", self.name, mode)
        self._process = await asyncio.create_subprocess_exec(
            *launch_command(self.config, socket_path),
            env=rank_environment(self._master_port, self.space, self._dir / "beat", self.devices),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)  # its own process group, so the whole tree can be signalled
        namespace.record_group(self._dir, self._process.pid, self._master_port if self.config.uses_mpi else None)
        self._log_task = asyncio.create_task(self._pump_log())  # ends by itself when the ranks' output closes
        self._tasks = []
        loading: asyncio.Queue = asyncio.Queue()  # rank 0's frames until it is ready; an exception if it left
        try:
            async with asyncio.timeout(self.config.model_loading_timeout):
                await self._connect(socket_path, loading.put_nowait,
                                    lambda exc: loading.put_nowait(exc or ConnectionError("rank 0 closed the socket")))
                self.load_progress["ranks_up"] = time.monotonic() - started  # rank 0 listens once all ranks joined
                self._send(Init(self.config.handler_properties(), self.config.entry_point_module()))
                frame = await next_loading_frame(loading)
                while isinstance(frame, Progress):  # optional load stages from rank 0 (weights_loaded, ...)
                    self.load_progress[str(frame.stage)] = time.monotonic() - started
                    frame = await next_loading_frame(loading)
        except TimeoutError:
            await self._kill()
            raise GroupUnavailable(f"model {self.name} did not load within option.model_loading_timeout="
                                   f"{self.config.model_loading_timeout} s") from None
        except (GroupUnavailable, OSError, ProtocolError) as exc:
            await self._kill()
            raise GroupUnavailable(f"model {self.name}: the ranks exited while loading "
                                   f"({self._exit_status()}): {self._last_lines()}") from exc
        if not isinstance(frame, Ready):
            await self._kill()
            reason = frame.message if isinstance(frame, Error) else f"rank 0 sent a {frame.kind} frame"
            raise GroupUnavailable(f"model {self.name} failed to load: {reason}")
        self.loaded_in = time.monotonic() - started
        self.load_progress["ready"] = self.loaded_in
        self.model_facts = frame.model or {}
        self._last_heartbeat = self._progress_at = self._ready_at = time.monotonic()
        self.state = State.READY
        self._connection.on_frame, self._connection.on_lost = self._on_frame, self._on_connection_lost
        while not loading.empty():  # whatever arrived with `ready`
            frame = loading.get_nowait()
            if isinstance(frame, Exception):
                self._on_connection_lost(frame)
            else:
                self._on_frame(frame)
        self._tasks.append(asyncio.create_task(self._watch()))
        log.info("Model [%s] initialized: loaded on %d rank(s) in %d ms.", self.name, self.config.world_size,
                 self.loaded_in * 1000)

    async def stop(self) -> None:
        """Ask the ranks to shut down, then make sure the whole tree is gone. Rank 0 sends its last frames (the
        answers of the unit it was running), then closes its socket and exits: the group is torn down once that
        socket is closed (every frame read) and mpirun has exited, or after 5 s."""
        self._stopping = True
        ready = self.state == State.READY
        self.state = State.STOPPED
        if ready and self._connection is not None and self._process is not None and self._process.returncode is None:
            closed = asyncio.get_running_loop().create_future()
            if self._connection.lost:
                closed.set_result(None)
            self._connection.on_lost = lambda exc: closed.done() or closed.set_result(None)
            self._send(Shutdown())
            try:
                await asyncio.wait_for(asyncio.gather(closed, self._process.wait()), 5)
            except TimeoutError:
                log.warning("model %s: ranks did not exit within 5 s of shutdown; killing them", self.name)
        await self._kill()
        self._fail_requests(503, f"model {self.name} is shutting down")
        self._failed.set()

    # --- requests ------------------------------------------------------------------------------
    def submit(self, request_input: RequestInput) -> Pending:
        """Queue one request for rank 0; its frames arrive on the returned Pending's queue."""
        if self.state != State.READY:
            raise GroupUnavailable(f"model {self.name} is {self.state.value.lower()}"
                                   + (f": {self.error}" if self.error else ""))
        if len(self.requests) >= self.config.job_queue_size:
            raise QueueFull(f"model {self.name} has {len(self.requests)} requests queued "
                            f"(job_queue_size={self.config.job_queue_size})")
        pending = Pending(next(self._ids))
        self.requests[pending.id] = pending
        self._send(Request(pending.id, request_input))
        return pending

    def cancel(self, pending: Pending) -> None:
        """The client is gone: drop the request if queued, stop its generation if running."""
        if self.requests.pop(pending.id, None) is not None and self.state == State.READY:
            self._send(Cancel(pending.id))

    # --- inside the group ----------------------------------------------------------------------
    async def _connect(self, socket_path: str, on_frame: Callable[[Frame], None],
                       on_lost: Callable[[Exception | None], None]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._process.returncode is not None:
                raise GroupUnavailable("exited")
            try:
                _, self._connection = await loop.create_unix_connection(lambda: RankConnection(on_frame, on_lost),
                                                                        socket_path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.05)

    def _on_frame(self, frame: Frame) -> None:
        """A frame from rank 0 of a ready group: to its request, or the group's own (heartbeat replies)."""
        if isinstance(frame, (Chunk, Response)) or (isinstance(frame, Error) and frame.id is not None):
            pending = self.requests.get(frame.id)
            if pending is None:
                return  # its client left and the request was cancelled
            if not isinstance(frame, Chunk):
                del self.requests[frame.id]
            pending.push(frame)
        elif isinstance(frame, HeartbeatReply):
            self._on_heartbeat(frame)
        elif isinstance(frame, Started):  # rank 0 began a unit of these requests: queue wait is timed
            for rid in frame.ids:
                pending = self.requests.get(rid)
                if pending is not None:
                    pending.on_started(frame) if pending.on_started is not None else pending.push(frame)
        else:
            reason = frame.message if isinstance(frame, Error) else f"an unexpected {frame.kind} frame"
            self._fail_soon(f"rank 0 reported: {reason}")

    def _on_connection_lost(self, exc: Exception | None) -> None:
        what = f"{type(exc).__name__}: {exc}" if exc is not None else "rank 0 closed it"
        self._fail_soon(f"connection to rank 0 lost ({what}; {self._exit_status()})")

    def _fail_soon(self, reason: str) -> None:
        if self.state == State.READY:
            self._tasks.append(asyncio.get_running_loop().create_task(self._group_failed(reason)))

    def _on_heartbeat(self, frame: HeartbeatReply) -> None:
        now = time.monotonic()
        self._last_heartbeat = now
        progress, has_work = frame.progress, frame.has_work
        # The stall clock runs only while there is work: an idle group makes no progress and is fine.
        if progress != self._progress or not (has_work or self._has_work):
            self._progress, self._progress_at = progress, now
        self._has_work = has_work
        self.rank_queued, self.engine_stats = frame.queued, frame.engine

    async def _watch(self) -> None:
        """Heartbeats out; a dead, stopped, silent or stalled group is failed, a late one suspected."""
        seq = 0
        while self.state == State.READY:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            if self.state != State.READY:
                return
            if self._process.returncode is not None:
                return await self._group_failed(f"ranks exited ({self._exit_status()}): {self._last_lines()}")
            problem, fatal = self._health()
            if fatal:
                return await self._group_failed(problem)
            if problem != self.suspect:
                log.warning("model %s: %s", self.name, problem) if problem else \
                    log.info("model %s: healthy again", self.name)
            self.suspect = problem
            seq += 1
            self._send(Heartbeat(seq))

    def _health(self) -> tuple[str | None, bool]:
        """(what looks wrong, whether it is bad enough to fail the group) from beats, answers and progress."""
        now = time.monotonic()
        limit = self.config.heartbeat_timeout
        problems = []
        for rank, age in self._beat_ages(now).items():
            if age > limit:
                return f"rank {rank} has not beaten for {age:.0f} s (option.heartbeat_timeout={limit}): " \
                       f"it is stopped or frozen", True
            if age > SUSPECT_AFTER:
                problems.append(f"rank {rank}'s last beat was {age:.0f} s ago")
        silent = now - self._last_heartbeat
        if silent > limit:
            return f"rank 0 has not answered heartbeats for {silent:.0f} s (option.heartbeat_timeout={limit})", True
        if silent > SUSPECT_AFTER:
            problems.append(f"rank 0 last answered a heartbeat {silent:.0f} s ago")
        stalled = now - self._progress_at if self._has_work else 0.0
        if stalled > self.config.stall_limit:
            return f"no progress for {stalled:.0f} s while it has work (option.hang_timeout=" \
                   f"{self.config.stall_limit}): a rank is hung", True
        if stalled > self.config.predict_timeout:
            problems.append(f"no progress for {stalled:.0f} s while it has work")
        return ("; ".join(problems) or None), False

    def _beat_ages(self, now: float) -> dict[int, float]:
        """Seconds since each rank's last beat, on the monotonic clock; a rank with no file yet counts as
        beating when the group became ready."""
        ages = {}
        wall = time.time()
        for rank in range(self.config.world_size):
            try:
                mtime = (self._dir / "beat" / f"rank{rank}").stat().st_mtime
            except OSError:
                ages[rank] = now - self._ready_at
                continue
            ages[rank] = max(0.0, wall - mtime)
        return ages

    async def _group_failed(self, reason: str) -> None:
        if self.state != State.READY:
            return
        log.error("model %s: worker group failed: %s", self.name, reason)
        self._mark_failed(reason)
        await self._kill()
        self._fail_requests(503, f"model {self.name}'s worker group failed and is restarting: {reason}")
        self._failed.set()

    def _mark_failed(self, reason: str) -> None:
        self.state, self.error, self.suspect = State.FAILED, reason, None

    def _fail_requests(self, code: int, message: str) -> None:
        for pending in self.requests.values():
            pending.push(Error(code, message, pending.id))
        self.requests.clear()

    def _send(self, frame: Frame) -> None:
        """Queue a frame for rank 0. Every frame queued in one event-loop turn (the requests of every connection
        that was readable) goes in one write, so rank 0 reads them in one system call and broadcasts them together."""
        if self._connection is None:
            return
        if not self._outbox:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outbox.append(encode(frame))

    def _flush(self) -> None:
        data, self._outbox = b"".join(self._outbox), []
        if self._connection is not None:
            self._connection.write(data)

    async def _pump_log(self) -> None:
        """Forward the ranks' output (mpirun tags each line with [job,rank]) into our log."""
        rank_log = logging.getLogger(f"tpserve.model.{self.name}")
        async for line in self._process.stdout:
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.recent_log.append(text)
                rank_log.info("%s", text)

    async def _kill(self) -> None:
        """SIGKILL mpirun, every rank the group recorded and their process groups (even when mpirun is already
        gone), wait until they are gone, then remove the group's files, /dev/shm included."""
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        if self._connection is not None:
            self._connection.on_frame = self._connection.on_lost = lambda _: None  # this group is over
            self._connection.close()
            self._connection = None
        self._outbox = []
        if self._dir is not None:
            group_dir, self._dir = self._dir, None
            alive = await asyncio.to_thread(namespace.kill_group, group_dir)
            if alive:
                log.error("model %s: processes %s survived SIGKILL", self.name, [p.pid for p in alive])
            if self._process is not None:
                await self._process.wait()
            namespace.remove_group_files(group_dir)

    def _exit_status(self) -> str:
        code = self._process.returncode if self._process else None
        return "still running" if code is None else f"exit code {code}"

    def _last_lines(self, count: int = 8) -> str:
        return " | ".join(list(self.recent_log)[-count:])


async def next_loading_frame(loading: asyncio.Queue) -> Frame:
    item = await loading.get()
    if isinstance(item, Exception):
        raise item if isinstance(item, (OSError, ProtocolError)) else ConnectionError(str(item))
    return item


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


def rank_environment(master_port: int, space: Namespace, beat_dir: Path,
                     devices: list[str] | None = None) -> dict[str, str]:
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
        # Everything the group writes lands in this instance's namespace, so it can all be removed:
        TMPDIR=str(space.tmp),  # Open MPI's session folders (/tmp/ompi.*, /tmp/prte.*)
        **{beat.ENV: str(beat_dir)},
    )
    if space.shm.is_dir():
        env["OMPI_MCA_btl_sm_backing_directory"] = str(space.shm)  # /dev/shm/sm_segment.*
    project_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [project_root, env.get("PYTHONPATH")]))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
