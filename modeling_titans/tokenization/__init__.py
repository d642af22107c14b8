"""Tokenizers for Titans.

- `TitansByteTokenizer`: the default, one token per UTF-8 byte (vocab 259), no vocabulary file.
- `train_byte_level_bpe`: learns a byte-level BPE `tokenizer.json` on your own text files (`titans tokenizer`).
"""

from .tokenization_titans import TitansByteTokenizer
from .train_bpe import train_byte_level_bpe

__all__ = ["TitansByteTokenizer", "train_byte_level_bpe"]
