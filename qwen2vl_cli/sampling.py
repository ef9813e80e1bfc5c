"""How the next token of every row is chosen, on the device: the sampling options, then
`choose` (repetition penalty, minimum length, then greedy or sampled), in the order of
transformers' logits processors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qwen2vl_cli import grammar


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen; the same fields and order as transformers' processors."""

    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_new_tokens: int = 0
    seed: int | None = None


def choose(logits: torch.Tensor, seen: torch.Tensor | None, young: torch.Tensor | bool | None, sampling: Sampling, eos: torch.Tensor,
           generator, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of every row, on the device. `seen`: the rows' tokens so far (repetition
    penalty); `young`: the rows still short of the minimum length, which may not end yet (True: all);
    `allowed`: the tokens each row's grammar lets it take (grammar.allowed's bitmask)."""
    if seen is not None:  # transformers' RepetitionPenaltyLogitsProcessor, as a mask
        p = sampling.repetition_penalty
        penalized = torch.where(logits < 0, logits * p, logits / p)
        logits = torch.where(seen[:, : logits.shape[-1]], penalized, logits)
    if young is True:  # no end before the minimum
        logits = logits.index_fill(1, eos, float("-inf"))
    elif young is not None:
        ends = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device).index_fill_(0, eos, True)
        logits = logits.masked_fill(young[:, None] & ends, float("-inf"))
    if allowed is not None:
        logits = grammar.apply(logits, allowed)  # in place: nothing reads these logits again
    if sampling.temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= (1 - sampling.top_p)
        drop[:, -1] = False  # keep at least one
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
