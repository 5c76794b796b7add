"""Startup, failure and shutdown: bad configuration stops startup, broken handlers get a clear message,
a dead rank restarts its group, and stopping the server leaves no process or shared memory behind."""
import glob
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from tests.conftest import FIXTURES, model_dir
from tests.server import ROOT, Server


def run_cli(args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "serving.cli", *args, "--port", "0"], cwd=ROOT, timeout=timeout,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_bad_property_value_stops_startup_naming_file_and_key(tmp_path):
    path = model_dir(tmp_path, "bad", {"engine": "DeepSpeed", "option.tensor_parallel_degree": "two"})
    result = run_cli(["-m", str(path)])
    assert result.returncode == 2
    assert "option.tensor_parallel_degree='two'" in result.stdout
    assert str(path / "serving.properties") in result.stdout


def test_environment_override_wins_over_the_file(tmp_path):
    path = model_dir(tmp_path, "ok", {"engine": "DeepSpeed", "option.tensor_parallel_degree": "1"})
    result = run_cli(["-m", str(path)], env={"OPTION_TENSOR_PARALLEL_DEGREE": "-3"})
    assert result.returncode == 2
    assert "option.tensor_parallel_degree='-3'" in result.stdout


def test_missing_model_store_is_refused(tmp_path):
    result = run_cli(["--model-store", str(tmp_path / "nothing")])
    assert result.returncode == 2 and "no such folder" in result.stdout


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory, demo_model):
    store = tmp_path_factory.mktemp("broken-store")
    props = {"engine": "DeepSpeed", "option.model_id": str(demo_model), "option.tensor_parallel_degree": "1"}
    for name in ("article_2022", "kernel_inject", "engine_pipeline"):
        model_dir(store, name, props, handler=FIXTURES / f"{name}.py")
    srv = Server(["--model-store", str(store)], tmp_path_factory.mktemp("logs") / "broken.log")
    try:
        yield srv, srv.wait_for_models()
    finally:
        srv.stop()


@pytest.mark.parametrize("name,advice", [
    ("article_2022", "dtype=torch.float32"),
    ("kernel_inject", "replace_with_kernel_inject=False"),
    ("engine_pipeline", "model=engine.module"),
])
def test_old_handlers_fail_with_advice(broken_server, name, advice):
    server, models = broken_server
    assert models[name]["state"] == "FAILED"
    assert advice in models[name]["error"]
    response = server.post(f"/predictions/{name}", data="hi")
    assert response.status_code == 503
    assert advice in response.json()["message"]


def test_ping_is_503_while_a_model_is_failed(broken_server):
    server, _ = broken_server
    response = server.get("/ping")
    assert response.status_code == 503
    assert response.json()["models"]["kernel_inject"]["status"] == "Unhealthy"


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    """One echo server at TP=2 for the two tests below: a rank killed (the group restarts), then the server
    stopped, which ends it, so that test comes last."""
    root = tmp_path_factory.mktemp("echo")
    path = model_dir(root, "echo", {"engine": "DeepSpeed", "option.tensor_parallel_degree": "2",
                                    "option.entryPoint": "handlers.echo"})
    srv = Server(["-m", str(path)], root / "echo.log")
    try:
        assert srv.wait_for_models()["echo"]["state"] == "READY", srv.log_tail()
        yield srv
    finally:
        srv.stop()


def rank_processes(server):
    return [p for p in server.descendants() if p.cmdline()[1:3] == ["-m", "serving.rank"]]


def shm_files(processes):
    ports = {p.environ().get("MASTER_PORT") for p in processes}
    return [f for port in ports for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")]


def test_a_dead_rank_restarts_the_group(echo_server):
    ranks = rank_processes(echo_server)
    assert len(ranks) == 2
    assert echo_server.post("/predictions/echo", data="before").json()["echo"] == "before"
    victim = next(p for p in ranks if p.environ().get("OMPI_COMM_WORLD_RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 120
    saw_unhealthy = False
    while time.monotonic() < deadline:
        ping = echo_server.get("/ping")
        saw_unhealthy |= ping.status_code == 503
        if saw_unhealthy and ping.status_code == 200:
            break
        time.sleep(0.2)
    assert saw_unhealthy, "the group's failure never showed on /ping"
    assert echo_server.get("/ping").status_code == 200, echo_server.log_tail()
    assert echo_server.post("/predictions/echo", data="after").json()["echo"] == "after"
    assert echo_server.get("/models/echo").json()["restarts"] == 1
    assert not any(p.is_running() for p in ranks), "the old group's ranks survived the restart"


def test_stopping_the_server_leaves_no_ranks_and_no_shared_memory(echo_server):
    """Last in this module: it stops the module's echo server (whose group the test above restarted)."""
    ranks = rank_processes(echo_server)
    tree = echo_server.descendants()
    files = shm_files(ranks)
    assert files, "expected DeepSpeed's shared-memory files while the group runs"
    assert echo_server.stop() == 0
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert not [f for f in files if os.path.exists(f)]
    with pytest.raises(requests.ConnectionError):
        echo_server.get("/ping")
