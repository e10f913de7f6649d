"""A batch of cached hidden states as the store encodes them, decoded one layer at a time where a method uses it.

Widening a whole batch to float32 (every layer at once) held 4 bytes per cached value, and the first projection
saved that copy again for its weight gradient; an 8-bit store holds 1 (plus 2 bytes of scale per 64 values). So a
batch reaches a side network as `CachedHiddenStates`: the codes, their scales and the decoder, on the training
device. `layer(k)` decodes layer k just in time (frozen layers, residual terms, pooling) and the fused projection
(stages/methods/decode_linear.py) decodes again in backward instead of keeping float32 values.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .encoding import Decoder, Encoding
from .quantize import EIGHT_BIT, encode


_INDEX: dict = {}  # (slots, device) -> the slots as an index tensor there, made once: a Python list as an index
# would be copied to the GPU, and waited for, at every step


def _index(slots: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if (slots, device) not in _INDEX:
        _INDEX[slots, device] = torch.tensor(slots, dtype=torch.long).to(device)
    return _INDEX[slots, device]


@dataclass(frozen=True)
class CachedHiddenStates:
    """codes [B, K, T, W]: float16/float32 values of a plain store, int8 or uint8 (fp8 bytes) codes of an 8-bit one,
    projection coefficients of a `--reduce` store; scales [B, K, T, ceil(W/64)] float16 (8-bit stores) or None;
    mask [B, T] bool (True = real token); positions: which of the decoder's layers the K slots are (None: 0..K-1)."""

    codes: torch.Tensor
    mask: torch.Tensor
    scales: torch.Tensor | None = None
    decoder: Decoder | None = None
    positions: tuple[int, ...] | None = None

    @classmethod
    def wrap(cls, features, mask: torch.Tensor) -> "CachedHiddenStates":
        """`features` as it is when already CachedHiddenStates; a float tensor [B, K, T, D] of values otherwise (a
        user's own features, the tests' references)."""
        return features if isinstance(features, cls) else cls(features, mask)

    @classmethod
    def encode(cls, values: torch.Tensor, mask: torch.Tensor, dtype: str) -> "CachedHiddenStates":
        """A backbone's hidden states [B, K, T, D] (float) as a `dtype` store would serve them (float16, float32,
        int8 or fp8, zeros at padded positions), so a side network at predict time sees the rounding it was
        trained on. Not for `--reduce` stores (their basis lives in the store)."""
        values = values * mask[:, None, :, None]
        if dtype not in EIGHT_BIT:
            return cls(values.to(getattr(torch, dtype)), mask)
        codes, scales = encode(values.reshape(-1, values.shape[-1]), dtype)
        return cls(codes.view(values.shape), mask, scales.view(*values.shape[:3], -1),
                   Decoder(Encoding(dtype), {}, list(range(values.shape[1]))))

    @property
    def num_layers(self) -> int:
        return self.codes.shape[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, K, T)."""
        return tuple(self.codes.shape[:3])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def layer(self, k: int) -> torch.Tensor:
        """Layer slot k decoded: float32 [B, T, D] on the codes' device, zeros at padded positions (as the reader
        pads; a wrapped tensor's values are returned as they are, in float32 or float64). Negative k counts from the end."""
        k = range(self.num_layers)[k]
        if self.decoder is None:  # values: a float16 store's widened; float32 (or a test's float64) as they are
            values = self.codes[:, k]
            return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
        position = k if self.positions is None else self.positions[k]
        scales = None if self.scales is None else self.scales[:, k:k + 1]
        return self.decoder.decode(self.codes[:, k:k + 1], scales, self.mask, [position])[:, 0]

    def dense(self) -> torch.Tensor:
        """Every layer decoded at once: float32 [B, K, T, D] (4 bytes per value; for references and tests)."""
        return torch.stack([self.layer(k) for k in range(self.num_layers)], 1)

    def select(self, slots) -> "CachedHiddenStates":
        """The layer slots `slots` (a sequence of ints, in order) as their own CachedHiddenStates; a run of
        consecutive slots is a view, others a gather of the codes (1 byte per value on an 8-bit store)."""
        slots = list(slots)
        if slots == list(range(self.num_layers)):
            return self
        if slots and slots == list(range(slots[0], slots[0] + len(slots))):
            take = lambda t: t.narrow(1, slots[0], len(slots))  # noqa: E731
        else:
            index = _index(tuple(slots), self.device)
            take = lambda t: t.index_select(1, index)  # noqa: E731
        positions = tuple(slots if self.positions is None else [self.positions[k] for k in slots])
        return replace(self, codes=take(self.codes), scales=None if self.scales is None else take(self.scales),
                       positions=positions)

    def pad(self, rows: int, length: int) -> "CachedHiddenStates":
        """Padded to `rows` rows (copies of the first row) and `length` tokens (zeros, mask False): static shapes
        (stages/training/static_shapes.py)."""
        extra = length - self.shape[2]
        codes, scales, mask = self.codes, self.scales, self.mask
        if extra > 0:
            codes = F.pad(codes, (0, 0, 0, extra))
            scales = None if scales is None else F.pad(scales, (0, 0, 0, extra))
            mask = F.pad(mask, (0, extra), value=False)
        if self.shape[0] < rows:
            index = torch.cat([torch.arange(self.shape[0], device=self.device),
                               torch.zeros(rows - self.shape[0], dtype=torch.long, device=self.device)])
            codes, mask = codes.index_select(0, index), mask.index_select(0, index)
            scales = None if scales is None else scales.index_select(0, index)
        return replace(self, codes=codes, scales=scales, mask=mask)

    def nbytes(self) -> int:
        """Bytes the batch holds on its device (codes, scales, mask)."""
        return sum(t.nbytes for t in (self.codes, self.scales, self.mask) if t is not None)
