"""A tensor-parallel decoder layer's residual stream: each all-reduce, the residual add after it and the RMSNorm
that follows, in one kernel (issue 8).

At TP > 1 each half of a Llama decoder layer ends in `residual + all_reduce(partial)` (DeepSpeed AutoTP's
row-parallel o_proj and down_proj), and the sum then goes through an RMSNorm: post_attention_layernorm after
attention, the next layer's input_layernorm (or the model's final norm) after the MLP. Compiled
(runner.compile), Inductor fuses each add with its norm, but not with the all-reduce, an opaque op, and not
across layers (each layer compiles apart): a decode step of one row runs three small kernels a layer more than
it needs, and at TP=2 such kernels and the gaps between them were a third of the step (BENCHMARKS.md).

Here each layer's forward is replaced, on the instance, by the same computation in which o_proj and down_proj
return their rank's partial product, and tpserve::all_reduce_add_rms_norm (allreduce.py) reduces it together
with the add and the norm that follows, in the one-shot kernel. Between layers the stream travels packed: one
[..., 2H] tensor holding h and the next norm's output side by side, so the next layer starts from both. The
first layer takes the embeddings (H wide) and normalises them itself; the last one's norm is the model's final
norm, whose forward then takes the normed half. That is for steps of up to allreduce.GRID rows; larger steps
(prompts) reduce, add and normalise as before, which Inductor fuses, since there the kernels are few and long.

Only models whose every layer is of a class known to compute exactly this (LAYERS: transformers' Llama-family
layers, with their own RMSNorm) are changed, and only where both projections reduce through
tpserve::all_reduce without a bias. The sums round where the unchanged layers round (after the all-reduce,
after the add), so the tokens are the same.

    install(model)    the changed layers' count (0 at TP=1, or with TPSERVE_FUSED_RESIDUAL=0 for A/B benchmarks)
"""
import logging
import math
import os
import types

import torch
from torch import nn

from serving.engine import allreduce

log = logging.getLogger("tpserve.engine.residual")

LAYERS = {"LlamaDecoderLayer": "LlamaRMSNorm", "MistralDecoderLayer": "MistralRMSNorm",
          "Qwen2DecoderLayer": "Qwen2RMSNorm"}


def install(model: nn.Module) -> int:
    """Change the decoder layers of `model` if every one's reductions can join their residual adds (after
    allreduce.install, which sets up the one-shot path); returns how many changed."""
    if os.environ.get("TPSERVE_FUSED_RESIDUAL", "1") == "0":
        return 0
    found = _stack(model)
    if found is None:
        return 0
    base, layers = found
    groups = [_fusable(layer) for layer in layers]
    if None in groups or len(set(groups)) != 1:
        return 0
    group = groups[0]
    device = layers[0].self_attn.o_proj.weight.device
    fused_rows = allreduce.rows_limit(group, device)  # 0 where the group reduces over NCCL, or on CPU
    for index, layer in enumerate(layers):
        for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
            projection._tpserve_partial = True
        layer._tpserve_group_name = group
        layer._tpserve_fused_rows = fused_rows
        # the norm after this layer, in a list (as fuse.FusedPart holds its parent: not a submodule here)
        layer._tpserve_next_norm = [layers[index + 1].input_layernorm if index + 1 < len(layers) else base.norm]
        layer.forward = types.MethodType(_forward, layer)
    base.norm.forward = types.MethodType(_final_norm, base.norm)
    log.info("%d decoder layers reduce with their residual add and the norm after it in one kernel, for steps "
             "of up to %d rows", len(layers), fused_rows)
    return len(layers)


def _stack(model: nn.Module) -> tuple[nn.Module, nn.ModuleList] | None:
    """The module holding the decoder layers (`layers`) and the final norm (`norm`), and its layers."""
    for module in model.modules():
        layers, norm = getattr(module, "layers", None), getattr(module, "norm", None)
        if (isinstance(layers, nn.ModuleList) and len(layers) > 0 and type(layers[0]).__name__ in LAYERS
                and type(norm).__name__ == LAYERS[type(layers[0]).__name__] and "forward" not in vars(norm)
                and norm.weight.dtype == layers[0].self_attn.o_proj.weight.dtype):
            return module, layers
    return None


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
    if any(norm.weight.dtype != o_proj.weight.dtype for norm in norms):  # the kernel's norm is in the stream's dtype
        return None
    return groups.pop()


def _forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """The Llama decoder layer's forward, with o_proj and down_proj partial (allreduce._reduced_forward) and
    their reductions joined to the residual adds and the norms after them, for steps the one-shot kernel takes.
    Takes and returns the packed stream [h | normed h] there; the embeddings or plain h otherwise."""
    size = self.post_attention_layernorm.weight.shape[-1]
    if hidden_states.shape[-1] == 2 * size:  # packed by the layer before
        residual, hidden_states = hidden_states[..., :size], hidden_states[..., size:]
    else:
        residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
    partial, _ = self.self_attn(hidden_states=hidden_states, **kwargs)
    group, norm, following = self._tpserve_group_name, self.post_attention_layernorm, self._tpserve_next_norm[0]
    if math.prod(partial.shape[:-1]) <= self._tpserve_fused_rows:
        packed = torch.ops.tpserve.all_reduce_add_rms_norm(partial, residual, norm.weight, norm.variance_epsilon,
                                                           group)
        partial = self.mlp(packed[..., size:])
        return torch.ops.tpserve.all_reduce_add_rms_norm(partial, packed[..., :size], following.weight,
                                                         following.variance_epsilon, group)
    residual = residual + torch.ops.tpserve.all_reduce(partial, group)
    partial = self.mlp(norm(residual))
    return residual + torch.ops.tpserve.all_reduce(partial, group)


def _final_norm(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The model's final norm: the last layer already normalised a packed stream; plain h as the class does."""
    size = self.weight.shape[-1]
    if hidden_states.shape[-1] == 2 * size:
        return hidden_states[..., size:]
    return type(self).forward(self, hidden_states)
