"""serving/engine/allreduce.py on CPU: the op's fake (meta) registration, install() without a process group, and
two real gloo ranks where install() reroutes DeepSpeed AutoTP's LinearAllreduce through tpserve::all_reduce and
the output stays what DeepSpeed's own all-reduce gave. The one-shot kernel itself needs GPUs:
`torchrun --nproc-per-node N -m bench.allreduce` checks it there."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from serving.engine import allreduce

RANKS = 2
IN_FEATURES, OUT_FEATURES = 16, 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_fake_kernel_gives_a_new_contiguous_tensor_of_the_input_shape_and_dtype(dtype):
    with FakeTensorMode():
        x = torch.empty(4, 3, 64, dtype=dtype).transpose(0, 1)
        out = torch.ops.tpserve.all_reduce(x, "any-group")
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()


def test_install_changes_nothing_without_a_process_group():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert allreduce.install(model) == 0
    assert "forward" not in vars(model[0])


def test_two_gloo_ranks_reduce_through_the_op_with_deepspeeds_result(gloo_pair):
    gloo_pair.run(_rank, timeout=120)


class Layer(nn.Module):
    """What AutoTP leaves of a decoder layer's row-parallel projections: o_proj, and beside it a row-parallel
    head that slices its own input first (a subclass with its own forward, which install must leave alone)."""

    def __init__(self, group):
        from deepspeed.module_inject.layers import LinearAllreduce, LinearAllreduceWithReplicatedInput
        super().__init__()
        self.o_proj = LinearAllreduce(_integer_linear(bias=True), group)
        self.head = LinearAllreduceWithReplicatedInput(_integer_linear(bias=False), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(x)


def _rank(rank: int) -> None:
    """One rank (gloo_ranks sets up DeepSpeed's communication): a layer built as AutoTP builds it (the
    constructor cuts this rank's columns of each weight)."""
    import torch.distributed as dist
    torch.manual_seed(0)  # the same full weights and input on both ranks
    full = _integer_linear(bias=True)
    x = torch.randint(-3, 4, (3, IN_FEATURES)).float()
    torch.manual_seed(0)
    layer = Layer(dist.new_group(list(range(RANKS))))
    shard = x.chunk(RANKS, dim=-1)[rank]  # the input features this rank's o_proj columns take

    before = layer(shard)
    assert allreduce.install(layer) == 1
    assert "forward" in vars(layer.o_proj) and "forward" not in vars(layer.head)
    after = layer(shard)
    assert torch.equal(after, before)  # integer values: any summation order gives the same floats
    assert torch.equal(after, full(x))

    explained = torch._dynamo.explain(layer)(shard)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    assert allreduce.install(layer) == 0  # once is enough: patched modules are not patched again
    # the op's registration as torch checks custom ops: schema, fake against real, autograd, AOT dispatch
    torch.library.opcheck(torch.ops.tpserve.all_reduce.default, (x.t(), layer.o_proj.mp_group.group_name))


def _integer_linear(bias: bool) -> nn.Linear:
    linear = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias)
    with torch.no_grad():
        for parameter in linear.parameters():
            parameter.copy_(torch.randint(-3, 4, parameter.shape))
    return linear
