"""The tensor-parallel all-reduce of a decode step, one-shot over symmetric memory (issue 13).

At TP=2 and TP=4 every decode step of a Llama-2-7B-shaped model runs 64 all-reduces (after o_proj and after
down_proj of each layer, in DeepSpeed AutoTP's `LinearAllreduce`) of one token's hidden state per row: 8 KB at
batch 1. Inside a CUDA graph one NCCL all-reduce of that costs 20-28 us, a quarter to a third of the step.
For messages this small the time is latency, not bandwidth, so a one-shot all-reduce wins: every rank puts its
input where its peers can read it (NVLink, through torch's symmetric memory), waits until every peer has done
the same, then reads all peers' inputs and sums them itself. torch's own `symm_mem.one_shot_all_reduce` has no
fp16, hence this Triton kernel (fp16, bf16 and fp32).

    install(model)                 every AutoTP LinearAllreduce of `model` reduces through tpserve::all_reduce
    torch.ops.tpserve.all_reduce   the op: functional, one opaque kernel to Inductor, capturable in CUDA graphs
    torch.ops.tpserve.all_reduce_add_rms_norm
                                   the all-reduce with the decoder layer's residual add and the RMSNorm after it
                                   in the same kernel, for up to 128 rows (residual.py): at TP > 1, three
                                   Inductor kernels a layer fewer

The op takes the one-shot kernel on CUDA tensors of at most TPSERVE_ALLREDUCE_MAX_BYTES (default 1 MiB:
128 rows of hidden 4096 in fp16) and NCCL (`torch.distributed.all_reduce` on a copy) for anything larger
(prefill) or wherever symmetric memory could not be set up. On CPU it reduces as DeepSpeed itself would.

Environment:
    TPSERVE_ALLREDUCE=nccl           never set up symmetric memory: every all-reduce over NCCL (A/B benchmarks)
    TPSERVE_ALLREDUCE_MAX_BYTES=N    the largest message (bytes) taken by the one-shot kernel; also the size of
                                     each of the two symmetric buffers per rank

The kernel, per block of the grid (block b always owns the same byte ranges of the buffers, whatever the
dtype or size of the message, so only block b ever writes or reads them):
  1. read this block's call counter n (device memory, one per block) and use data slot n % 2;
  2. copy its chunks of the input into its own rank's slot;
  3. barrier: store n + 1 into flag [b, own rank] of every peer (release, system scope), then spin until all
     of its own flags [b, peer] have reached n + 1 (acquire, system scope); counters only grow, compared
     modulo 2**32, so flags are never reset;
  4. read its chunks from every rank's slot, rank 0 first, summing in fp32: every rank does the same sums in
     the same order, so all ranks get bit-identical results (greedy tokens must agree across ranks).
Two slots make an end barrier unnecessary: before a rank writes slot s again (call n + 2 of block b) it has
passed call n + 1's barrier, so every peer had started call n + 1 and, kernels on a stream being in order,
had finished reading call n's slot s (with programmatic dependent launch, pdl.py, a kernel may start before the
one before it ends, but these kernels wait for every earlier kernel before they touch anything). The slot comes
from the device counter, not from the call site, so any number of calls per step and any number of CUDA graph
replays keep the ranks in step, provided every rank runs the same sequence of all-reduces on one stream (as
tensor parallelism does anyway). No NVLink multicast.
The add-and-norm kernel works the same way in its own region of the buffers, one block per row (a row's RMSNorm
needs all of it): block r owns row r's bytes, at a fixed pitch, whatever the hidden size.
"""
import logging
import os
import sys
import types
import warnings

import torch
import torch.distributed as dist
from torch import nn

from serving.engine import gemv, pdl

try:  # CPU builds of torch come without Triton; the op then takes the NCCL/gloo path
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    triton = None

log = logging.getLogger("tpserve.engine.allreduce")

MAX_BYTES = 1024 * 1024  # 128 rows of hidden 4096 in fp16: one-shot beat NCCL there too (bench.allreduce, H200s)
CHUNK_BYTES = 2048  # one block's chunk: 128 threads x 16 bytes (num_warps 4)
# blocks per call at most (chunk c goes to block c % GRID); a block waits for the same block of every peer, so
# all of them should be resident at once: 128 blocks of 128 threads are, on any H100 or H200
GRID = 128
MAX_WORLD = 8  # the kernel takes up to eight peers' buffers as separate arguments
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the rows region (all_reduce_add_rms_norm): one block per row, rows at a fixed pitch, so block b always owns the bytes
# of row b whatever the hidden size or dtype; a row of up to 32 KiB (hidden 16384 in fp16), up to GRID rows
ROW_PITCH = 32 * 1024
CHUNKS, ROWS = 0, 1  # the two regions of the symmetric buffer: their own flags, counters and data slots


@torch.library.custom_op("tpserve::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """The sum of `x` over the ranks of the group named `group_name`, as a new contiguous tensor."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    if x.is_cuda:
        one_shot = _one_shot_for(group, x.device)
        if one_shot is not None and one_shot.fits(x):
            return one_shot(x)
    out = x.clone(memory_format=torch.contiguous_format)
    if out.is_cuda:
        dist.all_reduce(out, group=group)
    else:
        _cpu_all_reduce(out, group)
    return out


@all_reduce.register_fake
def _(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("tpserve::all_reduce_add_rms_norm", mutates_args=())
def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            group_name: str) -> torch.Tensor:
    """h = residual + (the sum of `x` [..., H] over the group's ranks), and RMSNorm(h) with `weight` and `eps`,
    as a Llama decoder layer computes them, side by side in one [..., 2H] tensor (h, then the normed h: the
    packed residual stream of residual.py). One kernel where the rows fit the one-shot path; otherwise the
    all-reduce and then the same arithmetic in torch."""
    one_shot = _rows_path(x, residual, group_name)
    if one_shot is not None:
        return one_shot.rows(x, residual, weight, eps)
    h = residual + all_reduce(x, group_name)
    return torch.cat([h, rms_norm(h, weight, eps)], dim=-1)


@all_reduce_add_rms_norm.register_fake
def _(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, group_name: str) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], 2 * x.shape[-1])


def _rows_path(x: torch.Tensor, residual: torch.Tensor, group_name: str) -> "OneShot | None":
    """The one-shot state whose add-and-norm kernel takes these rows, or None."""
    if not x.is_cuda:
        return None
    one_shot = _one_shot_for(dist.distributed_c10d._resolve_process_group(group_name), x.device)
    return one_shot if one_shot is not None and one_shot.fits_rows(x, residual) else None


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, step for step (in fp32, back to h's dtype, then scaled by the weight)."""
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def install(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Make every DeepSpeed `LinearAllreduce` of `model` (of `group` only, if given) reduce through
    tpserve::all_reduce; returns how many were changed. Collective: every rank of the model calls it, since it
    sets up the symmetric buffers. Does nothing where torch.distributed is not initialized or the world is one
    rank.

    Each module keeps its parameters; only its forward is replaced, on the instance, by the same matmul, the op
    and the bias. A bound method rather than a wrapper module: the module stays where AutoTP put it, with its
    class (isinstance checks, state_dict keys, DeepSpeed's own hooks untouched), and Dynamo inlines a forward
    set on the instance like any other. Subclasses with a forward of their own (LinearAllreduceWithReplicated-
    Input, LmHeadLinearAllreduce: they slice their input first) keep it, and so do modules in training mode or
    whose collectives are deferred to DeepSpeed's compile pass."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    try:
        from deepspeed.module_inject.layers import LinearAllreduce
    except ImportError:
        return 0
    changed, paths = 0, {}
    for module in model.modules():
        if not _plain_linear_allreduce(module, LinearAllreduce) or (group is not None and module.mp_group is not group):
            continue
        mp_group = module.mp_group
        module._tpserve_group_name = mp_group.group_name
        module.forward = types.MethodType(_reduced_forward, module)
        changed += 1
        device = module.weight.device
        key = (mp_group.group_name, str(device))
        if key not in paths:  # every rank meets its groups in the same (module) order: prepare is collective
            paths[key] = prepare(mp_group, device)
    if changed:
        log.info("%d LinearAllreduce modules reduce through tpserve::all_reduce: %s", changed,
                 "; ".join(f"group {name} on {device}: {path}" for (name, device), path in paths.items()))
    return changed


def prepare(group: dist.ProcessGroup, device: torch.device, max_bytes: int | None = None) -> str:
    """Set up the one-shot path of `group` on `device`, once; returns which path its all-reduces take.
    Collective: every rank of `group` calls it, in the same order."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"no one-shot kernel on {device.type}: DeepSpeed's all-reduce where it is set up, else the group's"
    if device.index is None:
        device = torch.device(device.type, torch.cuda.current_device())
    key = _key(group.group_name, device)
    if key not in _STATES:
        max_bytes = max_bytes or int(os.environ.get("TPSERVE_ALLREDUCE_MAX_BYTES", MAX_BYTES))
        state, reason = _set_up(group, device, max_bytes)
        _STATES[key] = state
        _PATHS[key] = (f"one-shot over symmetric memory up to {max_bytes // 1024} KiB, NCCL above" if state
                       else f"NCCL ({reason})")
    return _PATHS[key]


def rows_limit(group_name: str, device: torch.device) -> int:
    """The most rows the add-and-norm kernel takes for `group_name` on `device` (after prepare): GRID where the
    one-shot path is set up, else 0 (every reduction over NCCL, or on CPU)."""
    return GRID if device.type == "cuda" and _STATES.get(_key(group_name, device)) is not None else 0


def release() -> None:
    """Drop every symmetric buffer (before destroying the process group)."""
    _STATES.clear()
    _PATHS.clear()


def _set_up(group: dist.ProcessGroup, device: torch.device, max_bytes: int) -> tuple["OneShot | None", str | None]:
    """The one-shot path, or None and why not. The ranks agree after every step, so that all of them leave on
    the same path: a rank on the one-shot path whose peer took NCCL would wait for it forever."""
    reason = _unavailable(group, device)
    if not _agree(reason is None, group, device):
        return None, reason or "another rank cannot use symmetric memory"
    state = None
    try:
        state = OneShot(group, device, max_bytes)
    except Exception as error:  # noqa: BLE001 - any failure means NCCL, said in the log line
        reason = f"symmetric memory set-up failed: {type(error).__name__}: {error}"[:300]
    if not _agree(state is not None, group, device):  # also orders every rank's zeroed flags before any signal
        return None, reason or "another rank could not set up symmetric memory"
    try:
        state.check()
    except Exception as error:  # noqa: BLE001
        state, reason = None, f"the one-shot kernel's self-test failed: {type(error).__name__}: {error}"[:300]
    if not _agree(state is not None, group, device):
        return None, reason or "another rank's one-shot self-test failed"
    return state, None


class OneShot:
    """The symmetric buffers of one group on one device, and the kernels that reduce through them.

    Each rank holds one symmetric allocation of two regions, each with its own barrier flags (int32 [GRID,
    world]) and counters: CHUNKS, two data slots of `max_bytes` for all_reduce (block b owns chunks b, b + GRID,
    ...), and ROWS, two data slots of GRID rows at ROW_PITCH for the add-and-norm kernel (block b owns row b).
    Every rank's allocation is mapped into every other's address space (NVLink peers)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.slot_bytes = -(-max_bytes // CHUNK_BYTES) * CHUNK_BYTES
        self.row_slot_bytes = GRID * ROW_PITCH
        flag_bytes = -(-2 * GRID * self.world * 4 // 256) * 256
        total = flag_bytes + 2 * self.slot_bytes + 2 * self.row_slot_bytes
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by older torch, deprecated (a no-op) later
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if not symm_mem.is_symm_mem_enabled_for_group(group.group_name):
                    symm_mem.enable_symm_mem_for_group(group.group_name)
        self.buffer = symm_mem.empty(total, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group.group_name)
        # get_buffer counts from the start of the peer's allocation; where the pool placed this tensor further in,
        # every rank's tensor lies as far in (the allocations are symmetric)
        offset = self.buffer.data_ptr() - self.handle.get_buffer(self.rank, (1,), torch.uint8, 0).data_ptr()
        peers = [self.handle.get_buffer(rank, (total,), torch.uint8, offset) for rank in range(self.world)]
        if peers[self.rank].data_ptr() != self.buffer.data_ptr():
            raise RuntimeError("the symmetric memory handle does not map this rank's own buffer where it lies")
        self.flags = self.buffer[:flag_bytes].view(torch.int32)
        self.flag_addresses = torch.tensor([peer.data_ptr() for peer in peers], dtype=torch.int64, device=device)
        rows_at = flag_bytes + 2 * self.slot_bytes
        self.slots = [peer[flag_bytes:rows_at] for peer in peers]
        self.row_slots = [peer[rows_at:] for peer in peers]
        self.counters = torch.zeros(2, GRID, dtype=torch.int32, device=device)
        self._views: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self.buffer.zero_()  # flags start at 0 on every rank before any rank signals (_set_up agrees after)
        torch.cuda.synchronize(device)

    def check(self) -> None:
        """Two calls (both slots) of each kernel on known values in each dtype: Triton compiles the kernels now
        rather than at the first step (which may be inside a graph capture), and a kernel that cannot run here
        fails here. The add-and-norm kernel is checked against the same arithmetic in torch (rms_norm)."""
        device = self.counters.device
        for dtype in DTYPES:
            for call in range(2):
                x = torch.full((4096,), self.rank + 1 + call, dtype=dtype, device=device)
                expected = sum(rank + 1 + call for rank in range(self.world))
                if not bool((self(x) == expected).all()):
                    raise RuntimeError(f"wrong sums in {dtype} (call {call})")
                rows = 3 + call  # an uneven hidden size: the kernel's masked lanes
                pattern = (torch.arange(rows * 1000, device=device) % 7 - 3).view(rows, 1000).to(dtype)
                residual = torch.linspace(-2, 2, rows * 1000, device=device).view(rows, 1000).to(dtype)
                weight = torch.linspace(0.5, 1.5, 1000, device=device).to(dtype)
                want_h = residual + pattern * sum(rank + 1 for rank in range(self.world))
                h, normed = self.rows(pattern * (self.rank + 1), residual, weight, 1e-5).split(1000, dim=-1)
                if not bool((h == want_h).all()):
                    raise RuntimeError(f"wrong residual sums in {dtype} (call {call})")
                error = (normed.float() - rms_norm(want_h, weight, 1e-5).float()).abs().max().item()
                if error > 3e-2:  # two roundings of values up to ~2 in bf16
                    raise RuntimeError(f"RMSNorm off by {error:.3g} in {dtype} (call {call})")

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype in DTYPES and x.numel() * x.element_size() <= self.slot_bytes

    def fits_rows(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """The add-and-norm kernel takes it: at most GRID rows of at most ROW_PITCH bytes, x and residual alike."""
        hidden = x.shape[-1] if x.dim() else 1
        return (x.dtype in DTYPES and residual.dtype == x.dtype and residual.shape == x.shape and hidden > 0
                and residual.stride(-1) == 1
                and x.numel() // hidden <= GRID and hidden * x.element_size() <= ROW_PITCH)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty_like(x)
        numel = x.numel()
        if numel == 0:
            return out
        peers = self._peers(CHUNKS, x.dtype)
        block = CHUNK_BYTES // x.element_size()
        grid = (min(triton.cdiv(numel, block), GRID),)
        launch = pdl.launch(x.device)
        _one_shot_kernel[grid](x, out, peers[self.rank], *peers, self.flag_addresses, self.flags, self.counters[CHUNKS],
                               numel, self.slot_bytes // x.element_size(), RANK=self.rank, WORLD=self.world,
                               PEERS=triton.next_power_of_2(self.world), BLOCK=block, GRID=GRID, PDL=bool(launch),
                               num_warps=4, **launch)
        return out

    def rows(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """h = residual + the sum of x over the ranks and RMSNorm(h), side by side ([..., 2H]), each rounded to
        x's dtype where the unfused layer rounds. One block per row (fits_rows). `residual` may be a view with
        rows at any stride (the h half of a packed stream)."""
        hidden = x.shape[-1]
        x = x.contiguous()
        res = residual.reshape(-1, hidden)
        if res.stride(-1) != 1:
            res = res.contiguous()
        out = x.new_empty(*x.shape[:-1], 2 * hidden)
        rows = x.numel() // hidden
        if rows == 0:
            return out
        peers = self._peers(ROWS, x.dtype)
        launch = pdl.launch(x.device)
        block_h = triton.next_power_of_2(hidden)
        _one_shot_rows_kernel[(rows,)](
            x, res, res.stride(0), weight, out, peers[self.rank], *peers,
            self.flag_addresses, self.flags, self.counters[ROWS], hidden, eps, ROW_PITCH // x.element_size(),
            self.row_slot_bytes // x.element_size(), RANK=self.rank, WORLD=self.world,
            PEERS=triton.next_power_of_2(self.world), BLOCK_H=block_h, GRID=GRID,
            PDL=bool(launch), num_warps=4 if block_h <= 4096 else 8, **launch)
        return out

    def _peers(self, region: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every rank's data slots of `region` as `dtype`, in rank order, padded to the kernels' MAX_WORLD
        arguments with this rank's (never read)."""
        peers = self._views.get((region, dtype))
        if peers is None:
            slots = self.slots if region == CHUNKS else self.row_slots
            peers = [slot.view(dtype) for slot in slots]
            peers = self._views[(region, dtype)] = peers + [peers[self.rank]] * (MAX_WORLD - self.world)
        return peers


_STATES: dict[tuple[str, int], OneShot | None] = {}
_PATHS: dict[tuple[str, int], str] = {}


def _key(group_name: str, device: torch.device) -> tuple[str, int]:
    """A group's one-shot state on a CUDA device (the current one where the device names no index)."""
    return group_name, device.index if device.index is not None else torch.cuda.current_device()


def _one_shot_for(group: dist.ProcessGroup, device: torch.device) -> OneShot | None:
    key = _key(group.group_name, device)
    if key not in _STATES:
        if torch.cuda.is_current_stream_capturing():  # no collective set-up inside a capture: NCCL is captured
            return None
        log.info("all-reduce of group %s: %s", group.group_name, prepare(group, device))
    return _STATES[key]


def _unavailable(group: dist.ProcessGroup, device: torch.device) -> str | None:
    """Why this rank cannot take the one-shot path, or None."""
    if os.environ.get("TPSERVE_ALLREDUCE", "").lower() == "nccl":
        return "TPSERVE_ALLREDUCE=nccl"
    if triton is None:
        return "Triton is not installed"
    if not 2 <= dist.get_world_size(group) <= MAX_WORLD:
        return f"the kernel takes 2 to {MAX_WORLD} ranks, not {dist.get_world_size(group)}"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as error:
        return f"no symmetric memory in this torch: {error}"
    return None


def _agree(ok: bool, group: dist.ProcessGroup, device: torch.device) -> bool:
    """True where every rank of `group` says ok."""
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def _cpu_all_reduce(out: torch.Tensor, group: dist.ProcessGroup) -> None:
    """In place, as the unchanged LinearAllreduce would: DeepSpeed's shared-memory all-reduce where DeepSpeed's
    communication is set up (faster than gloo, and the same numbers as before install), else the group's."""
    comm = sys.modules.get("deepspeed.comm")
    if comm is not None and comm.is_initialized():
        comm.inference_all_reduce(out, group=group)
    else:
        dist.all_reduce(out, group=group)


def _plain_linear_allreduce(module: nn.Module, base: type) -> bool:
    """A LinearAllreduce whose forward is the base class's (matmul, all-reduce, bias), reducing over >1 rank,
    in inference (older DeepSpeed releases have no training mode and no deferred collectives)."""
    if not isinstance(module, base) or type(module).forward is not base.forward or "forward" in vars(module):
        return False
    training = getattr(module, "is_training_mode", None)
    if (training is not None and training()) or getattr(module, "defer_collectives_to_compiler", False):
        return False
    return module.mp_group is not None and dist.get_world_size(module.mp_group) > 1


def _reduced_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """LinearAllreduce.forward with tpserve::all_reduce for DeepSpeed's RowParallel step (and the streaming
    kernels for few rows, gemv.py). A module whose decoder layer reduces its output itself, together with the
    residual add (residual.py), returns this rank's partial product."""
    output = gemv.linear(input, self.weight)
    if getattr(self, "_tpserve_partial", False):
        return output
    output = torch.ops.tpserve.all_reduce(output, self._tpserve_group_name)
    if self.bias is not None:
        output = output + self.bias
    return output


if triton is not None:
    @triton.jit
    def _read(slot, offsets, mask):
        """One rank's values, in fp32. .cg: from L2 or the peer, never a line this SM's L1 kept from an earlier
        call (the acquire already orders these reads; this costs nothing, each value is read once)."""
        return tl.load(slot + offsets, mask=mask, cache_modifier=".cg").to(tl.float32)

    @triton.jit
    def _barrier(flag_addresses, flags, slot, epoch, RANK: tl.constexpr, WORLD: tl.constexpr, PEERS: tl.constexpr):
        """Flag `slot` (region and block) of every rank: store epoch into this rank's flag on every peer
        (release), then spin until every peer's flag here has reached it (acquire). bar.sync first, so that the
        release covers every thread's copy; bar.sync after the acquire, so that every thread's reads come after."""
        tl.debug_barrier()
        peers = tl.arange(0, PEERS)
        present = peers < WORLD
        theirs = tl.load(flag_addresses + peers, mask=present, other=0) + (slot * WORLD + RANK) * 4
        tl.atomic_xchg(theirs.to(tl.pointer_type(tl.int32)), tl.zeros([PEERS], tl.int32) + epoch, mask=present,
                       sem="release", scope="sys")
        waiting = 1
        while waiting > 0:  # counters wrap at 2**31: compare their difference
            seen = tl.atomic_add(flags + slot * WORLD + peers, 0, mask=present, sem="acquire", scope="sys")
            waiting = tl.sum((present & (seen - epoch < 0)).to(tl.int32), axis=0)
        tl.debug_barrier()

    @triton.jit
    def _sum_of(p0, p1, p2, p3, p4, p5, p6, p7, offsets, mask, WORLD: tl.constexpr):
        """Every rank's values at `offsets`, summed in fp32 in rank order (the same sums on every rank)."""
        total = _read(p0, offsets, mask)
        total += _read(p1, offsets, mask)
        if WORLD > 2:
            total += _read(p2, offsets, mask)
        if WORLD > 3:
            total += _read(p3, offsets, mask)
        if WORLD > 4:
            total += _read(p4, offsets, mask)
        if WORLD > 5:
            total += _read(p5, offsets, mask)
        if WORLD > 6:
            total += _read(p6, offsets, mask)
        if WORLD > 7:
            total += _read(p7, offsets, mask)
        return total

    @triton.jit
    def _one_shot_kernel(x, out, mine, p0, p1, p2, p3, p4, p5, p6, p7, flag_addresses, flags, counters, numel,
                         slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr, PEERS: tl.constexpr,
                         BLOCK: tl.constexpr, GRID: tl.constexpr, PDL: tl.constexpr):
        """out = the sum over ranks of x. `mine` and p0..p7 are the CHUNKS region's data slots (two of
        `slot_elems` each): this rank's, and every rank's in rank order; flags is this rank's [2, GRID, WORLD]
        int32, flag_addresses every rank's flags' address."""
        if PDL:  # nothing read ahead: everything here is written by earlier kernels (pdl.py)
            gdc_wait()
            gdc_launch_dependents()
        block = tl.program_id(0)
        count = tl.load(counters + block)
        epoch = count + 1
        base = (count & 1).to(tl.int64) * slot_elems
        chunks = tl.cdiv(numel, BLOCK)
        lanes = tl.arange(0, BLOCK)
        for chunk in range(block, chunks, GRID):
            offsets = chunk * BLOCK + lanes
            mask = offsets < numel
            tl.store(mine + base + offsets, tl.load(x + offsets, mask=mask), mask=mask)
        tl.store(counters + block, epoch)
        _barrier(flag_addresses, flags, block, epoch, RANK, WORLD, PEERS)
        for chunk in range(block, chunks, GRID):
            offsets = base + chunk * BLOCK + lanes
            mask = chunk * BLOCK + lanes < numel
            total = _sum_of(p0, p1, p2, p3, p4, p5, p6, p7, offsets, mask, WORLD)
            tl.store(out + chunk * BLOCK + lanes, total.to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _one_shot_rows_kernel(x, residual, residual_stride, weight, out, mine, p0, p1, p2, p3, p4, p5, p6, p7,
                              flag_addresses, flags, counters, hidden, eps, pitch, slot_elems, RANK: tl.constexpr,
                              WORLD: tl.constexpr, PEERS: tl.constexpr, BLOCK_H: tl.constexpr, GRID: tl.constexpr,
                              PDL: tl.constexpr):
        """Row r (block r): h = residual + the sum over ranks of x, rounded to the dtype after the sum (the
        all-reduce's output) and after the add (the residual stream), then RMSNorm(h) * weight as transformers'
        LlamaRMSNorm computes it: both into out's row r ([rows, 2 * hidden]), h first. The ROWS region's slots
        hold row r at r * pitch."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()
        row = tl.program_id(0)
        count = tl.load(counters + row)
        epoch = count + 1
        base = (count & 1).to(tl.int64) * slot_elems + row * pitch
        cols = tl.arange(0, BLOCK_H)
        mask = cols < hidden
        at = row.to(tl.int64) * hidden + cols
        into = row.to(tl.int64) * 2 * hidden + cols
        tl.store(mine + base + cols, tl.load(x + at, mask=mask), mask=mask)
        tl.store(counters + row, epoch)
        _barrier(flag_addresses, flags, GRID + row, epoch, RANK, WORLD, PEERS)
        reduced = _sum_of(p0, p1, p2, p3, p4, p5, p6, p7, base + cols, mask, WORLD).to(out.dtype.element_ty)
        h = tl.load(residual + row.to(tl.int64) * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = (h + reduced.to(tl.float32)).to(out.dtype.element_ty)
        tl.store(out + into, h, mask=mask)
        hf = h.to(tl.float32)
        variance = tl.sum(hf * hf, axis=0) / hidden
        normed = (hf * tl.rsqrt(variance + eps)).to(out.dtype.element_ty)
        w = tl.load(weight + cols, mask=mask, other=0.0)
        tl.store(out + into + hidden, (w.to(tl.float32) * normed.to(tl.float32)).to(out.dtype.element_ty), mask=mask)
