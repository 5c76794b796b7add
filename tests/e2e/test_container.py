"""The container's command, proven without a Docker engine: run the CPU image's exact ENTRYPOINT + CMD with
the image's ENV, from its WORKDIR, with the image's paths mapped onto this machine (/opt/ml/model -> a
temporary model folder, /opt/venv -> this venv, /home/tpserve -> a temporary home). It must serve the demo
and answer the article's curl. tests/unit/test_deploy.py checks that the CUDA image has the same contract.

What differs from `docker run`, and why: the port (8080 may be taken on a shared machine) and PYTHONPATH
(this checkout's code rather than whichever copy the venv's console script was installed from)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from tests.dockerfile import runtime
from tests.server import LOAD_TIMEOUT_S, ROOT, free_port

IMAGE = runtime(ROOT / "Dockerfile.cpu")
# The host environment a container does not inherit, but this machine's numerical libraries may need.
HOST_KEEP = ("OPENBLAS_", "LANG", "LC_", "TMPDIR")


def test_the_images_command_serves_the_demo_and_answers_the_articles_curl(tmp_path, demo_model):
    model = tmp_path / "opt-ml-model"  # what `-v $PWD/model:/opt/ml/model` mounts: the demo's model folder
    model.mkdir()
    shutil.copy(ROOT / "model_store" / "smollm2" / "serving.properties", model)
    (model / "model").symlink_to(demo_model)
    home = tmp_path / "home"
    home.mkdir()
    places = {"/opt/ml/model": str(model), "/opt/venv": sys.prefix, "/home/tpserve": str(home)}

    port = free_port()
    argv = [mapped(arg, places) for arg in IMAGE.argv]
    argv[argv.index("--port") + 1] = str(port)
    env = {name: value for name, value in os.environ.items() if name.startswith(HOST_KEEP)}
    env.update({name: mapped(value, places) for name, value in IMAGE.env.items()})
    env["PATH"] = mapped(IMAGE.env["PATH"].split(":")[0], places) + os.pathsep + os.environ["PATH"]
    env["PYTHONPATH"] = str(ROOT)
    env["OPTION_MODEL_LOADING_TIMEOUT"] = str(LOAD_TIMEOUT_S)  # as every test server (tests/server.py)
    assert shutil.which(argv[0], path=env["PATH"]), f"{argv[0]} is not on the image's PATH here"

    log = open(tmp_path / "container.log", "wb")
    process = subprocess.Popen(argv, cwd=mapped(IMAGE.workdir, places), env=env, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", process, tmp_path / "container.log")
        # The article's request, to the model the image's CMD names (`-m deepspeed=/opt/ml/model`).
        answer = requests.post(f"http://127.0.0.1:{port}/predictions/deepspeed", data="I'm very thirsty, I need",
                               headers={"Content-type": "text/plain"}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert "water" in answer.json()["generated_text"]
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            for proc in [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True):
                proc.kill()
            process.wait(10)
        log.close()


def mapped(value: str, places: dict[str, str]) -> str:
    for image_path, here in places.items():
        value = value.replace(image_path, here)
    return value


def wait_until_ready(url: str, process: subprocess.Popen, log_path, timeout: float = LOAD_TIMEOUT_S + 60) -> None:
    """Until /ping is 200 (every model ready); fails at once if the server exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the image's command exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(url + "/ping", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    pytest.fail(f"not ready after {timeout} s:\n{log_path.read_text()[-4000:]}")
