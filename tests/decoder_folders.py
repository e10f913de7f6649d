"""Tiny randomly initialised decoder (and T5) folders with a word-level tokenizer, saved as a real checkpoint is.

Families: llama (no pad token: pads with EOS), gemma3_text (BOS added, pads on the LEFT, sliding-window layer),
gpt2 (learned absolute positions, no pad token), t5 (encoder of an encoder-decoder checkpoint). Their weights are
random: they test loading, masks, positions and shapes, never accuracy.
"""
from __future__ import annotations

from .conftest import WORDS

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def _tokenizer(pad: bool, bos: bool, padding_side: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                            special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>",
                                   bos_token="<bos>" if bos else None, pad_token="<pad>" if pad else None,
                                   padding_side=padding_side), len(vocab)


def write_tiny_decoder(folder, family: str, layers: int = 2, hidden: int = 32, seed: int = 0, pad: bool | None = None,
                       eos: bool = True):
    """Saves a tiny random `family` model and its tokenizer into folder; returns folder."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    pad = family in ("gemma3_text", "t5") if pad is None else pad
    tokenizer, vocab = _tokenizer(pad=pad, bos=family == "gemma3_text",
                                  padding_side="left" if family == "gemma3_text" else "right")
    if not eos:
        tokenizer.eos_token = None
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, max_position_embeddings=64, **heads,
                                          bos_token_id=2, eos_token_id=3, pad_token_id=None)
        model = transformers.LlamaForCausalLM(config)
    elif family == "gemma3_text":
        config = transformers.Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                               num_hidden_layers=layers, head_dim=hidden // 4, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"] * (layers // 2)
                                               + ["sliding_attention"] * (layers % 2),
                                               max_position_embeddings=64, **heads, bos_token_id=2, eos_token_id=3,
                                               pad_token_id=0)
        model = transformers.Gemma3ForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64,
                                         bos_token_id=3, eos_token_id=3)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "t5":
        config = transformers.T5Config(vocab_size=vocab, d_model=hidden, d_kv=hidden // 4, d_ff=2 * hidden,
                                       num_layers=layers, num_heads=4, pad_token_id=0, eos_token_id=3,
                                       decoder_start_token_id=0)
        model = transformers.T5ForConditionalGeneration(config)
    else:
        raise ValueError(family)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
