"""The built-in LM's default tokenizer (UTF-8 bytes, ids 0-255) as a Hugging Face tokenizer.

An export of a byte-level run (``smoe_ds.convert``) saves it beside the weights, so the export
loads with ``AutoTokenizer.from_pretrained(dir)`` after ``import smoe_ds`` like any other model,
and tools that need a tokenizer (fine-tuning, pipelines) take it as they are. It maps a text to
its UTF-8 bytes exactly as the trainer's ``smoe_ds.data.ByteTokenizer`` does, with no special
tokens added. Padding uses byte 0 and relies on the attention mask, as the built-in LM is causal
(right padding never changes the real tokens' states).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizer


class SMoEByteTokenizer(PreTrainedTokenizer):
    """Each token is one byte, written as the character with that code point (latin-1)."""

    vocab_files_names: dict = {}  # nothing to save but tokenizer_config.json
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("pad_token", chr(0))
        kwargs.setdefault("padding_side", "right")
        super().__init__(**kwargs)

    @property
    def vocab_size(self) -> int:
        return 256

    def get_vocab(self) -> dict[str, int]:
        return {chr(i): i for i in range(256)}

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text.encode("utf-8").decode("latin-1"))

    def _convert_token_to_id(self, token: str) -> int:
        return ord(token)

    def _convert_id_to_token(self, index: int) -> str:
        return chr(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).encode("latin-1").decode("utf-8", errors="replace")

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple:
        return ()
