"""Host-to-device copies that never wait for the device.

The engine queues the next step's forward before it samples the last one (loop.py), so every copy from the host
made while sampling or planning must not wait for the kernels queued before it. A blocking copy
(`torch.tensor(values, device=cuda)`, `.to(cuda)`) waits for all of them. A non-blocking copy is queued like a
kernel only from pinned memory (from pageable memory CUDA may synchronise with the stream to stage it), and
PyTorch's caching host allocator keeps each pinned buffer until its copy has run. bench.loop_time --sync-debug
shows what still waits.
"""
import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, queued behind the device's work rather than waiting for it."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def device_tensor(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device), without the wait."""
    return to_device(torch.tensor(values, dtype=dtype), device)


def copy_into(buffer: torch.Tensor, tensor: torch.Tensor) -> None:
    """buffer.copy_(tensor) from the host, without the wait (a captured graph's input buffers)."""
    buffer.copy_(tensor.pin_memory() if buffer.is_cuda else tensor, non_blocking=True)
