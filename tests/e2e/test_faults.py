"""Faults, end to end (issue 9): a stopped rank, a killed rank / mpirun / front end, Ctrl-C, a stalled
handler, a crash loop. Each ends with the model serving again (or, when the front end dies, nothing of this
instance left: no process, nothing in /dev/shm or /tmp), and the time each took lands in
bench/results/reliability.json for BENCHMARKS.md.

One module-scoped server holds the models the faults need (an echo model at TP=2 over real mpirun and
DeepSpeed, two one-process models with short watchdog settings); the front-end deaths start their own.
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from serving import namespace
from tests.conftest import FIXTURES, model_dir
from tests.server import ROOT, Server

RESULTS = ROOT / "bench" / "results" / "reliability.json"
TIMINGS: dict[str, float] = {}
ECHO = {"engine": "DeepSpeed", "option.tensor_parallel_degree": "2", "option.entryPoint": "handlers.echo",
        "option.heartbeat_timeout": "5"}


def wait_until(condition, timeout: float, what: str, pause: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def record(name: str, seconds: float) -> None:
    TIMINGS[name] = round(seconds, 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**old, **TIMINGS}, indent=2))


def namespace_of(server: Server) -> Path:
    return namespace.TMP_BASE / f"{namespace.PREFIX}{server.process.pid}"


def group_dir(server: Server, model: str) -> Path:
    """The live group's folder (the newest of the model's)."""
    dirs = sorted(namespace_of(server).glob(f"{model}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return dirs[-1]


def ranks_of(server: Server, model: str) -> dict[int, psutil.Process]:
    beats = group_dir(server, model) / "beat"
    procs = {}
    for path in beats.glob("rank*"):
        proc = namespace._process_of(path)
        if proc is not None:
            procs[int(path.name[4:])] = proc
    return procs


def ours(server_pid: int, shm_patterns: list[str]) -> set[str]:
    """Every file or folder in /dev/shm and /tmp that this instance made."""
    found = set()
    for base in (namespace.TMP_BASE, namespace.SHM_BASE):
        found |= {str(p) for p in base.glob(f"{namespace.PREFIX}{server_pid}")}
    for pattern in shm_patterns:
        found |= set(map(str, Path("/").glob(pattern.lstrip("/"))))
    return found


def listing() -> set[str]:
    return {str(p) for base in (namespace.TMP_BASE, namespace.SHM_BASE) for p in base.iterdir()}


def model_state(server: Server, model: str) -> dict:
    return server.get(f"/models/{model}").json()


def serving_again(server: Server, model: str, body: str = "again") -> bool:
    state = model_state(server, model)
    if state["state"] != "READY" or state["suspect"]:
        return False
    response = server.post(f"/predictions/{model}", data=body, timeout=30)
    return response.status_code == 200


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    store = tmp_path_factory.mktemp("fault-store")
    model_dir(store, "echo", ECHO)
    model_dir(store, "stall", {"engine": "Python", "option.predict_timeout": "2", "option.hang_timeout": "5"},
              handler=FIXTURES / "stall.py")
    model_dir(store, "crashy", {"engine": "Python", "retry_threshold": "1"}, handler=FIXTURES / "stall.py")
    srv = Server(["--model-store", str(store), "--idle-timeout", "2"], tmp_path_factory.mktemp("logs") / "fault.log")
    try:
        srv.wait_for_ready_models()
        yield srv
    finally:
        srv.stop()


def test_a_stopped_rank_is_detected_and_its_group_replaced(fault_server):
    srv = fault_server
    old_dir = group_dir(srv, "echo")
    shm = (old_dir / "shm").read_text().split()
    victim = ranks_of(srv, "echo")[1]
    old = list(ranks_of(srv, "echo").values()) + namespace.group_processes(old_dir)
    started = time.monotonic()
    victim.send_signal(signal.SIGSTOP)
    wait_until(lambda: srv.get("/ping").status_code == 503, 30, "/ping to turn 503")
    record("sigstop_rank1_ping_503_s", time.monotonic() - started)
    wait_until(lambda: model_state(srv, "echo")["restarts"] >= 1, 30, "the stopped group to be failed")
    record("sigstop_rank1_detected_s", time.monotonic() - started)
    assert "rank 1 has not beaten" in srv.log_tail(200)
    wait_until(lambda: serving_again(srv, "echo"), 90, "the model to serve again")
    record("sigstop_rank1_serving_again_s", time.monotonic() - started)
    gone, alive = psutil.wait_procs(old, timeout=5)
    assert not alive, f"left running beside the new group: {[p.pid for p in alive]}"
    assert not old_dir.exists() and not ours(0, shm), "the stopped group's files are still there"


@pytest.mark.parametrize("victim", ["rank1", "rank0", "mpirun"])
def test_a_killed_process_of_the_group_leaves_nothing_and_the_model_serves_again(fault_server, victim):
    srv = fault_server
    wait_until(lambda: serving_again(srv, "echo"), 90, "the model to be ready")
    restarts = model_state(srv, "echo")["restarts"]
    old_dir = group_dir(srv, "echo")
    shm = (old_dir / "shm").read_text().split()
    assert ours(0, shm), "expected DeepSpeed's shared-memory files while the group runs"
    ranks = ranks_of(srv, "echo")
    mpirun = namespace._process_of(old_dir / "pids")
    old = [mpirun, *ranks.values()]
    target = mpirun if victim == "mpirun" else ranks[int(victim[-1])]
    started = time.monotonic()
    target.send_signal(signal.SIGKILL)
    wait_until(lambda: model_state(srv, "echo")["restarts"] > restarts, 30, "the group's failure")
    wait_until(lambda: serving_again(srv, "echo"), 90, "the model to serve again")
    record(f"kill9_{victim}_serving_again_s", time.monotonic() - started)
    gone, alive = psutil.wait_procs(old, timeout=5)
    assert not alive, f"left running beside the new group: {[p.pid for p in alive]}"
    assert not old_dir.exists() and not ours(0, shm)


def test_a_stalled_handler_is_declared_hung_and_replaced(fault_server):
    srv = fault_server
    started = time.monotonic()
    response = srv.post("/predictions/stall", data="stall", timeout=30)
    assert response.status_code == 504, response.text
    wait_until(lambda: model_state(srv, "stall")["restarts"] >= 1, 30, "the stalled group to be failed")
    record("stalled_handler_detected_s", time.monotonic() - started)
    assert "no progress for" in srv.log_tail(200)
    wait_until(lambda: serving_again(srv, "stall"), 60, "the stalled model to serve again")
    record("stalled_handler_serving_again_s", time.monotonic() - started)


def test_half_open_connections_are_closed_after_the_idle_timeout(fault_server):
    socks = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", fault_server.port))
        sock.sendall(b"POST /predictions/echo HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        sock.settimeout(10)
        socks.append(sock)
    started = time.monotonic()
    try:
        closed = sum(1 for sock in socks if sock.recv(1) == b"")
    finally:
        for sock in socks:
            sock.close()
    assert closed == 50
    assert time.monotonic() - started < 8  # --idle-timeout 2


def test_load_with_bad_requests_while_a_rank_is_killed_answers_every_request(fault_server):
    srv = fault_server
    wait_until(lambda: serving_again(srv, "echo"), 90, "the model to be ready")
    restarts = model_state(srv, "echo")["restarts"]
    ranks = ranks_of(srv, "echo")
    counts = asyncio.run(load(srv, total=240, concurrency=12, kill=lambda: ranks[1].send_signal(signal.SIGKILL)))
    record("load_sent", counts["sent"])
    record("load_answered", counts["answered"])
    record("load_errors", counts["errors"])
    record("load_unanswered", counts["unanswered"])
    assert counts["unanswered"] == 0, counts
    assert counts["sent"] == counts["answered"] == 240
    assert counts["unexpected"] == [], counts["unexpected"][:5]
    assert model_state(srv, "echo")["restarts"] == restarts + 1
    wait_until(lambda: serving_again(srv, "echo"), 90, "the model to serve again")


async def load(srv: Server, total: int, concurrency: int, kill) -> dict:
    """A fixed number of requests, a quarter of them invalid, from `concurrency` clients; `kill` once a third
    are sent. Valid ones must get 200 or (during the restart) 503/504 with a JSON error; invalid ones their 4xx."""
    kinds = [
        ("valid", "POST", "/predictions/echo", {"data": "hello"}, {200, 503, 504}),
        ("valid", "POST", "/predictions/echo", {"data": "hello again"}, {200, 503, 504}),
        ("valid", "POST", "/predictions/echo", {"data": "and again"}, {200, 503, 504}),
        ("unknown model", "POST", "/predictions/nope", {"data": "x"}, {404}),
        ("bad json", "POST", "/predictions/echo", {"data": b"{", "headers": {"Content-Type": "application/json"}}, {400}),
        ("bad openai", "POST", "/v1/completions", {"json": {"model": "echo", "prompt": "x", "temperature": 9}}, {422}),
        ("too large", "POST", "/predictions/echo", {"data": b"x" * (5 * 2**20)}, {413}),
        ("not utf-8", "POST", "/predictions/echo", {"data": b"\xff\xfe", "headers": {"Content-Type": "text/plain"}}, {400}),
    ]
    counts = {"sent": 0, "answered": 0, "errors": 0, "unanswered": 0, "unexpected": []}
    queue: asyncio.Queue = asyncio.Queue()
    for index in range(total):
        queue.put_nowait(kinds[index % len(kinds)])
    killed = False

    async def client(session: aiohttp.ClientSession):
        nonlocal killed
        while not queue.empty():
            name, method, path, kwargs, expected = queue.get_nowait()
            counts["sent"] += 1
            if counts["sent"] > total // 3 and not killed:
                killed = True
                kill()
            try:
                async with session.request(method, srv.url(path), **kwargs) as response:
                    body = await response.read()
                    counts["answered"] += 1
                    if response.status >= 400:
                        counts["errors"] += 1
                        json.loads(body)  # every error is JSON
                    if response.status not in expected:
                        counts["unexpected"].append((name, response.status, body[:200]))
            except Exception as exc:  # noqa: BLE001 - anything but an answer counts as unanswered
                counts["unanswered"] += 1
                counts["unexpected"].append((name, type(exc).__name__, str(exc)[:200]))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return counts


def test_retry_threshold_turns_a_crash_loop_into_failed(fault_server):
    """Last in this module: it leaves the server's /ping at 503 for good."""
    srv = fault_server
    for attempt in (1, 2):
        wait_until(lambda: model_state(srv, "crashy")["state"] == "READY", 60, "crashy to be ready")
        response = srv.post("/predictions/crashy", data="crash", timeout=30)
        assert response.status_code == 503
        assert response.headers["Retry-After"]
    wait_until(lambda: model_state(srv, "crashy")["state"] == "FAILED", 30, "crashy to be FAILED")
    state = model_state(srv, "crashy")
    assert "gave up after 2 consecutive failures (retry_threshold=1)" in state["error"]
    ping = srv.get("/ping")
    assert ping.status_code == 503 and ping.json()["models"]["crashy"]["state"] == "FAILED"
    assert ping.headers["Retry-After"]
    assert model_state(srv, "crashy")["restarts"] == 1


# --- the front end's own death ----------------------------------------------------------------------

class LoneServers:
    """Echo servers at TP=2 behind an API key, each with what /dev/shm and /tmp held before it started. A test
    reads the live one, or starts one if there is none: the authentication test leaves it running for the first
    front-end death, and each death after that starts its own."""

    def __init__(self, root: Path):
        self.root, self.started = root, []

    def live(self) -> tuple[Server, set[str]]:
        if not self.started or self.started[-1][0].process.poll() is not None:
            before = listing()
            home = self.root / f"lone{len(self.started)}"
            home.mkdir()
            path = model_dir(home, "echo", {**ECHO, "option.hf_token": "hf_sekrit_value"})
            srv = Server(["-m", str(path)], home / "lone.log", env={"TPSERVE_API_KEY": "k3y"})
            self.started.append((srv, before))
            wait_until(lambda: ping_ok(srv), 300, f"the server to be ready:\n{srv.log_tail()}", pause=0.25)
        return self.started[-1]

    def stop(self) -> None:
        for srv, _ in self.started:
            srv.stop()
            for proc in srv.descendants():
                proc.kill()


@pytest.fixture(scope="module")
def lone_servers(tmp_path_factory):
    servers = LoneServers(tmp_path_factory.mktemp("lone"))
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture()
def lone_server(lone_servers):
    return lone_servers.live()


def ping_ok(srv: Server) -> bool:
    if srv.process.poll() is not None:
        raise AssertionError(f"tpserve exited:\n{srv.log_tail()}")
    try:
        return srv.get("/ping", timeout=5).status_code == 200
    except OSError:
        return False


def test_authentication_and_redaction(lone_server):
    srv, _ = lone_server
    auth = {"Authorization": "Bearer k3y"}
    assert srv.get("/ping").status_code == 200  # probes carry no token
    for path in ("/models", "/models/echo", "/openapi.json", "/v1/models", "/nope"):
        response = srv.get(path)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert srv.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert srv.post("/predictions/echo", data="hi").status_code == 401
    assert srv.post("/predictions/echo", data="hi", headers=auth).json()["echo"] == "hi"
    described = srv.get("/models/echo", headers=auth)
    assert described.status_code == 200
    assert "hf_sekrit_value" not in described.text
    assert described.json()["handler_properties"]["hf_token"] == "***"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_the_front_end_dying_leaves_nothing_behind(lone_server, how):
    srv, before = lone_server
    group = group_dir(srv, "echo")
    shm = (group / "shm").read_text().split()
    tree = srv.descendants()
    made = ours(srv.process.pid, shm)
    assert len(made) >= 4, made  # two namespace folders and one DeepSpeed buffer per rank
    started = time.monotonic()
    srv.process.send_signal(how)
    srv.process.wait(30)
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"left running: {[(p.pid, p.cmdline()) for p in alive]}"
    wait_until(lambda: not ours(srv.process.pid, shm), 15, "the instance's files to be removed")
    record(f"front_end_{how.name}_clean_s", time.monotonic() - started)
    assert not ours(srv.process.pid, shm)
    left = listing() - before
    assert not [p for p in left if str(srv.process.pid) in p or any(Path(p).match(s) for s in shm)], left
    if how == signal.SIGINT:
        assert srv.process.returncode == 0, srv.log_tail()


def test_stale_namespaces_are_swept(tmp_path):
    """What a front end and its reaper, both killed, leave: a namespace whose owner is gone, a rank still
    running in its own session, a DeepSpeed buffer. The next start sweeps it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = namespace.TMP_BASE / f"{namespace.PREFIX}{dead.pid}"
    shm_dir = namespace.SHM_BASE / f"{namespace.PREFIX}{dead.pid}"
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        (root / "g-1" / "beat").mkdir(parents=True)
        (root / "owner").write_text(f"{dead.pid} 1.0\n")
        namespace.write_identity(root / "g-1" / "beat" / "rank0", orphan.pid)
        buffer = namespace.SHM_BASE / "deepspeed_allreduce_buffer_0_127.0.0.1_1_0"
        buffer.write_bytes(b"x")
        (root / "g-1" / "shm").write_text(namespace.shm_pattern(1) + "\n")
        shm_dir.mkdir()
        assert f"{namespace.PREFIX}{dead.pid}" in namespace.sweep_stale()
        orphan.wait(10)  # the sweep reaped it already (psutil waits on children), so no status to check here
        assert not psutil.pid_exists(orphan.pid)
        assert not root.exists() and not shm_dir.exists() and not buffer.exists()
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
