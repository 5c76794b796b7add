"""A tensor-parallel decoder layer's residual stream: each all-reduce, the residual add after it, and the RMSNorm
after attention, in one kernel (issue 8).

At TP > 1 each half of a Llama decoder layer ends in `residual + all_reduce(partial)` (DeepSpeed AutoTP's
row-parallel o_proj and down_proj), and the attention half's sum then goes through post_attention_layernorm.
Compiled (runner.compile), Inductor fuses the add with the norm, but not with the all-reduce, an opaque op: a
decode step of one row runs two small kernels a layer more than it needs, and at TP=2 such kernels and the gaps
between them are a third of the step (BENCHMARKS.md). Here the layer's forward is replaced, on the instance, by
the same computation in which o_proj and down_proj return their rank's partial product, and
tpserve::all_reduce_add_rms_norm and tpserve::all_reduce_add (allreduce.py) reduce it together with the add and
the norm, in the one-shot kernel, for steps of up to allreduce.GRID rows. Larger steps (prompts) reduce, add
and normalise as before, which Inductor fuses, since there the kernels are few and long.

Only layer classes known to compute exactly this (LAYERS, transformers' Llama-family layers, with their own
RMSNorm) are changed, and only where both projections reduce through tpserve::all_reduce without a bias. The
sums round where the unchanged layer rounds (after the all-reduce, after the add), so the tokens are the same.

    install(model)    the changed layers' count (0 at TP=1, or with TPSERVE_FUSED_RESIDUAL=0 for A/B benchmarks)
"""
import logging
import os
import types

import torch
from torch import nn

from serving.engine import allreduce

log = logging.getLogger("tpserve.engine.residual")

LAYERS = {"LlamaDecoderLayer": "LlamaRMSNorm", "MistralDecoderLayer": "MistralRMSNorm",
          "Qwen2DecoderLayer": "Qwen2RMSNorm"}


def install(model: nn.Module) -> int:
    """Change every decoder layer of `model` whose reductions can join their residual adds (after
    allreduce.install, which sets up the one-shot path); returns how many changed."""
    if os.environ.get("TPSERVE_FUSED_RESIDUAL", "1") == "0":
        return 0
    changed, fused_rows = 0, 0
    for layer in model.modules():
        group = _fusable(layer)
        if group is None:
            continue
        for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
            projection._tpserve_partial = True
        layer._tpserve_group_name = group
        # one-shot kernels for steps of up to this many rows; 0 where the group reduces over NCCL or on CPU
        layer._tpserve_fused_rows = fused_rows = allreduce.rows_limit(group, layer.self_attn.o_proj.weight.device)
        layer.forward = types.MethodType(_forward, layer)
        changed += 1
    if changed:
        log.info("%d decoder layers reduce with their residual add and norm in one kernel for steps of up to %d "
                 "rows", changed, fused_rows)
    return changed


def _fusable(layer: nn.Module) -> str | None:
    """The group name the layer's projections reduce over, if the layer can be changed."""
    norm_class = LAYERS.get(type(layer).__name__)
    if norm_class is None or not type(layer).__module__.startswith("transformers.") or "forward" in vars(layer):
        return None
    o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
    down_proj = getattr(getattr(layer, "mlp", None), "down_proj", None)
    norms = [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
    if any(type(norm).__name__ != norm_class or not hasattr(norm, "variance_epsilon") for norm in norms):
        return None
    groups = {getattr(projection, "_tpserve_group_name", None) for projection in (o_proj, down_proj)}
    if len(groups) != 1 or None in groups or o_proj.bias is not None or down_proj.bias is not None:
        return None
    if norms[1].weight.dtype != o_proj.weight.dtype:  # the kernel's norm is in the stream's dtype
        return None
    return groups.pop()


def _forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """The Llama decoder layer's forward, with o_proj and down_proj partial (allreduce._reduced_forward) and
    their reductions joined to the residual adds for steps the one-shot kernel takes."""
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    partial, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    norm = self.post_attention_layernorm
    if partial.numel() <= self._tpserve_fused_rows * partial.shape[-1]:
        residual, hidden_states = torch.ops.tpserve.all_reduce_add_rms_norm(
            partial, residual, norm.weight, norm.variance_epsilon, self._tpserve_group_name)
        return torch.ops.tpserve.all_reduce_add(self.mlp(hidden_states), residual, self._tpserve_group_name)
    residual = residual + torch.ops.tpserve.all_reduce(partial, self._tpserve_group_name)
    partial = self.mlp(norm(residual))
    return residual + torch.ops.tpserve.all_reduce(partial, self._tpserve_group_name)
