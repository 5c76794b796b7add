"""Projections of the same input fused into one matmul: q, k and v of each attention layer, gate and up of each
MLP.

At small batches a decoder layer's projections are matrix-vector products that read the weights once each;
cuBLAS reaches far less of the memory bandwidth on one 4096 x 4096 weight than on one three times as wide, and
every separate product is one more kernel. The model's code is left as it is (transformers calls q_proj, k_proj
and v_proj one after another on the same hidden states), so each projection becomes a view of one fused
product: the first of a group to be called with an input computes the whole product, the others take their
columns of it. The fused weight replaces the separate ones (no extra memory).

A gated MLP of transformers' Llama family (`down_proj(silu(gate_proj(x)) * up_proj(x))`) goes further: its gate
and up rows are interleaved into one weight, and its forward becomes `down_proj(gemv.linear_silu_mul(x, weight))`,
whose kernels apply silu(gate) * up to each pair of outputs before they leave the registers (gemv.py): no
[..., 2 x intermediate] product in memory and no kernel of its own for the activation.

Works on plain nn.Linear and on DeepSpeed AutoTP's column-parallel LinearLayer (whose forward is a plain matmul
of the rank's shard: its ColumnParallel step is an identity outside autograd). Anything else is left alone.
"""
import logging
import types

import torch
from torch import nn

from serving.engine import gemv

log = logging.getLogger("tpserve.engine.fuse")
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)), and the SiLU activations
SILU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
SILUS = ("SiLUActivation", "SiLU")


class FusedLinear(nn.Module):
    """One matmul for several projections of the same input."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([part.weight for part in parts]), requires_grad=False)
            biases = [part.bias for part in parts]
            self.bias = (nn.Parameter(torch.cat(biases), requires_grad=False) if biases[0] is not None else None)
        self.sizes = [part.weight.shape[0] for part in parts]
        self._input = None
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._taken = 0

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input:
            self._input, self._taken = x, 0
            self._outputs = gemv.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        out = self._outputs[index]
        self._taken += 1
        if self._taken == len(self.sizes):  # every part has its columns: hold nothing until the next input
            self._input, self._outputs = None, ()
        return out


class FusedPart(nn.Module):
    """What stands where one of the fused projections was."""

    def __init__(self, fused: FusedLinear, index: int, in_features: int):
        super().__init__()
        self.fused = [fused]  # a list, so the fused weight is registered once, on the parent
        self.index = index
        self.in_features, self.out_features = in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].part(self.index, x)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group found; returns how many were fused."""
    fused = 0
    for module in list(model.modules()):
        if _silu_mlp(module):
            _fuse_silu_mlp(module)
            fused += 1
            continue
        for names in GROUPS:
            parts = [getattr(module, name, None) for name in names]
            if not all(_plain_linear(part) for part in parts):
                continue
            weights = [part.weight for part in parts]
            if (len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1
                    or len({part.bias is None for part in parts}) != 1):
                continue
            group = FusedLinear(parts)
            setattr(module, "_fused_" + "_".join(names), group)
            for index, name in enumerate(names):
                setattr(module, name, FusedPart(group, index, weights[0].shape[1]))
            fused += 1
    if fused:
        log.info("fused %d groups of projections (q/k/v; gate/up, with SiLU where the MLP is Llama's) into one "
                 "matmul each", fused)
    return fused


def _silu_mlp(module: nn.Module) -> bool:
    if type(module).__name__ not in SILU_MLPS or not type(module).__module__.startswith("transformers."):
        return False
    if "forward" in vars(module) or type(getattr(module, "act_fn", None)).__name__ not in SILUS:
        return False
    gate, up = getattr(module, "gate_proj", None), getattr(module, "up_proj", None)
    return (_plain_linear(gate) and _plain_linear(up) and getattr(module, "down_proj", None) is not None
            and gate.bias is None and up.bias is None and gate.weight.shape == up.weight.shape
            and gate.weight.dtype == up.weight.dtype and gate.weight.device == up.weight.device)


def _fuse_silu_mlp(module: nn.Module) -> None:
    """gate and up rows interleaved into one weight (no extra memory: the separate ones go), and the forward that
    takes silu(gate) * up from it."""
    gate, up = module.gate_proj.weight, module.up_proj.weight
    with torch.no_grad():
        module.gate_up_weight = nn.Parameter(torch.stack([gate, up], dim=1).reshape(-1, gate.shape[1]),
                                             requires_grad=False)
    del module.gate_proj, module.up_proj
    module.forward = types.MethodType(_silu_mlp_forward, module)


def _silu_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(gemv.linear_silu_mul(x, self.gate_up_weight))


def _plain_linear(module) -> bool:
    if type(module) is nn.Linear:
        return True
    # DeepSpeed AutoTP's column-parallel layer, in its plain form (no output gather, no overlapped comm)
    return (type(module).__name__ == "LinearLayer" and type(module).__module__.startswith("deepspeed")
            and not getattr(module, "gather_output", False) and not getattr(type(module), "tp_overlap_comm", False)
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)
