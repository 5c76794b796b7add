"""A real `tpserve` subprocess for end-to-end tests: started on a free port, waited on by condition (its
models' states), stopped by process id, with its log kept for failure messages."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
# How long a test model may take to load (option.model_loading_timeout, through its environment variable). Loads
# take 10-70 s here, but the CI box is 2 shared cores: one CI run saw a TP=4 load pass the server's default 240 s
# while other models' ranks loaded beside it. A test that means to time a load out passes its own in `env`.
LOAD_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "serving.cli", *args, "--port", str(self.port)],
                                        cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        env={"OPTION_MODEL_LOADING_TIMEOUT": str(LOAD_TIMEOUT_S), **os.environ,
                                             **(env or {})})
        self.started = time.monotonic()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, path: str, **kwargs) -> requests.Response:
        return requests.post(self.url(path), timeout=kwargs.pop("timeout", 120), **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url(path), timeout=kwargs.pop("timeout", 30), **kwargs)

    def put(self, path: str, **kwargs) -> requests.Response:
        return requests.put(self.url(path), timeout=kwargs.pop("timeout", 120), **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return requests.delete(self.url(path), timeout=kwargs.pop("timeout", 120), **kwargs)

    def wait_for_models(self, timeout: float = LOAD_TIMEOUT_S + 60) -> dict[str, dict]:
        """Until every model has left LOADING (READY or FAILED); returns their summaries by name."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tpserve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                models = self.get("/models", timeout=5).json()["models"]
                if all(model["state"] != "LOADING" for model in models):
                    return {model["modelName"]: model for model in models}
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"models still loading after {timeout} s:\n{self.log_tail()}")

    def wait_for_ready_models(self) -> dict[str, dict]:
        """wait_for_models, failing unless every model is READY, with each failed model's error and the log."""
        models = self.wait_for_models()
        failed = {name: model["error"] for name, model in models.items() if model["state"] != "READY"}
        assert not failed, f"models failed to load: {failed}\n{self.log_tail()}"
        return models

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for proc in [psutil.Process(self.process.pid)] + self.descendants():
                    proc.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode

    def log_tail(self, lines: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
