"""serving/engine/gemv.py: the streaming projection kernels and where they are installed. On this CPU the kernels
run under Triton's interpreter, in a subprocess with the interpreter's own Triton on its path
(tests/fixtures/triton_interpreted.py); on GPUs bench/gemv.py checks and times them against cuBLAS."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from serving.engine import gemv
from tests.server import ROOT

INTERPRETER = ROOT / ".venv" / "triton-interpreter"


def test_the_kernels_give_what_f_linear_gives_under_tritons_interpreter():
    assert INTERPRETER.is_dir(), f"{INTERPRETER} is missing: `make install` puts Triton's interpreter there"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{INTERPRETER}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "triton_interpreted.py")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("ok"), done.stdout[-3000:] + done.stderr[-3000:]


def test_nothing_is_installed_where_there_are_no_kernels():
    model = nn.Sequential(nn.Linear(8, 4))
    assert gemv.install(model) == 0
    assert "forward" not in vars(model[0])
    x = torch.randn(1, 8)
    assert torch.equal(gemv.linear(x, model[0].weight, model[0].bias), F.linear(x, model[0].weight, model[0].bias))


@pytest.mark.parametrize("device, dtype, env, reason", [
    ("cpu", torch.float16, {}, "Triton is not installed" if gemv.triton is None else "no kernels for cpu"),
    ("cuda", torch.float16, {"TPSERVE_GEMV": "cublas"}, "TPSERVE_GEMV=cublas"),
])
def test_the_reason_for_cublas_is_named(monkeypatch, device, dtype, env, reason):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert gemv.unavailable(torch.device(device), dtype) == reason


def test_the_op_gives_the_shape_and_dtype_of_f_linear_to_the_compiler():
    with FakeTensorMode():
        x = torch.empty(1, 3, 64, dtype=torch.float16)
        out = torch.ops.tpserve.linear(x, torch.empty(96, 64, dtype=torch.float16), None)
    assert out.shape == (1, 3, 96) and out.dtype == torch.float16
