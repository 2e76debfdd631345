"""A character-level tokenizer built in-process (no files, no download).

Vocabulary, with explicit and stable ids:

* 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>`` (special tokens, never produced by ``encode``);
* 3 ``"\\n"``, then the 95 printable ASCII characters ``" "`` (32) .. ``"~"`` (126) at ids 4..98.

``encode`` refuses any other character with an error that names it and its position.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


class CharTokenizer:
    """Fixed character vocabulary; ``encode(str) -> list[int]``, ``decode(list[int]) -> str``."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    eos_ids = (2,)

    def __init__(self) -> None:
        self._offset = len(SPECIALS)
        self._char_to_id = {c: i + self._offset for i, c in enumerate(CHARS)}
        self._id_to_char = dict(enumerate(SPECIALS)) | {i: c for c, i in self._char_to_id.items()}

    @property
    def vocab_size(self) -> int:
        return self._offset + len(CHARS)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        table = self._char_to_id
        for ch in text:
            i = table.get(ch)
            if i is None:
                raise ValueError(f"CharTokenizer: {self.check(text)}")
            ids.append(i)
        return ids

    def encode_completion(self, text: str) -> list[int]:
        """Token ids of a completion to append after an encoded prompt (an expert solution): the
        characters alone, no special token."""
        return self.encode(text)

    def check(self, text: str) -> str | None:
        """Why ``text`` cannot be encoded (its first character outside the vocabulary), or None."""
        for pos, ch in enumerate(text):
            if ch not in self._char_to_id:
                return (f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the built-in "
                        "tokenizer's vocabulary (printable ASCII and newline only)")
        return None

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i < self._offset:
                if i < 0:
                    raise ValueError(f"CharTokenizer: token id {i} is negative")
                if not skip_special:
                    out.append(SPECIALS[i])
                continue
            ch = self._id_to_char.get(i)
            if ch is None:
                raise ValueError(f"CharTokenizer: token id {i} is outside the vocabulary (size {self.vocab_size})")
            out.append(ch)
        return "".join(out)

    def vocab(self) -> dict[str, int]:
        """Token string -> id, specials included."""
        return {self._id_to_char[i]: i for i in range(self.vocab_size)}

    def save(self, directory: str | Path) -> Path:
        """Write ``tether_tokenizer.json`` (the vocabulary and special ids) into ``directory``."""
        path = Path(directory) / "tether_tokenizer.json"
        path.write_text(json.dumps({"type": "char", "vocab": self.vocab(), "pad_id": self.pad_id,
                                    "bos_id": self.bos_id, "eos_id": self.eos_id}, indent=1))
        return path

    def save_hf(self, directory: str | Path) -> Path:
        """Write a ``transformers`` fast tokenizer with the same ids (``AutoTokenizer.from_pretrained``
        loads it): word-level over single characters, no special tokens added on encode, pad/bos/eos
        set. Needs ``tokenizers`` and ``transformers`` (the ``hf`` extra)."""
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        tk = Tokenizer(models.WordLevel(vocab=self.vocab(), unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.Split(pattern=Regex(r"[\s\S]"), behavior="isolated")
        tk.decoder = decoders.Fuse()
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=SPECIALS[self.bos_id],
                                       eos_token=SPECIALS[self.eos_id], pad_token=SPECIALS[self.pad_id])
        fast.save_pretrained(str(directory))
        return Path(directory)
