"""Token-to-text helpers: incremental detokenization for stop strings, per-token text/bytes."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class IncrementalDetokenizer:
    """Decode generated ids one at a time without re-decoding the whole sequence each step.

    Text is only committed once it no longer ends in a partial UTF-8 character, and each
    step decodes only a short window (the algorithm vLLM uses), so the committed text is
    the same as decoding all ids at once.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: context that shapes how the next token decodes
        self._read = 0  # ids up to here are already in `text`

    def push(self, token_id: int) -> str:
        """Add one id; return the newly committed text (maybe empty)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        full_text = self._decode(self.ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            new = full_text[len(prefix_text) :]
            self.text += new
            self._prefix, self._read = self._read, len(self.ids)
            return new
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if ids else ""


def find_stop(text: str, new_len: int, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string that ends inside the last `new_len` characters."""
    if not stops or not new_len:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, len(text) - new_len - longest + 1)
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


class TokenTexts:
    """Display text and raw bytes of single tokens, for logprob entries."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._byte_level = _is_byte_level(tokenizer)
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._special = set(tokenizer.all_special_tokens)
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self._tok.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        piece = self._tok.convert_ids_to_tokens(token_id)
        if piece is None:
            return []
        if piece in self._special:
            return list(piece.encode())
        if self._byte_level and all(c in self._byte_decoder for c in piece):
            return [self._byte_decoder[c] for c in piece]
        if m := _SP_BYTE.match(piece):  # SentencePiece byte fallback
            return [int(m.group(1), 16)]
        if piece.startswith("\u2581"):  # SentencePiece word boundary
            piece = " " + piece[1:]
        return list(piece.replace("\u2581", " ").encode())


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:  # noqa: BLE001 - an unserializable tokenizer simply is not byte-level
        return False
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    return "ByteLevel" in kinds


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
