"""Loading a causal LM and its tokenizer from what option.model_id names: a Hugging Face folder, a hub id,
a single .gguf file, or a folder of pre-sharded tensor-parallel checkpoints (`tpserve shard`)."""
import logging
import time
from pathlib import Path

import torch

from serving.shard import check_manifest, read_manifest, write_shards

log = logging.getLogger("tpserve.handlers.loading")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def load_tokenizer(model_id: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source, extra = _source(model_id)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    tokenizer.padding_side = "left"  # decoder-only batches are padded on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_id: str, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    source, extra = _source(model_id)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if "gguf_file" in extra:
        model = dequantized_copy(model, dtype)
    return model.eval()


def dequantized_copy(gguf_model, dtype: torch.dtype):
    """transformers dequantises GGUF weights on load but still flags the model as quantised, which makes
    save_pretrained and the dtype casts DeepSpeed does refuse it. A fresh model with the same weights is plain."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model


def _source(model_id: str) -> tuple[str, dict]:
    path = Path(model_id)
    if path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    return model_id, {}


# --- the rank's model, as the built-in handler gets it ----------------------------------------------------
def load_rank_model(properties: dict[str, str], dtype: torch.dtype):
    """This rank's part of the model, ready for generate(): from a shard folder when option.model_id is one,
    else from the original checkpoint split by DeepSpeed AutoTP (engine=Python: the whole model on this
    process's device). With option.save_mp_checkpoint_path (DJL's key), the shards are written after loading.
    Collective under engine=DeepSpeed/MPI: every rank calls it."""
    model_id = properties.get("model_id") or properties["model_dir"]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    started, cpu_started = time.monotonic(), time.process_time()
    sharded = is_sharded(model_id)
    module = _load_rank_model(properties, model_id, dtype, rank, sharded)
    # CPU seconds beside wall seconds: on a shared machine only the former compares loads (bench/shard_load.py)
    log.info("rank%d model ready from %s (%s) in %.2f s, %.2f s CPU", rank, model_id,
             "pre-sharded" if sharded else "original", time.monotonic() - started, time.process_time() - cpu_started)
    if properties.get("save_mp_checkpoint_path") and not sharded:
        out = Path(properties["model_dir"]) / properties["save_mp_checkpoint_path"]  # an absolute path stays
        save_shards(module, str(out), model_id, dtype, int(properties.get("tensor_parallel_degree", 1)), rank)
    return module


def _load_rank_model(properties: dict[str, str], model_id: str, dtype: torch.dtype, rank: int, sharded: bool):
    tp = int(properties.get("tensor_parallel_degree", 1))
    if sharded:
        return load_sharded(model_id, dtype, tp, rank)
    model = load_model(model_id, dtype, properties.get("trust_remote_code", "false") == "true")
    if properties.get("engine", "DeepSpeed") == "Python":
        return model.to(_rank_device())
    import deepspeed
    return deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype,
                                    replace_with_kernel_inject=False).module


# --- tensor-parallel checkpoints -------------------------------------------------------------------------
def is_sharded(model_id: str) -> bool:
    """A folder written by `tpserve shard` (or option.save_mp_checkpoint_path): it has a shard manifest."""
    return read_manifest(Path(model_id)) is not None if Path(model_id).is_dir() else False


def load_sharded(model_dir: str, dtype: torch.dtype, tp: int, rank: int):
    """This rank's AutoTP-sharded module, read from this rank's shard file alone.

    The model is built on the meta device (no memory), DeepSpeed AutoTP shards that empty structure exactly
    as it would shard the real one, and then the rank's tensors are assigned in place of the empty ones:
    the full model never exists in this process. Collective: every rank of the group calls it."""
    import deepspeed
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    started = time.monotonic()
    folder = Path(model_dir)
    manifest = read_manifest(folder)
    check_manifest(folder, manifest, tp)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    module = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype,
                                      replace_with_kernel_inject=False).module
    device = _rank_device()
    state = load_file(str(folder / manifest["files"][rank]), device=str(device))
    for alias, target in manifest.get("aliases", {}).items():
        state[alias] = state[target]
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    for name, saved in buffers.items():  # DeepSpeed's to_empty() left the buffers (rotary tables) uninitialised
        module.get_buffer(name).copy_(saved)
    if manifest.get("aliases"):
        _retie(module, manifest["aliases"])
    log.info("rank %d: loaded shard %s (tp=%d, %s) in %.1f s", rank, manifest["files"][rank], tp,
             manifest["dtype"], time.monotonic() - started)
    return module.eval()


def save_shards(module, out_dir: str, source: str, dtype: torch.dtype, tp: int, rank: int) -> None:
    """DJL's option.save_mp_checkpoint_path: after the first load, every rank writes its shard (once)."""
    if read_manifest(Path(out_dir)) is not None:
        log.info("shards already in %s; not written again", out_dir)
        return
    started = time.monotonic()
    write_shards(module, Path(out_dir), source, dtype, tp, rank)
    log.info("rank %d: wrote its shard to %s in %.1f s (option.save_mp_checkpoint_path)", rank, out_dir,
             time.monotonic() - started)


def _retie(module, aliases: dict[str, str]) -> None:
    """Make aliased parameters (tied embeddings) one parameter again, as they were when saved."""
    params = dict(module.named_parameters(remove_duplicate=False))
    for alias, target in aliases.items():
        if alias in params and target in params:
            owner, _, attr = alias.rpartition(".")
            setattr(module.get_submodule(owner), attr, params[target])


def _rank_device() -> torch.device:
    import os
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")
