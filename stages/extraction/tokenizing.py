"""Texts to token ids as the backbone's tokenizer makes them, and what that does to texts that a user would not see.

- Cut: a text longer than --max-length loses its end (a long review its verdict). `encode` tokenizes once
  without truncation, so each text's full length is known, and lets the tokenizer itself truncate only the texts
  that are too long (pairs keep its truncation strategy and the closing special tokens).
- A text that already starts with the special tokens the tokenizer puts first ('<bos>' from a chat template,
  '[CLS]' copied from a dump) would get them twice: `single_prefix` drops them from the text, so the tokenizer
  adds them once, as for every other text. extract, predict and baseline all tokenize through it.
- Special-token strings inside a text ('[SEP]', '</s>', '<|im_start|>') become control tokens, not text:
  `special_token_texts` finds the texts that carry them, for a note.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SENTINEL_LENGTH = 10**9  # tokenizers without a known limit say model_max_length = 1e30


def added_prefix(tokenizer) -> str:
    """The special tokens the tokenizer puts before a text, as one string ('[CLS]', '<s>', '<|begin_of_text|>'),
    or '' when it puts none."""
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    count = 0
    while count < len(ids) - len(plain) and ids[count] in special:
        count += 1
    return "".join(tokenizer.convert_ids_to_tokens(ids[:count]))


def single_prefix(tokenizer, texts: list[str], prefix: str | None = None) -> tuple[list[str], list[int]]:
    """(the texts, each without the tokenizer's own prefix string when it starts with it; positions changed)."""
    prefix = added_prefix(tokenizer) if prefix is None else prefix
    if not prefix:
        return list(texts), []
    changed = [i for i, text in enumerate(texts) if text.startswith(prefix)]
    texts = list(texts)
    for i in changed:
        texts[i] = texts[i][len(prefix):]
    return texts, changed


def special_token_texts(tokenizer, texts: list[str]) -> tuple[list[int], list[str]]:
    """(positions of the texts holding a special-token string, the strings found, most common first)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    tokens = set(tokenizer.all_special_tokens) | {token.content for token in added if token.special}
    tokens = sorted((t for t in tokens if t), key=len, reverse=True)
    if not tokens:
        return [], []
    pattern = re.compile("|".join(map(re.escape, tokens)))
    positions, found = [], {}
    for i, text in enumerate(texts):
        hits = pattern.findall(text)
        if hits:
            positions.append(i)
            for hit in hits:
                found[hit] = found.get(hit, 0) + 1
    return positions, sorted(found, key=found.get, reverse=True)


def encode(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> tuple[dict, np.ndarray]:
    """(the tokenizer's output for the texts cut at max_length, as `tokenizer(..., truncation=True)` gives it, with
    the prefix given once (single_prefix); [N] int64 tokens of each text before the cut)."""
    texts, _ = single_prefix(tokenizer, texts)
    encoded = tokenizer(texts, pairs, verbose=False)  # verbose: no warning about texts beyond model_max_length
    full = np.fromiter(map(len, encoded["input_ids"]), dtype=np.int64, count=len(texts))
    long = np.flatnonzero(full > max_length).tolist()
    if long:
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None, truncation=True,
                        max_length=max_length)
        for name, values in encoded.items():
            for row, i in enumerate(long):
                values[i] = cut[name][row]
    return encoded, full


def backbone_limit(backbone) -> int | None:
    """The most tokens the backbone takes: the least of its position table, its config's max_position_embeddings
    and its tokenizer's model_max_length (None when none is known)."""
    from .preflight import position_limit

    tokenizer_limit = getattr(backbone.tokenizer, "model_max_length", None)
    limits = [position_limit(backbone.model), getattr(backbone.model.config, "max_position_embeddings", None),
              tokenizer_limit if tokenizer_limit and tokenizer_limit < SENTINEL_LENGTH else None]
    return min((int(limit) for limit in limits if limit), default=None)


@dataclass
class Truncation:
    """What --max-length cut, over the splits tokenized so far (stored as the store's `truncation` attribute)."""

    max_length: int
    backbone_allows: int | None
    texts: int = 0
    cut: int = 0
    longest: int = 0

    def add(self, full_lengths: np.ndarray) -> None:
        self.texts += len(full_lengths)
        self.cut += int((full_lengths > self.max_length).sum())
        self.longest = max(self.longest, int(full_lengths.max(initial=0)))

    def line(self) -> str | None:
        """One log line when texts were cut, naming the --max-length that keeps them (or the most the backbone takes)."""
        if not self.cut:
            return None
        allows = f"; the backbone allows {self.backbone_allows}" if self.backbone_allows else ""
        whole = min(self.longest, self.backbone_allows or self.longest)
        if whole <= self.max_length:
            return (f"note: {self.cut} of {self.texts} texts were cut at --max-length {self.max_length} tokens "
                    f"(longest {self.longest} tokens{allows}): their ends are not in the store")
        keeps = "keeps every text whole" if whole == self.longest else "keeps as much as the backbone takes"
        return (f"warning: {self.cut} of {self.texts} texts were cut at --max-length {self.max_length} tokens "
                f"(longest {self.longest} tokens{allows}): their ends are not in the store; --max-length {whole} {keeps}")


def trained_length_note(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> str | None:
    """For predictions on raw texts: one note line when texts are longer than the `max_length` tokens a model was
    trained at (its store's), which cuts them as extraction did; None when none is."""
    truncation = Truncation(max_length, None)
    truncation.add(encode(tokenizer, texts, pairs, max_length)[1])
    if not truncation.cut:
        return None
    were, their = ("was", "its") if truncation.cut == 1 else ("were", "their")
    return (f"note: {truncation.cut} of {_texts(truncation.texts)} {were} cut at {max_length} tokens, the max length "
            f"the model was trained at (longest {truncation.longest} tokens): only {their} first {max_length} tokens "
            "were scored")


def special_token_notes(tokenizer, texts: list[str], pairs: list[str] | None, where) -> list[str]:
    """Note lines (none when there is nothing to say) on texts that start with the tokenizer's own prefix (taken off:
    single_prefix) and on texts holding special-token strings; where(positions) names those texts' rows."""
    notes = []
    prefix = added_prefix(tokenizer)
    texts, dropped = single_prefix(tokenizer, texts, prefix)
    if dropped:
        notes.append(f"note: {_texts(len(dropped))} already begin{'s' if len(dropped) == 1 else ''} with {prefix!r}, "
                     f"which the tokenizer puts first itself: it is taken off, so each starts with one ({where(dropped)})")
    positions, found = special_token_texts(tokenizer, texts)
    pair_positions, pair_found = special_token_texts(tokenizer, pairs or [])
    rows = sorted(set(positions) | set(pair_positions))
    if rows:
        notes.append(f"note: {_texts(len(rows))} hold{'s' if len(rows) == 1 else ''} special-token strings such as "
                     f"{(found or pair_found)[0]!r} ({where(rows)}): the tokenizer reads them as control tokens, not as "
                     "words; rewrite them in the data if they are meant as text")
    return notes


def _texts(count: int) -> str:
    return f"{count} text{'' if count == 1 else 's'}"
