"""The reader's byte budget: only served rows are held, a tiny budget serves the same samples with the same values,
and every buffer stays within the budget."""
from __future__ import annotations

import numpy as np
import torch

from cachetune.cache.reader import CacheReader
from tests.test_extract import run_extract


def served(reader: CacheReader, **options) -> dict:
    """sample -> its decoded rows [K, n, D], over one shuffled epoch."""
    out = {}
    for batch in reader.batches(8, shuffle=True, seed=3, **options):
        features = batch.hidden_states().dense()
        for row, sample in enumerate(batch.index):
            out[int(sample)] = features[row, :, :int(batch.mask[row].sum())]
    return out


def test_small_budgets_serve_the_same_rows_and_hold_only_served_ones(tiny_bert, tiny_table, tmp_path):
    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", layers="0,2", dtype="fp8")
    whole = served(CacheReader(str(tmp_path / "f.zarr"), "train"), buffer_bytes=1 << 30)
    subset = CacheReader(str(tmp_path / "f.zarr"), "train", limit=30)
    tiny = 4 * int(subset.lengths.max()) * subset.token_bytes  # a couple of samples per buffer
    held = []
    original = subset._read_group
    subset._read_group = lambda pieces: held.append(sum(int(subset.lengths[p].sum()) for p in pieces)) or original(pieces)
    small = served(subset, buffer_bytes=tiny)
    assert sorted(small) == sorted(subset.samples.tolist()) and len(held) > 3
    assert max(held) * subset.token_bytes <= tiny // 2 + int(subset.lengths.max()) * subset.token_bytes
    for sample, values in small.items():
        torch.testing.assert_close(values, whole[sample], rtol=0, atol=0)
    # a piece of a sparse subset reads its span but keeps only its samples' rows
    tokens, offsets, _ = subset.read_rows(subset.block_samples[0])
    assert tokens.shape[1] == int(subset.lengths[subset.block_samples[0]].sum())
    assert sorted(offsets) == sorted(subset.block_samples[0].tolist())
    first = subset.block_samples[0]
    assert (np.diff(subset.token_start[first]) > 0).all()  # a block's samples in token order: pieces are contiguous
    np.testing.assert_array_equal(list(offsets.values()), np.concatenate([[0], np.cumsum(subset.lengths[first])[:-1]]))


def test_the_default_budget_is_what_the_block_reader_held_capped(tiny_bert, tiny_table, tmp_path):
    """Default: two buffers of two whole blocks of the layers read (the block reader's), at most 48 MB; a pass holds
    no more than that, give or take one sample."""
    from cachetune.cache.reader import BUFFER_BYTES

    run_extract(tiny_bert, tiny_table, tmp_path / "f.zarr", layers="0,2", dtype="fp8")
    reader = CacheReader(str(tmp_path / "f.zarr"), "train", layers=[2])
    assert reader.default_buffer_bytes == min(BUFFER_BYTES, 4 * reader.block_tokens * reader.token_bytes)
    served(reader)
    longest = int(reader.lengths.max()) * reader.token_bytes
    assert 0 < reader.buffer_peak_bytes <= reader.default_buffer_bytes + 2 * longest
