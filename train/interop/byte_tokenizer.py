"""The byte tokenizer (``data.tokenizer=byte``) as a Hugging Face ``tokenizer.json``, so that an
exported byte run carries its tokenizer and ``moe-import`` reads it back: a byte-level BPE without
merges whose vocabulary maps each byte's character to the byte's value (0..255) and ``<pad>``,
``<bos>``, ``<eos>`` to 256, 257, 258.

The special tokens are vocabulary entries, not added tokens, so no text encodes to them (as with
``ByteTokenizer``, where "<eos>" in a text is five bytes): every string gets the ids ``ByteTokenizer``
gives it.
"""

from __future__ import annotations


def byte_level_chars() -> list[str]:
    """The character the ``ByteLevel`` pre-tokenizer writes for each byte 0..255 (GPT-2's table:
    printable Latin-1 bytes stand for themselves, the rest for code points from 256 on, in order)."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """The ``tokenizer.json`` text of ``ByteTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from train.data.tokenizers import SPECIAL_TOKENS, ByteTokenizer

    vocab = {c: b for b, c in enumerate(byte_level_chars())}
    ids = (ByteTokenizer.pad_id, ByteTokenizer.bos_id, ByteTokenizer.eos_id)
    vocab.update(zip(SPECIAL_TOKENS, ids, strict=True))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()
