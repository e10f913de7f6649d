"""Checks of the backbone against the options and the data, before the store is made or any forward pass runs.

What the model code would otherwise raise deep in a forward pass (a traceback, exit 1), or not raise at all
(a complete store of meaningless features, exit 0):

- blocks: a --max-length beyond --block-tokens (the fix: a --block-tokens that holds it, or a shorter --max-length
  when it is beyond the backbone's own limit too);
- positions: a text longer than the model's position table (`--max-length 700` on a 512-position BERT:
  "The size of tensor a (702) must match the size of tensor b (512)");
- token types: a tokenizer that gives the second text of a pair token type 1, on a model with one token type
  (a RoBERTa model with a BERT tokenizer: "IndexError: index out of range in self");
- the tokenizer's vocabulary against the embedding matrix: ids beyond its rows, or far fewer tokens than rows
  (a model folder without tokenizer files: transformers 5 makes a 5-token stand-in);
- a tokenizer that turns most of the data into its unknown token.
It also notes texts that start with the tokenizer's BOS/CLS string or hold special-token strings (tokenizing.py).
Only text backbones are checked; an image processor has none of these.
"""
from __future__ import annotations

import numpy as np
from torch import nn

from cachetune.cache.errors import InputError

from .tokenizing import special_token_notes

SAMPLE_ROWS = 256  # rows tokenized for the vocabulary checks, spread over the data
MAX_UNKNOWN_SHARE = 0.5  # more unknown tokens than this (of the sample's non-special tokens) is refused
MIN_TOKENS_JUDGED = 20  # too few tokens to judge the unknown share: no verdict
POSITION_TABLES = ("position_embeddings", "wpe")  # learned absolute positions (BERT-like, GPT-2)


def preflight(backbone, dataset, settings, log=None) -> None:
    """Raises InputError (one line naming the fix) when the backbone cannot give meaningful features for this
    data and these options. Rotary or relative positions have no table, so no length limit is checked for them."""
    from .extract import check_modality

    check_modality(backbone, dataset)  # image data on a text backbone (or back) is named as such first
    if backbone.modality != "text":
        return
    check_block_tokens(backbone, settings)
    check_vocabulary(backbone)
    rows = sample_rows(len(dataset), SAMPLE_ROWS)
    texts = [dataset.texts[i] for i in rows]
    pairs = [dataset.pairs[i] for i in rows] if dataset.pairs else None
    encoded = backbone.tokenizer(texts, pairs, truncation=True, max_length=settings.max_length,
                                 return_special_tokens_mask=True)
    check_token_types(backbone, encoded, pairs is not None)
    check_unknown_share(backbone, encoded)
    check_positions(backbone, dataset, settings.max_length)
    if log is not None:
        for note in special_token_notes(backbone.tokenizer, dataset.texts, dataset.pairs, dataset.where):
            log(note)


def sample_rows(count: int, size: int) -> np.ndarray:
    """Up to `size` row numbers spread evenly over `count` rows (first and last included)."""
    return np.unique(np.linspace(0, count - 1, min(count, size)).round().astype(np.int64)) if count else np.zeros(0, int)


def _embedding_rows(model) -> int | None:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError):
        return None


def check_vocabulary(backbone) -> None:
    """Every id the tokenizer can produce must index the embedding matrix, and the tokenizer must know at least
    half as many tokens as the matrix has rows (models pad the matrix a little, never to twice the vocabulary)."""
    rows = _embedding_rows(backbone.model)
    if rows is None:
        return
    tokenizer = backbone.tokenizer
    largest = max(tokenizer.get_vocab().values(), default=-1)
    where = f"the tokenizer of {backbone.path} ({type(tokenizer).__name__})"
    fix = ("give the backbone folder the tokenizer files saved with its model (tokenizer.json, or vocab.txt / "
           "vocab.json + merges.txt, with tokenizer_config.json)")
    if largest >= rows:
        raise InputError(f"{where} has token ids up to {largest} but the model's embedding matrix has {rows} rows: "
                         f"it belongs to another model; {fix}")
    if 2 * len(tokenizer) < rows:
        raise InputError(f"{where} knows {len(tokenizer)} tokens but the model's embedding matrix has {rows} rows: "
                         f"the folder lacks the model's own tokenizer (transformers made a stand-in) or holds "
                         f"another's; {fix}")


def check_token_types(backbone, encoded, has_pairs: bool) -> None:
    """The tokenizer's token type ids must be below the model's type_vocab_size."""
    types = encoded.get("token_type_ids")
    size = getattr(backbone.model.config, "type_vocab_size", None)
    if not types or not size:
        return
    largest = max((max(row) for row in types if row), default=0)
    if largest < size:
        return
    pair = " to the second text of a pair (--text-pair-column)" if has_pairs else ""
    raise InputError(f"the tokenizer of {backbone.path} ({type(backbone.tokenizer).__name__}) gives token type id "
                     f"{largest}{pair}, but the {backbone.model.config.model_type} model has type_vocab_size {size}: the "
                     "tokenizer is not the model's own; give the folder the model's tokenizer files"
                     f"{', or drop --text-pair-column and join the two texts into one column' if has_pairs else ''}")


def check_unknown_share(backbone, encoded) -> None:
    """Refuses a tokenizer that maps more than MAX_UNKNOWN_SHARE of the sample's (non-special) tokens to unknown."""
    unknown = backbone.tokenizer.unk_token_id
    if unknown is None:  # byte-level tokenizers (GPT-2) have no unknown token
        return
    total = hits = 0
    for ids, special in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
        real = np.asarray(ids)[np.asarray(special) == 0]
        total += real.size
        hits += int((real == unknown).sum())
    if total < MIN_TOKENS_JUDGED or hits <= MAX_UNKNOWN_SHARE * total:
        return
    token = backbone.tokenizer.unk_token
    raise InputError(f"the tokenizer of {backbone.path} turns {hits / total:.0%} of the tokens of {SAMPLE_ROWS} sampled "
                     f"rows into {token}: it does not fit this model or this data; give the folder the tokenizer "
                     "files saved with its model, or pick a backbone made for this language")


def check_block_tokens(backbone, settings) -> None:
    """A text of --max-length tokens must fit one block (--block-tokens). Refuses a --max-length beyond that with the
    fix: a shorter --max-length when it is also beyond the backbone's own limit (`token_limit`), else a
    --block-tokens that holds it."""
    from .extract import round_up

    length, block, chunk = settings.max_length, settings.block_tokens, settings.chunk_tokens
    if length <= block:
        return
    limit = token_limit(backbone)
    if limit is not None and length > limit[0]:
        tokens, source = limit
        blocks = "" if tokens <= block else f" and --block-tokens {round_up(tokens, chunk)}"
        raise InputError(f"--max-length {length} is more than the backbone at {backbone.path} takes ({source}: "
                         f"{tokens} tokens) and than --block-tokens {block}; use --max-length {tokens} or less{blocks}")
    raise InputError(f"--max-length {length} does not fit a block of --block-tokens {block} tokens; pass "
                     f"--block-tokens {round_up(length, chunk)} (a multiple of --chunk-tokens {chunk}) or a shorter --max-length")


def token_limit(backbone) -> tuple[int, str] | None:
    """(the fewest tokens the backbone takes per text, what says so): its learned position table, its tokenizer's
    model_max_length, or config.json's max_position_embeddings (rotary models); None when none is set."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    limits = [(position_limit(backbone.model), "its position table"),
              (getattr(backbone.tokenizer, "model_max_length", None), "its tokenizer's model_max_length"),
              (getattr(backbone.model.config, "max_position_embeddings", None), "config.json's max_position_embeddings")]
    limits = [(int(tokens), source) for tokens, source in limits if tokens and tokens < VERY_LARGE_INTEGER]
    return min(limits, key=lambda limit: limit[0]) if limits else None


def position_limit(model) -> int | None:
    """How many tokens the model's learned position table can place, or None without one. RoBERTa-style tables
    (a padding_idx) start real positions after the padding index, so they hold padding_idx + 1 fewer."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            offset = module.padding_idx + 1 if module.padding_idx is not None else 0
            return module.num_embeddings - offset
    return None


def check_positions(backbone, dataset, max_length: int) -> None:
    """When --max-length is above the position table, every text must still fit it (tokenizes all texts, so
    only then)."""
    limit = position_limit(backbone.model)
    if limit is None or max_length <= limit:
        return
    lengths = []
    for first in range(0, len(dataset), 4096):
        texts = dataset.texts[first:first + 4096]
        pairs = dataset.pairs[first:first + 4096] if dataset.pairs else None
        lengths += map(len, backbone.tokenizer(texts, pairs, truncation=True, max_length=max_length)["input_ids"])
    longer = np.flatnonzero(np.asarray(lengths) > limit)
    if longer.size:
        raise InputError(f"--max-length {max_length} is more than the {limit} positions of the backbone at "
                         f"{backbone.path} ({backbone.model.config.model_type}), and {longer.size} "
                         f"text{'s are' if longer.size > 1 else ' is'} longer than {limit} tokens ({dataset.where(longer)}); "
                         f"use --max-length {limit} or less")


def method_support_note(backbone, log) -> None:
    """Says which side networks cannot run on caches of this backbone (stages/methods/support.py), once, at extract."""
    from ..methods.support import split_supported
    from ..methods import method_names

    _, reasons = split_supported(method_names(), str(backbone.path))
    if reasons:
        first, reason = next(iter(reasons.items()))
        log(f"note: {', '.join(reasons)} cannot run on {backbone.model.config.model_type} caches ({first}: {reason}); "
            "the other methods can")
