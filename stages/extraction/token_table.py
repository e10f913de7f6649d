"""A split's tokenized samples packed into flat arrays, and forward batches cut from them as tensors.

Built once per split from the tokenizer's output; a batch is a few numpy gathers (no per-sample dicts, no
`tokenizer.pad`). Padding is on the tokenizer's own side (right for most; left for e.g. Gemma) with its own pad
values, so a batch equals what `tokenizer.pad(..., return_tensors="pt")` makes from the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch


@dataclass
class TokenTable:
    """fields[name][starts[i]:starts[i] + lengths[i]] are sample i's values (i: split position)."""

    fields: dict[str, np.ndarray]
    starts: np.ndarray  # [N] int64
    lengths: np.ndarray  # [N] int64
    pad: dict[str, int]
    padding_side: str = "right"  # or "left": a row's real tokens are its last lengths[i] positions

    @classmethod
    def from_encoded(cls, encoded, tokenizer) -> "TokenTable":
        """encoded: the tokenizer's output for a split (name -> one list of values per sample)."""
        lengths = np.fromiter(map(len, encoded["input_ids"]), dtype=np.int64, count=len(encoded["input_ids"]))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        fields = {name: np.fromiter(chain.from_iterable(values), dtype=np.int64, count=int(lengths.sum()))
                  for name, values in encoded.items() if name != "attention_mask"}
        pad = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id}
        return cls(fields, starts, lengths, {name: int(pad.get(name) or 0) for name in fields},
                   getattr(tokenizer, "padding_side", "right") or "right")

    def subset(self, positions) -> "TokenTable":
        """Only these samples' values (what one distributed task ships); positions keep their meaning."""
        positions = np.asarray(positions, dtype=np.int64)
        lengths = np.zeros_like(self.lengths)
        lengths[positions] = self.lengths[positions]
        starts = np.zeros_like(self.starts)
        starts[positions] = np.concatenate([[0], np.cumsum(lengths[positions])[:-1]]) if len(positions) else []
        index = ranges(self.starts[positions], self.lengths[positions])
        return TokenTable({name: values[index] for name, values in self.fields.items()}, starts, lengths, self.pad,
                          self.padding_side)

    def batch(self, samples) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """(model inputs [B, T] int64 on the CPU, real tokens per row) for these split positions."""
        samples = np.asarray(samples, dtype=np.int64)
        lengths = self.lengths[samples]
        width = int(lengths.max())
        first = self.first_real(lengths, width)  # [B] where each row's real tokens begin
        column = np.arange(width) - first[:, None]  # position within the sample
        real = (column >= 0) & (column < lengths[:, None])
        index = np.where(real, self.starts[samples][:, None] + column, 0)
        inputs = {name: torch.from_numpy(np.where(real, values[index], self.pad[name]))
                  for name, values in self.fields.items()}
        inputs["attention_mask"] = torch.from_numpy(real.astype(np.int64))
        return inputs, lengths

    def first_real(self, lengths: np.ndarray, width: int) -> np.ndarray:
        """[B] int64: the column of each row's first real token in a batch padded to `width`."""
        if self.padding_side == "left":
            return (width - np.asarray(lengths)).astype(np.int64)
        return np.zeros(len(lengths), dtype=np.int64)


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of the ranges [start, start + length), in order."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + offsets
