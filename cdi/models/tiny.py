"""Tiny, locally built model parts for the toy world and the test suite.

Nothing here touches the network: every component is built from a config
with random weights (or trained by ``cdi.toy``) and saved with
``save_pretrained``, so that it is loaded back through exactly the path a
user's checkpoint takes.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

# Printable ASCII that the byte-level pre-tokenizer maps to itself.
_CHARS = [chr(i) for i in range(33, 127)]
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def build_char_clip_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per character (no merges).

    Captions are lower-cased by the CLIP normaliser; every printable ASCII
    character is a token, with a separate end-of-word variant as CLIP's BPE
    expects. Small enough for toy text encoders, and it saves and loads as an
    ordinary ``CLIPTokenizer`` folder.
    """
    tokens = _CHARS + [c + "</w>" for c in _CHARS] + _SPECIAL
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def save_char_clip_tokenizer(folder: str | Path, max_length: int = 32) -> CLIPTokenizer:
    """Build the character tokenizer and save it to ``folder``.

    Writes the ``tokenizer.json`` of current transformers and the
    ``vocab.json``/``merges.txt`` pair that older releases read.
    """
    folder = Path(folder)
    tokenizer = build_char_clip_tokenizer(max_length)
    tokenizer.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab(), sort_keys=True))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return tokenizer
