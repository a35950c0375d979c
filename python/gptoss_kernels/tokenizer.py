"""The gpt-oss tokenizer (o200k_harmony) through openai-harmony, working offline (spec §5, §6.1).

openai-harmony reads the BPE table from ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` when that
variable is set, else from its download cache, else it downloads it. ``harmony_encoding()`` checks
this first and fails with a message that says what to set instead of hanging on a download.
Set ``GPTOSS_ALLOW_DOWNLOAD=1`` to let harmony download the file.
"""

from __future__ import annotations

import functools
import os
import tempfile

__all__ = ["TokenizerError", "harmony_encoding", "encode", "decode", "IncrementalDecoder",
           "ENDOFTEXT", "RETURN", "CALL", "END", "VOCAB_FILE", "VOCAB_URL"]

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
_RS_CACHE_NAME = "fb374d419588a4632f3f557e76b4b70aebbca790"   # SHA-1 of VOCAB_URL (harmony's cache name)

ENDOFTEXT = 199999   # <|endoftext|>: raw-completion stop
RETURN = 200002      # <|return|>: end of the final answer
END = 200007         # <|end|>: end of one message
CALL = 200012        # <|call|>: end of a tool call


class TokenizerError(RuntimeError):
    """The vocabulary cannot be loaded; the message says what to set."""


def _help() -> str:
    return (f"set TIKTOKEN_ENCODINGS_BASE to a folder that contains {VOCAB_FILE} (download it once from "
            f"{VOCAB_URL}), or set GPTOSS_ALLOW_DOWNLOAD=1 to let openai-harmony download it")


def vocab_source() -> str | None:
    """Where the vocab will come from without a download, or None."""
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base:
        return os.path.join(base, VOCAB_FILE)
    cache = os.path.join(os.environ.get("TIKTOKEN_RS_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "tiktoken-rs-cache"),
                         _RS_CACHE_NAME)
    return cache if os.path.exists(cache) else None


@functools.lru_cache(maxsize=1)
def harmony_encoding():
    """openai_harmony's HarmonyEncoding for gpt-oss (o200k_harmony)."""
    try:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    except ImportError as e:
        raise TokenizerError(f"the tokenizer needs the openai-harmony package ({e}): pip install openai-harmony") from e
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and not os.path.isfile(os.path.join(base, VOCAB_FILE)):
        raise TokenizerError(f"TIKTOKEN_ENCODINGS_BASE={base} has no file {VOCAB_FILE}: {_help()}")
    if vocab_source() is None and os.environ.get("GPTOSS_ALLOW_DOWNLOAD") != "1":
        raise TokenizerError(f"the gpt-oss vocabulary ({VOCAB_FILE}) is not available offline: {_help()}")
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # harmony raises its own error types (download, hash)
        raise TokenizerError(f"openai-harmony could not load the vocabulary ({e}): {_help()}") from e


def encode(text: str, *, allow_special: bool = True) -> list[int]:
    """Text -> token ids (special tokens written as text, e.g. ``<|start|>``, are kept when allowed)."""
    enc = harmony_encoding()
    return enc.encode(text, allowed_special="all") if allow_special else enc.encode(text, disallowed_special=())


def decode(ids) -> str:
    return harmony_encoding().decode(list(ids))


class IncrementalDecoder:
    """Streaming detokenization: ``push(id)`` returns the text that became complete (a multi-byte
    character split over tokens is held back until it is whole)."""

    def __init__(self):
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new
