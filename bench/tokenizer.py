"""The benchmarks' tokenizer: a real Hugging Face tokenizer over onelayer_fast's character vocabulary, sized to a
benchmark model's vocabulary (used by `iteration` for every contender, and by TRL's contenders in `step`)."""
from __future__ import annotations


def bench_tokenizer(vocab_size: int):
    """A real HF tokenizer (TRL requires a PreTrainedTokenizerBase) that every contender uses.

    Characters map to the ids of onelayer_fast's built-in CharTokenizer (pad 0, eos 1, unk 2, then the 95
    printable characters). The benchmark model has a larger vocabulary, and a random-init model samples
    mostly ids past the characters: those decode to the characters again, cyclically, so every sampled
    completion is text with a realistic share of digits and the arithmetic rewards vary within a group.
    """
    import string

    from transformers import PreTrainedTokenizer

    class CyclicCharTokenizer(PreTrainedTokenizer):
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, total: int, **kwargs):
            self.specials = ["<pad>", "<eos>", "<unk>"]
            self.characters = string.printable[:95]
            self.total = total
            self.char_vocab = {tok: i for i, tok in enumerate(self.specials + list(self.characters))}
            super().__init__(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", **kwargs)

        @property
        def vocab_size(self) -> int:
            return self.total

        def get_vocab(self) -> dict[str, int]:
            return dict(self.char_vocab)

        def _tokenize(self, text: str, **kwargs) -> list[str]:
            return list(text)

        def _convert_token_to_id(self, token: str) -> int:
            return self.char_vocab.get(token, 2)

        def _convert_id_to_token(self, index: int) -> str:
            if index < len(self.specials):
                return self.specials[index]
            return self.characters[(index - len(self.specials)) % len(self.characters)]

        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            return "".join(tokens)

        def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
            return ()

    return CyclicCharTokenizer(vocab_size)
