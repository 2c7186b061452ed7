"""The built-in character tokenizer: every preset model runs offline, with no tokenizer download."""
from __future__ import annotations

import json
import string
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
