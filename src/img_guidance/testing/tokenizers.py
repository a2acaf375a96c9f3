"""Tiny tokenizers built from in-memory vocabularies: no hub, no sentencepiece model files.

Every vocabulary covers lower- and upper-case letters, digits and common punctuation one character
at a time, so any plain English prompt tokenizes (into many tokens) without unknown tokens.
"""

from __future__ import annotations

import string

CHARS = string.ascii_letters + string.digits + ".,!?'\"-:;()/#<>_"


def clip_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer (byte-level BPE with </w> word ends) over single characters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS.lower() + CHARS:
        for piece in (c, c + "</w>"):
            vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 32):
    """A T5TokenizerFast (Unigram) over single characters, with T5's pad/eos/unk ids 0/1/2."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in CHARS] + [("\u2581" + c, -1.5) for c in CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def llama_tokenizer(extra_special_tokens: tuple[str, ...] = ("<image>",), model_max_length: int = 2048):
    """A LlamaTokenizerFast (byte-fallback-free BPE) over single characters, with <unk>, <s>,
    </s> at ids 0-2 as in LLaMA, and the given special tokens (such as <image>) at the end."""
    from transformers import LlamaTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3}
    for c in CHARS + " \n":
        for piece in (c, "\u2581" + c):
            vocab.setdefault(piece, len(vocab))
    tok = LlamaTokenizerFast(vocab=vocab, merges=[], model_max_length=model_max_length)
    if extra_special_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def bert_tokenizer(model_max_length: int = 512):
    """A BertTokenizer (WordPiece, lower-cased) over single characters and their ``##`` continuations,
    with BERT's [PAD], [UNK], [CLS], [SEP], [MASK] at ids 0-4 (bert-base-uncased: 0, 100, 101, 102, 103)."""
    from transformers import BertTokenizer

    vocab = {t: i for i, t in enumerate(("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))}
    for c in CHARS.lower():
        for piece in (c, "##" + c):
            vocab.setdefault(piece, len(vocab))
    return BertTokenizer(vocab=vocab, model_max_length=model_max_length)
