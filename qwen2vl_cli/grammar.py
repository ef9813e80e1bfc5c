"""Answers that parse: a JSON Schema as a grammar that a constrained row's tokens follow.

llguidance (no dependencies; a 10-field schema compiles in about a millisecond and a mask takes
tens of microseconds: bench/RESULTS.md) says which tokens a row may take next; the engine masks
the others out of its logits before choosing (sampling.choose) and hands it each chosen token.
A row whose answer is complete may only end.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np
import torch

from qwen2vl_cli import schemas
from qwen2vl_cli.errors import UsageError

KEPT_SCHEMAS = 64  # compiled schemas kept, least recently used first out


class Grammars:
    """The model's tokenizer as llguidance takes it (made once, on first use), and a compiled
    matcher for each schema seen, kept by a hash of its text; each row gets a copy."""

    def __init__(self, tokenizer, vocab: int, eos_ids: list[int]):
        self._source = (tokenizer, vocab, eos_ids)
        self._tokenizer = None
        self._kept: OrderedDict[bytes, object] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, schema: str):
        """A fresh matcher at the start of `schema` (JSON Schema text); a schema llguidance cannot
        take is a UsageError naming why."""
        import llguidance

        key = hashlib.sha256(schema.encode()).digest()
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                tokenizer, vocab, eos_ids = self._source
                self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos_ids)
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                return kept.deep_copy()
        matcher = llguidance.LLMatcher(self._tokenizer, schemas.grammar(schema))
        if matcher.is_error():
            raise UsageError(f"--schema: {' '.join(matcher.get_error().split())}")
        with self._lock:
            self._kept[key] = matcher
            while len(self._kept) > KEPT_SCHEMAS:
                self._kept.popitem(last=False)
        return matcher.deep_copy()


def allowed(matchers: dict[int, object], rows: int, vocab: int) -> torch.Tensor | None:
    """The tokens each row may take next, as llguidance's bitmask (rows, words of 32 tokens) on
    the host: every token for a row without a matcher; None when no row has one."""
    if not matchers:
        return None
    import llguidance.numpy  # its torch module compiles its mask kernel with inductor on first use

    mask = np.full(llguidance.numpy.get_bitmask_shape(rows, vocab), -1, dtype=np.int32)
    for row, matcher in matchers.items():  # a complete answer's matcher, or one in error, allows only the end tokens
        llguidance.numpy.fill_next_token_bitmask(matcher, mask, row)
    return torch.from_numpy(mask)


_BITS = {}  # device -> the 32 bit positions of a mask word


def apply(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`logits` with the tokens `mask` leaves out at -inf (in place). On a CPU the words are
    unpacked by numpy in one call; elsewhere on the logits' device (32 times fewer bytes to send)."""
    vocab = logits.shape[-1]
    if logits.device.type == "cpu":
        blocked = np.unpackbits(mask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab] == 0
        return logits.masked_fill_(torch.from_numpy(blocked), float("-inf"))
    device = logits.device
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = mask.to(device, non_blocking=True)
    keep = ((words[:, :, None] >> bits) & 1).bool().flatten(1)[:, :vocab]
    return logits.masked_fill_(~keep, float("-inf"))


def take(matchers: dict[int, object], tokens: list[int]) -> None:
    """Each matcher's row took `tokens[row]`; a matcher whose answer ended takes no more."""
    for row, matcher in matchers.items():
        if not (matcher.is_stopped() or matcher.is_error()):
            matcher.consume_token(tokens[row])


class Logits:
    """The grammars as a logits processor for transformers' `generate` (--engine hf): each call
    hands every matcher its row's last token, then masks the scores."""

    def __init__(self, matchers: list, prompt_width: int):
        self.matchers = {row: m for row, m in enumerate(matchers) if m is not None}
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_width:
            take(self.matchers, input_ids[:, -1].tolist())
        return apply(scores, allowed(self.matchers, scores.shape[0], scores.shape[-1]))
