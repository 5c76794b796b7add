"""The engine's KV memory: one slot per running row, each `max_len` tokens long, allocated once.

Per layer, K and V are [slots + 1, max_len, kv_heads, head_dim] in the model's dtype: token-major, so the
whole cache is also one [(slots + 1) * max_len, kv_heads, head_dim] table in which a slot is a run of rows
(the layout flash attention's variable-length kernel reads, attention.py). A row owns its slot from admission
to its end, so nothing is copied or compacted while it runs; each row has its own length, and attention reads
a row only up to its own length. The extra slot at the end, `scratch`, belongs to no row: the padding tokens of
a captured step (graphs.py) write and read there. The head count is the rank's own share under tensor
parallelism (which can differ between ranks when heads do not split evenly), so the tensors are created at the
first forward, the engine's warm-up step, when each layer first shows its key shape.

Each layer's K and V live on its attention module, as one non-persistent buffer [2, slots + 1, max_len, kv_heads,
head_dim]: the compiler (runner.compile) compiles one decoder layer and reuses it for every layer, which works
only if a layer finds its cache through itself (a buffer is an input of the compiled layer), not through its
index into a table (a constant that would differ per layer).
"""
import logging

import numpy as np
import torch

log = logging.getLogger("tpserve.engine.kv_cache")


BUFFER = "tpserve_kv"


class SlotCache:
    def __init__(self, slots: int, max_len: int, model: torch.nn.Module):
        self.slots = slots
        self.max_len = max_len
        self.layers: list[torch.Tensor] = []
        for module in model.modules():  # a cache an earlier engine left on the same model
            if BUFFER in module._buffers:
                del module._buffers[BUFFER]

    @property
    def scratch(self) -> int:
        """The slot no row owns (padding tokens of captured steps)."""
        return self.slots

    @property
    def tokens(self) -> int:
        """Tokens the cache holds in all, every slot full."""
        return self.slots * self.max_len

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def layer(self, module: torch.nn.Module, like: torch.Tensor) -> torch.Tensor:
        """K and V of an attention module, [2, slots + 1, max_len, kv_heads, head_dim], made at its first call;
        `like` is that layer's new keys, [1, kv_heads, tokens, head_dim]."""
        kv = getattr(module, BUFFER, None)
        if kv is None:
            kv = zeros((2, self.slots + 1, self.max_len, like.shape[1], like.shape[3]), like.dtype, like.device)
            module.register_buffer(BUFFER, kv, persistent=False)
            self.layers.append(kv)
        return kv


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed memory (masked-out keys and values are read, and must not be NaN). On a CPU, through numpy's
    calloc: the pages come from the kernel already zero, only when first written, so a large budget costs memory
    only as rows fill it (torch.zeros writes every page: 40 s for 8 GB on the development box)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.finfo(dtype).bits // 8
    raw = np.zeros(int(np.prod(shape)) * itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


def bytes_per_token(config, tp: int, dtype: torch.dtype) -> int:
    """KV bytes one token costs on the rank with the largest share of key/value heads."""
    text = getattr(config, "text_config", config)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    local_kv_heads = -(-kv_heads // tp)
    return 2 * text.num_hidden_layers * local_kv_heads * head_dim * torch.finfo(dtype).bits // 8


def plan_slots(wanted_slots: int, max_len: int, budget_tokens: int | None) -> int:
    """Slots that fit the KV budget (tokens), at most `wanted_slots`, at least one."""
    if budget_tokens is None:
        return wanted_slots
    fitting = budget_tokens // max_len
    if fitting < 1:
        raise ValueError(f"the KV cache budget of {budget_tokens} tokens cannot hold one sequence of "
                         f"option.max_model_len={max_len} tokens: lower option.max_model_len or raise the budget")
    if fitting < wanted_slots:
        log.warning("KV budget of %d tokens holds %d rows of %d tokens, fewer than option.max_rolling_batch_size="
                    "%d", budget_tokens, fitting, max_len, wanted_slots)
    return min(wanted_slots, fitting)
