"""The decode engine: prefill through the transformers model, then one loop over a static KV cache.

Read top to bottom, as gpt-fast's generate.py: `prefill` (prefill.py) runs the whole model once (vision
tower, M-RoPE positions, the prompt into the cache; from a kept prefix, prefix_cache.py, only the
rest) and gives the first logits; `decode_one_token` (steps.py, with the ways a step is made) is
one step for every row (embed, the language model over the cache, the head); `choose` (sampling.py) picks
the next tokens on the device (repetition penalty, minimum length, a row's grammar, then greedy
or sampled); `Batch` is the loop as its caller drives it (`advance`, `join`, `cancel`; the step
made once, when the batch is), and the host reads the new tokens only every `chunk` steps: to
stream them, to see which rows ended, and to run the repetition guard. Only a row with a grammar
(grammar.py) has its token read every step, for its matcher.

Rows are independent: a row that ended keeps stepping on padding until its slot is taken again
or the batch ends, as in transformers' `generate`, whose greedy tokens this loop reproduces
(tests/test_decode.py). Every row is handed back as soon as it ends. Requests join a running batch
(continuous batching) in the slots ended rows leave: each is prefilled alone and its keys and values
are copied into its slot's first positions; all rows write their next token at one shared position,
and each row's mask and M-RoPE position keep it to its own tokens, so it gets the tokens it gets alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from qwen2vl_cli import grammar
from qwen2vl_cli.config import debug_enabled
from qwen2vl_cli.prefill import into_slot, pad_rows, prefill, prefill_alone, seat, stop_when
from qwen2vl_cli.prefix_cache import PrefixCache, Prompt, layers_of, signatures
from qwen2vl_cli.sampling import Sampling, choose
from qwen2vl_cli.steps import (
    GraphedStep,
    Rows,
    StepThreads,
    batch_bucket,
    cache_argument,
    cache_bucket,
    can_join,
    compile_or_eager,
    decode_one_token,
    show,
    static_cache,
)


@dataclass
class Outcome:
    """One row's result: its new tokens (padding after an end), and where the end was seen."""

    tokens: list[int]
    ended_at: int | None  # tokens up to and including the end-of-sequence token
    looped_at: int | None  # where the repetition guard stopped the row
    cancelled_at: int | None  # tokens the row had when its client went away
    ttft_s: float | None  # from the start of its prefill (for the first rows: less compiling and capturing)
    decode_tokens_per_s: float | None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass(frozen=True)
class Joining:
    """A request that joins a running batch: one prompt's processor inputs (batch of one, on the device)."""

    inputs: dict
    cancel: threading.Event
    max_new_tokens: int
    min_new_tokens: int = 0
    matcher: object = None  # its grammar's matcher (grammar.py), where its answer must follow one


@dataclass
class _Live:
    """What the host keeps for a row until it ends."""

    index: int  # the caller's rows first, then joined rows in the order they joined
    slot: int
    start: int  # the column of `out` with its first token
    limit: int  # its max_new_tokens
    minimum: int  # its min_new_tokens
    began: float  # when its prefill started
    cancel: threading.Event | None
    tokens: list[int] = field(default_factory=list)
    stop: bool = False  # Batch.cancel: stopped at the next read
    looped: int | None = None
    cancelled: int | None = None
    first_at: float | None = None
    first_len: int = 0  # tokens it had at its first read
    last_at: float | None = None
    ttft: float | None = None
    prompt: Prompt | None = None  # its tokens and media, where its keys and values are kept when it ends
    cached: int = 0  # its prompt's first tokens taken from the prefix cache


def _advance(rows: Rows, chosen: torch.Tensor, eos: torch.Tensor, pad: int) -> torch.Tensor:
    """Record the chosen tokens; a row that ended gets padding from then on. (A row that has all its
    tokens is ended by the host, which knows every row's length: no work on the device each step.)"""
    chosen = torch.where(rows.ended, torch.full_like(chosen, pad), chosen)
    rows.out.index_copy_(1, rows.step.view(1), chosen[:, None])
    rows.ended |= torch.isin(chosen, eos)
    if rows.seen is not None:
        rows.seen.scatter_(1, chosen[:, None], True)
    rows.step += 1
    return chosen


@dataclass(frozen=True)
class Update:
    """What one `Batch.advance` moved: (row, tokens so far, looped at) of every row with new
    tokens, and (row, outcome) of every row that ended."""

    moved: list[tuple[int, list[int], int | None]]
    ended: list[tuple[int, Outcome]]


class Batch:
    """A decode batch its caller drives: `advance()` runs the steps up to the next read and hands
    back what moved and what ended; between reads `join(row)` takes a request into a free slot
    (where `fits` says it has room) and `cancel(row)` stops one. The step (eager, windowed,
    compiled, captured) is made once, when the batch is, never inside the loop.

    The first rows come as one left-padded batch and are prefilled together; the host reads the
    new tokens only every `chunk` steps (and at a step where some row reaches its length): to
    stream them, to see which rows ended, and to run the repetition guard, never once a token.
    `guard(row, tokens)` says where a row loops (it is stopped there); a row whose event in
    `cancels` is set is stopped at the next read. Rows are numbered: the first ones, then each
    `join` in turn (one that failed keeps its number).

    `capacity`: slots for rows that join (filler rows where no request is), with a cache twice the
    first rows' prompt and answer; 0: no row joins. `graph`: on CUDA, replay the step as a CUDA
    graph; `compiled`: the step is inductor's. `graphed`, `compiled` and `setup_s` say afterwards
    whether the step could be captured and compiled, and how long making it took.
    """

    def __init__(
        self,
        model,
        inputs: dict,
        max_new_tokens: int | list[int],  # one for every row, or each row's own
        sampling: Sampling,
        eos_ids: list[int],
        pad_id: int,
        attn: str,
        chunk: int = 8,
        guard: Callable[[int, list[int]], int | None] | None = None,
        cancels: list[threading.Event] | None = None,
        graph: bool = False,
        compiled: bool = False,
        capacity: int = 0,
        min_new_tokens: list[int] | None = None,  # each row's own minimum (else the sampling's for every row)
        vision=None,  # a VisionCache: media seen before skip the vision tower
        prefixes: PrefixCache | None = None,  # prompts' and answers' keys and values: a prompt's kept prefix is not prefilled again
        matchers: list | None = None,  # each row's grammar matcher (grammar.py), None for a row whose answer is free
    ):
        self.vision, self.prefixes = vision, prefixes
        self.model, self.sampling, self.eos_ids, self.pad_id, self.attn = model, sampling, eos_ids, pad_id, attn
        self.chunk, self.guard = chunk, guard
        batch = inputs["input_ids"].shape[0]  # the caller's rows; a compiled or captured step may run more
        slots = max(batch, capacity)
        if graph or compiled:
            slots = batch_bucket(slots)
        first = inputs
        inputs = pad_rows(inputs, slots, pad_id)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        width = ids.shape[1]
        device = ids.device
        limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * batch
        minimums = [min(least, limit) for least, limit in zip(min_new_tokens or [sampling.min_new_tokens] * batch, limits)]
        longest = max(limits)
        length = (width + longest) * (2 if capacity else 1)  # room for rows that join, some wider
        self.length = length = cache_bucket(length) if graph or compiled else length
        self.cache = cache = static_cache(model, length)
        if not can_join(cache):  # a sliding window keeps no row's whole keys: nothing to keep or take
            self.prefixes = prefixes = None
        # A batch of one with no padding may start from a kept prefix (a joining row always may).
        prompts = signatures(model, first) if prefixes is not None else [None] * batch
        alone = batch == 1 and bool(first["attention_mask"].all())
        self.eos = torch.tensor(eos_ids, device=device)
        self.generator = None
        if sampling.temperature > 0 and sampling.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)
        elif sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        seen = None
        if sampling.repetition_penalty is not None and sampling.repetition_penalty != 1.0:
            vocab = model.lm_head.out_features
            seen = torch.zeros((slots, vocab + 1), dtype=torch.bool, device=device)
            seen.scatter_(1, ids.clamp(max=vocab), True)
        start = time.perf_counter()
        self.live = [_Live(index=r, slot=r, start=0, limit=limits[r], minimum=minimums[r], began=start, cancel=cancels[r] if cancels else None,
                           prompt=prompts[r]) for r in range(batch)]
        self.outcomes: list = [None] * batch  # an Outcome per row once it ends (or the exception that kept it from joining)
        self.done = 0  # steps taken: columns of `out` written
        with torch.inference_mode():
            with stop_when(model, cancels[:batch] if cancels else None):
                if slots == batch and not (alone and prefixes is not None) or not can_join(cache):
                    logits, deltas = prefill(model, inputs, cache, vision)
                else:  # the caller's rows alone (filler rows are not prefilled), then seated in the batch's cache
                    logits, deltas, own, self.live[0].cached = prefill_alone(model, first, vision, prefixes if alone else None,
                                                                             prompts[0] if alone else None)
                    seat(cache, own, slots)
                    del own
                    logits = torch.cat([logits, logits.new_zeros((slots - batch, logits.shape[1]))])
                    deltas = torch.cat([deltas, deltas.new_zeros((slots - batch, 1))])
            self.rows = Rows(
                attend=torch.cat([mask.bool(), torch.zeros((slots, length - width), dtype=torch.bool, device=device)], dim=1),
                text_position=mask.long().sum(dim=1),
                rope_deltas=deltas,
                seen=seen,
                ended=torch.arange(slots, device=device) >= batch,  # filler rows are over from the start
                step=torch.zeros((), dtype=torch.long, device=device),
                out=torch.full((slots, length - width + 1), pad_id, dtype=torch.long, device=device),
                cache_argument=cache_argument(model),
                start=torch.zeros(slots, dtype=torch.long, device=device),
                minimum=torch.tensor(minimums + [0] * (slots - batch), device=device),
            )
            self.matchers = {r: m for r, m in enumerate(matchers or ()) if m is not None}  # slot -> matcher, while its row lives
            self.tokens = self._choose(logits)
            self.done = 1
            self._step = self._make_step(graph, compiled, making=longest > 1 or capacity > 0)
        for r in self.live:
            r.began += self.setup_s  # the first rows' time to first token leaves the making of the step out
        self.free = list(range(batch, slots))
        self.position = width  # where the next step writes, in every slot
        self.joinable = capacity > 0 and can_join(cache)
        # A compiled step is specialised to the thread count it was compiled for: only eager steps change it.
        self._threads = StepThreads(self.tokens.device.type == "cpu" and not self.compiled)
        self._read_at: int | None = None  # the step count of the last read
        self._planned = self._needed = 0  # what the requests offered since the last read need (`fits`)

    def _make_step(self, graph: bool, compiled: bool, making: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """The step every `advance` runs, made once: captured, compiled, or eager (then reading only
        the cache positions written so far)."""
        model, rows, cache, attn = self.model, self.rows, self.cache, self.attn
        graphed = graph and self.tokens.device.type == "cuda" and making
        making = graphed or (compiled and making)  # a step to make before decoding (timed apart)
        setup_start = time.perf_counter()
        one_token = decode_one_token
        if compiled and making:
            one_token, compiled = compile_or_eager(model, rows, self.tokens, cache, attn)
        step: Callable[[torch.Tensor], torch.Tensor] = partial(one_token, model, rows, cache=cache, attn=attn)
        if one_token is decode_one_token and not graphed:  # eager: a step reads only the positions written
            whole, length = step, self.length

            def step(tokens: torch.Tensor) -> torch.Tensor:
                position = self.position
                if 4 * (length - position - 1) < length:  # under a quarter of the cache unwritten: slicing costs more than it saves
                    return whole(tokens)
                show(cache, position + 1)
                try:
                    return decode_one_token(model, rows, tokens, cache, attn, position + 1)
                finally:
                    show(cache, None)

        if graphed:
            try:
                step = GraphedStep(model, rows, self.tokens, cache, attn, one_token)
            except Exception:  # noqa: BLE001 - the step cannot be captured, or its replay is wrong: run it directly
                if debug_enabled():
                    import traceback

                    traceback.print_exc()
                graphed = False
        self.graphed, self.compiled = graphed, compiled
        self.setup_s = time.perf_counter() - setup_start if making else 0.0  # spent making the step, even when it failed
        return step

    def _young(self) -> torch.Tensor | bool | None:
        """The rows that may not end yet: None where no row is short of its minimum, True where all are."""
        short = [self.done - r.start < r.minimum for r in self.live]
        if not any(short):
            return None
        return True if all(short) else self.rows.step - self.rows.start < self.rows.minimum

    def _due(self) -> bool:
        done = self.done
        return done % self.chunk == 0 or done == 1 or any(done == r.start + r.limit for r in self.live)

    def advance(self) -> Update:
        """The steps up to the next read, then the read: the rows that moved and those that ended
        (their slots free for `join`). Nothing when no row is live."""
        with torch.inference_mode(), self._threads.steps() as timed:
            while self.live:
                if self._due() and self._read_at != self.done:
                    return self._read()
                if self.position >= self.length:  # every row's room was checked when it started: a bug if reached
                    raise RuntimeError(f"the decode loop ran past its cache ({self.length} positions)")
                logits = self._step(self.tokens)
                self.tokens = self._choose(logits)
                self.done += 1
                self.position += 1
                timed.stepped()
        return Update([], [])

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """Every row's next token, recorded; a row with a grammar takes only what it allows, and its
        matcher is handed the token at once (the mask is made on the host while a GPU runs the step)."""
        allowed = grammar.allowed(self.matchers, logits.shape[0], logits.shape[-1])
        chosen = choose(logits, self.rows.seen, self._young(), self.sampling, self.eos, self.generator, allowed)
        tokens = _advance(self.rows, chosen, self.eos, self.pad_id)
        if self.matchers:
            grammar.take(self.matchers, tokens.tolist())
        return tokens

    def _read(self) -> Update:
        rows, done = self.rows, self.done
        self._read_at = done
        ended, moved = _read(rows, self.live, done, self.guard)
        gone = []
        for r in [r for r in self.live if ended[r.slot] or done - r.start >= r.limit or r.looped is not None or r.cancelled is not None]:
            rows.ended[r.slot] = True  # padding from now on, until the slot is taken again
            self.live.remove(r)
            self.free.append(r.slot)
            self.matchers.pop(r.slot, None)
            self.outcomes[r.index] = _outcome(r, done, self.eos_ids)
            gone.append((r.index, self.outcomes[r.index]))
            if r.prompt is not None:
                self._keep(r, self.outcomes[r.index].ended_at)
        self._planned, self._needed = self.position, max((r.limit - (done - r.start) for r in self.live), default=0)
        return Update(moved, gone)

    def _keep(self, r: _Live, ended_at: int | None) -> None:
        """A row that ended: its prompt's and answer's keys and values into the prefix cache (the
        answer's tokens the cache holds: all but the last chosen, and none past its end)."""
        fed = self.done - r.start - 1
        n = min(fed, ended_at if ended_at is not None else fed, len(r.tokens))
        positions = self.rows.attend[r.slot].nonzero().squeeze(1)[: len(r.prompt.tokens) + n]
        self.prefixes.keep(r.prompt.extend(r.tokens[:n]), layers_of(self.cache, r.slot, positions))

    def open(self) -> bool:
        """Whether a request could join now: rows may join this batch, a slot is free and the cache has room."""
        return self.joinable and bool(self.free) and self.position < self.length

    def fits(self, width: int, max_new_tokens: int) -> bool:
        """Whether a request of this prompt width and answer length can join now: a free slot, and
        room for its prompt and answer and for every row already running or offered since the last
        read, wherever the widest prompt moves the write position (offers are counted together)."""
        if not self.open():
            return False
        if max(self._planned, width) + max(self._needed, max_new_tokens) > self.length:
            return False
        self._planned, self._needed = max(self._planned, width), max(self._needed, max_new_tokens)
        return True

    def join(self, joining: Joining) -> tuple[int, list[int]]:
        """A request into a free slot, at once (its prefill, its first token, read): its row number
        and its first tokens. What keeps it out (out of memory in its prefill, its client gone)
        is raised, its number kept with the exception in `outcomes`, and the batch goes on."""
        index = len(self.outcomes)
        self.outcomes.append(None)
        slot = self.free.pop()
        try:
            with torch.inference_mode():
                room = self.length - max((r.limit - (self.done - r.start) for r in self.live), default=0)
                self.position, joined = _take(self.model, self.rows, self.cache, slot, joining, room, self.position, self.done,
                                              self.sampling, self.eos, self.generator, self.vision, self.prefixes)
        except Exception as e:
            self.free.append(slot)
            self.outcomes[index] = e
            raise
        joined.index = index
        with torch.inference_mode():
            self.tokens[slot] = joined.tokens[0]
        self.live.append(joined)
        if joining.matcher is not None:
            self.matchers[slot] = joining.matcher
        return index, joined.tokens

    def cancel(self, row: int) -> None:
        """Stop a live row at the next read (as its cancel event would)."""
        for r in self.live:
            if r.index == row:
                r.stop = True


def _read(rows: Rows, live: list[_Live], done: int, guard) -> tuple[list[bool], list[tuple[int, list[int], int | None]]]:
    """The one read from the device per chunk: which slots ended, and (row, tokens so far, looped
    at) of each live row that moved. A row whose client went away, or that loops, is stopped here."""
    low = min((r.start + len(r.tokens) for r in live), default=done)
    new = rows.out[:, low:done].tolist()
    ended = rows.ended.tolist()
    now = time.perf_counter()
    moved, stop = [], []
    for r in live:
        got = new[r.slot][r.start + len(r.tokens) - low :]
        if got:
            r.tokens.extend(got)
            moved.append(r)
            if r.first_at is None:
                r.first_at, r.first_len, r.ttft = now, len(r.tokens), now - r.began
        r.last_at = now
        if r.cancelled is None and (r.stop or (r.cancel is not None and r.cancel.is_set())):
            r.cancelled = len(r.tokens)
            stop.append(r.slot)
        if guard is not None and r.looped is None and (at := guard(r.index, r.tokens)) is not None:
            r.looped = at
            stop.append(r.slot)
    if stop:
        rows.ended[stop] = True
    return ended, [(r.index, r.tokens, r.looped) for r in moved]


def _outcome(r: _Live, done: int, eos_ids: list[int]) -> Outcome:
    tokens = r.tokens[: r.limit]
    ended_at = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), None)
    steps = done - r.start - r.first_len  # steps run from its first read to its last
    rate = steps / (r.last_at - r.first_at) if steps > 0 and r.first_at is not None and r.last_at > r.first_at else None
    return Outcome(tokens, ended_at, r.looped, r.cancelled, r.ttft, rate, r.cached)


def _take(model, rows: Rows, cache, slot: int, joining: Joining, room: int, position: int, done: int, sampling: Sampling, eos, generator,
          vision=None, prefixes: PrefixCache | None = None):
    """A request joins the batch in `slot`: room made (the shared write position moves past a prompt
    wider than it), its prefill, its first token chosen and read. `room`: the last write position
    the running rows' answers allow. Returns the write position and the row."""
    rows_in, width = joining.inputs["input_ids"].shape
    limit, minimum = joining.max_new_tokens, min(joining.min_new_tokens, joining.max_new_tokens)
    if rows_in != 1 or limit < 1 or max(position, width) > room or max(position, width) + limit > rows.attend.shape[1]:
        raise ValueError("a request joins a running batch alone, with room for its answer")
    began = time.perf_counter()
    prompt = signatures(model, joining.inputs)[0] if prefixes is not None and bool(joining.inputs["attention_mask"].all()) else None
    with stop_when(model, [joining.cancel]):  # what may fail (memory, a client gone) comes before any move
        logits, cached = into_slot(model, rows, cache, slot, joining.inputs, vision, prefixes if prompt is not None else None, prompt)
    if width > position:  # every row's next write goes past its prompt; the gap stays masked
        for layer in cache.layers:
            layer.cumulative_length.fill_(width)
        position = width
    rows.minimum[slot] = minimum
    own = {0: joining.matcher} if joining.matcher is not None else {}
    first = choose(logits, None if rows.seen is None else rows.seen[slot : slot + 1], True if minimum else None, sampling, eos, generator,
                   grammar.allowed(own, 1, logits.shape[-1]))
    grammar.take(own, first.tolist())
    rows.out[slot, done - 1] = first[0]
    if rows.seen is not None:
        rows.seen[slot, first[0]] = True
    rows.ended[slot] = torch.isin(first, eos)[0] | (limit <= 1)
    value = int(first[0])  # read at once: its time to first token does not wait for the chunk
    row = _Live(index=-1, slot=slot, start=done - 1, limit=limit, minimum=minimum, began=began, cancel=joining.cancel, tokens=[value],
                prompt=prompt, cached=cached)
    row.first_at = row.last_at = time.perf_counter()
    row.first_len, row.ttft = 1, row.first_at - began
    return position, row


