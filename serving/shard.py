"""Pre-sharded checkpoints: each rank's part of a tensor-parallel model, written once, then loaded directly.

    tpserve shard --model-dir M --tensor-parallel-degree N --out D [--dtype fp16]

M is a model directory (its serving.properties names option.model_id and option.dtype) or a Hugging Face
folder. The command runs `mpirun -np N` ranks that load M exactly as the server does (transformers, then
DeepSpeed AutoTP at tp_size=N), and each rank writes what it ended up holding:

    D/tp-rank-00-of-02.safetensors    rank 0's tensors (AutoTP's slices, plus the replicated ones)
    D/tp-rank-01-of-02.safetensors
    D/tpserve-shards.json             the manifest: TP degree, dtype, architecture, a hash of the source
    D/config.json, tokenizer files    copied from the source, so D is a model_id of its own

Because the shards are AutoTP's own output, they match the sharded module on any machine with the same
DeepSpeed sharding rules; loading (handlers.loading.load_sharded) builds the module on the meta device,
lets AutoTP shard the empty structure, and assigns the rank's tensors: one file read per rank, no full model.

The same files are written at first load when serving.properties sets DJL's `option.save_mp_checkpoint_path`.
"""
import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("tpserve.shard")

MANIFEST = "tpserve-shards.json"
FORMAT = "tpserve-tp-shards/1"
# Everything in a Hugging Face folder that is not weights: copied so a shard folder loads like a model folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


class ShardError(Exception):
    """A shard folder that cannot be served as asked (wrong TP degree, missing or foreign files)."""


def shard_file(rank: int, tp: int) -> str:
    return f"tp-rank-{rank:02d}-of-{tp:02d}.safetensors"


# --- the command ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rank_worker:
        rank_main(args.source, args.out, args.tensor_parallel_degree, args.dtype, args.trust_remote_code)
        return
    try:
        source, dtype, trust = resolve_source(args.model_dir, args.dtype)
    except (ShardError, ValueError) as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    started = time.monotonic()
    code = run_ranks(source, args.out, args.tensor_parallel_degree, dtype, trust)
    if code != 0:
        log.error("sharding failed: mpirun exited with %d", code)
        raise SystemExit(code)
    log.info("wrote %d shards of %s to %s in %.1f s", args.tensor_parallel_degree, source, args.out,
             time.monotonic() - started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tpserve shard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="model directory (with serving.properties) or HF folder")
    parser.add_argument("--tensor-parallel-degree", type=int, required=True, help="ranks to shard for")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the shards into")
    parser.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default=None,
                        help="dtype of the shards (default: option.dtype of the model directory, else auto)")
    parser.add_argument("--trust-remote-code", action="store_true")
    # internal: what each mpirun rank runs
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tensor_parallel_degree < 1:
        parser.error("--tensor-parallel-degree must be at least 1")
    if not args.rank_worker and args.model_dir is None:
        parser.error("--model-dir is required")
    return args


def resolve_source(model_dir: Path, dtype: str | None) -> tuple[str, str, bool]:
    """The weights folder, dtype and trust flag a model directory's serving.properties name (or the folder
    itself when it is a plain Hugging Face folder)."""
    from serving.config import PROPERTIES_FILE, load_model_config

    if not model_dir.is_dir():
        raise ShardError(f"--model-dir {model_dir}: no such folder")
    if (model_dir / PROPERTIES_FILE).exists():
        config = load_model_config(model_dir)
        return config.model_id or str(config.model_dir), dtype or config.dtype, config.trust_remote_code
    if not (model_dir / "config.json").exists():
        raise ShardError(f"--model-dir {model_dir}: neither a model directory ({PROPERTIES_FILE}) "
                         "nor a Hugging Face folder (config.json)")
    return str(model_dir.resolve()), dtype or "auto", False


def run_ranks(source: str, out: Path, tp: int, dtype: str, trust: bool) -> int:
    """Launch the ranks the way the server does (same mpirun line and environment) and wait for them."""
    from serving.namespace import Namespace, record_group, remove_group_files
    from serving.worker_group import free_port, rank_environment

    port = free_port()
    space = Namespace().create()  # the ranks' temporary and shared-memory files, removed below
    group = space.group_dir("shard")
    command = ["mpirun", "-np", str(tp), "--bind-to", "none", "--tag-output"]
    if tp > (os.cpu_count() or 1):
        command.append("--oversubscribe")
    command += [sys.executable, "-m", "serving.shard", "--rank-worker", "--source", source, "--out", str(out),
                "--tensor-parallel-degree", str(tp), "--dtype", dtype]
    if trust:
        command.append("--trust-remote-code")
    try:
        process = subprocess.Popen(command, env=rank_environment(port, space, group / "beat"), stdin=subprocess.DEVNULL)
        record_group(group, process.pid, port)
        return process.wait()
    finally:
        remove_group_files(group)
        space.remove()


def rank_main(source: str, out: Path, tp: int, dtype_name: str, trust: bool) -> None:
    """One rank: load the source as the server would, shard with AutoTP, write this rank's part."""
    from handlers.loading import load_model, resolve_dtype
    from serving.rank.__main__ import join_process_group, map_mpi_environment

    map_mpi_environment()
    join_process_group("DeepSpeed")
    import deepspeed
    import torch

    dtype = resolve_dtype(dtype_name)
    model = load_model(source, dtype, trust)
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": tp}, dtype=dtype,
                                      replace_with_kernel_inject=False)
    write_shards(engine.module, Path(out), source, dtype, tp, torch.distributed.get_rank())


# --- writing ---------------------------------------------------------------------------------------------
def write_shards(module, out: Path, source: str, dtype, tp: int, rank: int) -> None:
    """Every rank writes its own file; rank 0 then writes the manifest and the source's non-weight files.
    Collective: all `tp` ranks must call it."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors, aliases = unique_tensors(module.state_dict())
    path = out / shard_file(rank, tp)
    save_file(tensors, str(path), metadata={"format": FORMAT, "rank": str(rank), "tp": str(tp)})
    path.chmod(0o644)  # safetensors writes 0600; the server may run as another user (the image's uid 1000)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        copy_non_weight_files(Path(source), out)
        manifest = {
            "format": FORMAT,
            "tensor_parallel_degree": tp,
            "dtype": dtype_name(dtype),
            "architecture": (getattr(module.config, "architectures", None) or [type(module).__name__])[0],
            "source": str(source),
            "source_hash": source_hash(Path(source)),
            "files": [shard_file(r, tp) for r in range(tp)],
            "aliases": aliases,
            "versions": library_versions(),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        log.info("wrote %s (tp=%d, %s)", out / MANIFEST, tp, manifest["dtype"])
    if dist.is_initialized():
        dist.barrier()


def unique_tensors(state: dict) -> tuple[dict, dict[str, str]]:
    """safetensors refuses tensors that share memory (tied embeddings): keep one, record the others as aliases."""
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        key = (tensor.device, tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, aliases


def copy_non_weight_files(source: Path, out: Path) -> None:
    if not source.is_dir():  # a hub id: save_pretrained-able parts come from transformers' cache
        from transformers import AutoConfig, AutoTokenizer
        AutoConfig.from_pretrained(str(source)).save_pretrained(out)
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(out)
        return
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and not path.name.endswith(".index.json") \
                and path.name != MANIFEST and not path.name.startswith("."):
            shutil.copy2(path, out / path.name)


def source_hash(source: Path) -> str:
    """sha256 over the source's config and weight files (names and contents): shards from one source at one
    TP degree can be matched to it, and a changed source is noticed."""
    digest = hashlib.sha256()
    if not source.is_dir():
        digest.update(str(source).encode())
        return "sha256:" + digest.hexdigest()
    for path in sorted(source.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.name.endswith(WEIGHT_SUFFIXES)):
            digest.update(path.name.encode() + b"\0")
            with open(path, "rb") as handle:
                while chunk := handle.read(16 << 20):
                    digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def dtype_name(dtype) -> str:
    import torch
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for name in ("torch", "transformers", "deepspeed"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


# --- reading ---------------------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def check_manifest(folder: Path, manifest: dict, tp: int) -> None:
    """Refuse a shard folder written for another tensor_parallel_degree, or one with files missing."""
    written_for = manifest["tensor_parallel_degree"]
    if written_for != tp:
        raise ShardError(
            f"{folder} holds shards for tensor_parallel_degree={written_for}, but the model is served with "
            f"tensor_parallel_degree={tp}: set option.tensor_parallel_degree={written_for}, or write shards "
            f"for {tp} with `tpserve shard --model-dir <original> --tensor-parallel-degree {tp} --out <folder>`")
    missing = [name for name in manifest["files"] if not (Path(folder) / name).exists()]
    if missing:
        raise ShardError(f"{folder}: shard files missing: {', '.join(missing)}")


if __name__ == "__main__":
    main()
