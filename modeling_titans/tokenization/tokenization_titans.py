"""The default Titans tokenizer: UTF-8 bytes, no vocabulary file.

Ids: 0 `<pad>`, 1 `<s>` (bos), 2 `</s>` (eos), and byte b at id b + 3, so the vocabulary has 259 entries (the
`vocab_size` of the `tiny` and `small` presets). Every string in every language is a byte sequence, so
`decode(encode(text), skip_special_tokens=True) == text` holds exactly; there is no unknown token.

This file imports only `transformers` and the standard library: it is copied flat into Hub repositories and
loaded there with `trust_remote_code=True`.
"""

from transformers import AddedToken, PythonBackend

NUM_SPECIAL_TOKENS = 3  # <pad>, <s>, </s> take ids 0, 1, 2; byte b is id b + NUM_SPECIAL_TOKENS


class TitansByteTokenizer(PythonBackend):
    """Byte-level tokenizer: one token per UTF-8 byte, plus `<pad>`, `<s>` and `</s>`.

    Choices (all HF keyword arguments, saved by `save_pretrained`):
    - `add_bos_token`, `add_eos_token` (default: bos yes, eos no): with `add_special_tokens=True` (the default)
      a text becomes `<s> bytes`, as for Llama. A prompt then looks like the start of a training document,
      and generation is not cut short by an `</s>` at the prompt's end; training data appends `</s>` at each
      document's end itself.
      Both settings are stored as transformers' `special_tokens_pattern` ("bos", "bos_eos", "eos" or "none").
    - `split_special_tokens=True`: the text "<s>" is encoded as its three bytes, never as the bos id, so any
      text (HTML's `<s>` tag included) round-trips. Pass `split_special_tokens=False` to parse them instead.
    - `padding_side="left"`: batched `generate()` needs the prompts to end at the same column; Titans models
      take left or right padding in training alike.
    - Decoding uses `errors="replace"`: ids sampled by a model can form invalid UTF-8 (a lone continuation byte,
      a character cut in half); such bytes decode to U+FFFD instead of raising.

    Tokens are one-character strings: byte b is `chr(b)` (the ByT5 convention), so `tokenize("hé")` is
    `['h', 'Ã', '©']` (the two bytes of "é").
    """

    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=None,
        add_eos_token=None,
        split_special_tokens=True,
        **kwargs,
    ):
        # Pin the special tokens to ids 0..2 before the base class would append them after the bytes.
        self._added_tokens_decoder = {
            token_id: AddedToken(str(token), special=True, normalized=False)
            for token_id, token in enumerate((pad_token, bos_token, eos_token))
        }
        # A flag left at None keeps the saved setting (`special_tokens_pattern`, see below); new: bos only.
        saved_pattern = kwargs.pop("special_tokens_pattern", "bos")
        if add_bos_token is None:
            add_bos_token = saved_pattern in ("bos", "bos_eos")
        if add_eos_token is None:
            add_eos_token = saved_pattern in ("eos", "bos_eos")
        special_tokens_pattern = _special_tokens_pattern(add_bos_token, add_eos_token)
        super().__init__(
            pad_token=pad_token,
            bos_token=bos_token,
            eos_token=eos_token,
            split_special_tokens=split_special_tokens,
            special_tokens_pattern=special_tokens_pattern,
            **kwargs,
        )
        # PythonBackend consumes `special_tokens_pattern` before the base class records its init kwargs, and
        # save_pretrained drops `add_bos_token`/`add_eos_token`; recording the pattern makes it persist.
        self.init_kwargs["special_tokens_pattern"] = special_tokens_pattern

    @property
    def add_bos_token(self) -> bool:
        return self.special_tokens_pattern in ("bos", "bos_eos")

    @property
    def add_eos_token(self) -> bool:
        return self.special_tokens_pattern in ("eos", "bos_eos")

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL_TOKENS + 256

    def get_vocab(self) -> dict[str, int]:
        vocab = {chr(byte): byte + NUM_SPECIAL_TOKENS for byte in range(256)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [chr(byte) for byte in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) != 1 or ord(token) > 255:
            raise ValueError(f"{token!r} is not a byte token of TitansByteTokenizer (a character U+0000..U+00FF).")
        return ord(token) + NUM_SPECIAL_TOKENS

    def _convert_id_to_token(self, index: int) -> str:
        if not NUM_SPECIAL_TOKENS <= index < self.vocab_size:
            raise ValueError(f"Token id {index} is outside the vocabulary (0..{self.vocab_size - 1}).")
        return chr(index - NUM_SPECIAL_TOKENS)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        text_bytes = bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:  # special or user-added token: its text
                text_bytes += token.encode("utf-8")
            else:
                text_bytes.append(ord(token))
        return text_bytes.decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()  # the vocabulary is the 256 byte values: nothing to write


def _special_tokens_pattern(add_bos_token: bool, add_eos_token: bool) -> str:
    """The transformers v5 `special_tokens_pattern` that adds bos and/or eos around a sequence."""
    return {(True, True): "bos_eos", (True, False): "bos", (False, True): "eos", (False, False): "none"}[
        (bool(add_bos_token), bool(add_eos_token))
    ]


__all__ = ["TitansByteTokenizer"]
