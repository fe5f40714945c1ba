"""The stop rules' view of a vocabulary: per token id, the features of its text (guard/policy.py).

Built once per tokenizer from each token decoded alone, the same way in both engines, so the
rules never decode while generating. Ids past the tokenizer (spare head rows) count as code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from guard.policy import FEATURE_FIELDS, TokenFeatures, token_feature_table, token_features

TABLE_FILE = "genguard_tokens.npz"


def single_token_texts(tokenizer, num_ids: int) -> list[str]:
    """Each id decoded alone (special tokens too: their text is what a line holds); ids the
    tokenizer does not know become "" (never produced by it, masked by the guard)."""
    num_known = min(num_ids, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(num_known)])
    return texts + [""] * (num_ids - num_known)


@dataclass(frozen=True)
class TokenTable:
    arrays: dict[str, np.ndarray]  # FEATURE_FIELDS -> array over token ids

    @classmethod
    def from_tokenizer(cls, tokenizer, num_ids: int | None = None) -> "TokenTable":
        return cls(token_feature_table(single_token_texts(tokenizer, num_ids or len(tokenizer))))

    @classmethod
    def load(cls, path: str | Path) -> "TokenTable":
        with np.load(path) as data:
            missing = [name for name in FEATURE_FIELDS if name not in data]
            if missing:
                raise ValueError(f"{path} is not a GenGuard token table (missing {missing});"
                                 " rebuild the export with `python -m guard.export`")
            return cls({name: data[name] for name in FEATURE_FIELDS})

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.arrays)

    @property
    def num_ids(self) -> int:
        return len(self.arrays["is_line_end"])

    def features(self, token_id: int) -> TokenFeatures:
        if not 0 <= token_id < self.num_ids:  # a head row past the tokenizer: no text
            return token_features("")
        return TokenFeatures(**{name: self.arrays[name][token_id].item() for name in FEATURE_FIELDS})

    def gather(self, token_ids) -> TokenFeatures:
        """Features of many tokens at once (NumPy ids -> NumPy arrays)."""
        return TokenFeatures(**{name: self.arrays[name][token_ids] for name in FEATURE_FIELDS})

    def packed(self) -> np.ndarray:
        """All features of a token side by side ([num_ids, 8] int16, one 16-byte row a token), so
        that gathering a batch's tokens touches one cache line a token, not one an array."""
        columns = [self.arrays[name].astype(np.int16) for name in FEATURE_FIELDS]
        packed = np.zeros((self.num_ids, 8), dtype=np.int16)
        packed[:, :len(columns)] = np.stack(columns, axis=1)
        return packed
