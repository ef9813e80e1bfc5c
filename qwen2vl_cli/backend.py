"""One seam for generation: `describe`, `video`, `--each` and `serve` talk to a Backend.

A backend prepares a request (sources in, whatever its engine takes out) and generates a batch of
prepared requests, streaming the answer of a batch of one; the callers only schedule. The local
backend keeps a model loaded here; the endpoint backend (endpoint.py) sends the same requests to
an OpenAI-compatible server.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from threading import Event
from typing import TYPE_CHECKING, BinaryIO, Protocol

from qwen2vl_cli import frames, grounding, media, schemas, segments
from qwen2vl_cli.config import LOADS
from qwen2vl_cli.errors import GenerationInterrupted, MediaError, QvlError, UsageError
from qwen2vl_cli.messages import build_messages
from qwen2vl_cli.modelinfo import locate_model
from qwen2vl_cli.pipeline import Hooks, Probed, check_boxes, cpu_budget_note, decode_all, decoded, is_out_of_memory, plan_all, probe_all
from qwen2vl_cli.sources import SourceResolver
from qwen2vl_cli.types import GenerationOptions, MediaOptions, Prepared, Request, Result, RuntimeOptions, Timeline

if TYPE_CHECKING:  # torch comes with them: loaded when a model is
    from qwen2vl_cli.rows import Row, Running
    from qwen2vl_cli.segments import Window


class Backend(Protocol):
    device: str  # where it generates ("endpoint" for a remote one): the default batch size follows it

    def prepare(self, sources: tuple[str, ...], opts: MediaOptions, gen: GenerationOptions, require_video: bool = False):
        """One request, checked and ready; safe to call from a worker thread."""

    def ask(self, prepared, gen: GenerationOptions):
        """The same media, prepared once, with another question (several -p)."""

    def generate(
        self, batch: list, gen: GenerationOptions, on_text: Callable[[str], None] | None = None, cancels: list[Event] | None = None
    ) -> list[Result | Exception]:
        """Results in the batch's order, or the exception of a row that could not run while the
        others did; `on_text` streams a batch of one; `cancels` stops rows."""


class LocalBackend:
    """A model loaded here, once: `describe` and `video` run a batch of one through it, `--each`
    and `qvl serve` many.

    A server bounds each request: `fetch` holds SourceResolver settings for URLs (its address
    policy and time limits), `max_source_pixels` refuses media stored larger than that before any
    pixel is decoded, and `max_visual_tokens` sizes a request that would cost more down to it.
    """

    def __init__(
        self,
        runtime: RuntimeOptions,
        hooks: Hooks,
        fetch: dict | None = None,
        max_source_pixels: int | None = None,
        max_visual_tokens: int | None = None,
        background: bool = False,
    ):
        """`background`: the weights load on a thread while the caller decodes its media (PyAV and
        Pillow release the GIL); the first `generate` waits for them."""
        from qwen2vl_cli.runner import Runner

        self.fetch = fetch or {}
        self.max_source_pixels = max_source_pixels
        self.max_visual_tokens = max_visual_tokens
        self._hooks = hooks

        hooks.stage(f"Finding {runtime.model}")
        model_dir = locate_model(runtime.model)
        self.runner = Runner(runtime)
        self.runner.load_processor(model_dir)
        self.spec = self.runner.vision_spec()
        self._loading = None
        if background:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qvl-load")
            self._loading = self._pool.submit(self.runner.load_model, model_dir)
            LOADS.add(self._loading)
            self._loading.add_done_callback(LOADS.discard)
        else:
            hooks.stage(self._loading_text())
            self.runner.load_model(model_dir)

    def _loading_text(self) -> str:
        r = self.runner
        return f"Loading {r.runtime.model} ({r.device}, {r.dtype}, {r.attn})"

    def ready(self) -> None:
        """The weights, once loaded in the background (their load error, if any, surfaces here)."""
        if self._loading is not None:
            if not self._loading.done():
                self._hooks.stage(self._loading_text())
            try:
                self._loading.result()
            finally:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._loading = None

    def close(self) -> None:
        """Stop waiting for weights nobody will use (an error before the first generate)."""
        if self._loading is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def resolver(self, opts: MediaOptions) -> SourceResolver:
        return SourceResolver(max_bytes=opts.max_download, **self.fetch)

    def sized(self, opts: MediaOptions) -> MediaOptions:
        """The options as this device takes them (smaller defaults on a CPU)."""
        return replace(opts, cpu_budget=self.runner.device == "cpu")

    def _decode(self, sources: tuple[str, ...], opts: MediaOptions, require_video: bool = False, resolver: SourceResolver | None = None,
                room: int | None = None, timings: list | None = None, rates: list | float | None = None):
        """Plans and pixels; `resolver` (closed here) may hold sources fetched ahead."""
        with resolver or self.resolver(opts) as resolver:
            return self.decode_probed(probe_all(resolver, sources, opts, require_video), opts, room, timings, rates)

    def decode_probed(self, probed: list[Probed], opts: MediaOptions, room: int | None = None, timings: list | None = None,
                      rates: list | float | None = None):
        """Plans and pixels of media already probed, within this backend's limits; `room`: the
        prompt tokens the media may take, markers included (a server's prompt bound less its text).
        A video sent as its frames (frames.py) keeps them, placed in time by its entry of `timings`
        (mm_processor_kwargs.video_metadata, in order) or else by its rate (`rates`: one for all, or
        one each), sized within its share of the room from its JPEG headers before any is decoded;
        the other media are sized to what they leave."""
        opts = self.sized(opts)
        self._check_sizes(probed)
        count = self.runner.count_tokens
        sent = [i for i, p in enumerate(probed) if p.source.frames is not None]
        if not sent:
            return self._plan_and_decode(probed, opts, room, self.max_visual_tokens)
        if timings is not None and len(timings) != len(sent):
            raise UsageError(f"mm_processor_kwargs.video_metadata: {len(timings)} entries for {len(sent)} videos sent as frames; give one each")
        if isinstance(rates, list) and len(rates) != len(sent):
            raise UsageError(f"mm_processor_kwargs.fps: {len(rates)} rates for {len(sent)} videos sent as frames; give one each")
        if len(sent) == sum(p.info.kind == "video" for p in probed):  # no video file here for the sampling options
            given = [k for k in ("nframes", "min_frames", "max_frames", "start", "end") if getattr(opts, k) is not None]
            if given or opts.seek != "exact":
                raise UsageError(f"mm_processor_kwargs.{(given or ['seek'])[0]}: videos sent as frames are taken as they are; leave it out")
        budget = [c for c in (self.max_visual_tokens, opts.max_visual_tokens, room) if c is not None]
        share = min(budget) // len(sent) if budget else None  # each sent video's part of the room
        fixed = {}
        for k, i in enumerate(sent):
            src = probed[i].source
            rate = rates[k] if isinstance(rates, list) else rates
            meta = frames.timing(timings[k] if timings is not None else None, len(src.frames), src.label, rate)
            fixed[i] = frames.plan(src.label, src.frames, meta, self.spec, opts, self.max_source_pixels or media.frame_limit() or 2**62,
                                   share, count)
        taken = sum(f.plan.tokens_with_markers for f in fixed.values())
        if room is not None and taken > room:
            raise MediaError(probed[sent[0]].source.label, f"its frames take {taken:,} prompt tokens, more than the {room:,} this request "
                                                           "has room for: send fewer frames")
        rest = [p for i, p in enumerate(probed) if i not in fixed]
        visual = sum(f.plan.visual_tokens for f in fixed.values())
        most = [c - visual for c in (self.max_visual_tokens, opts.max_visual_tokens) if c is not None]
        plans, loaded = self._plan_and_decode(rest, replace(opts, max_visual_tokens=None), None if room is None else room - taken,
                                              min(most) if most else None)
        plans, loaded = iter(plans), iter(loaded)
        out = [(fixed[i].plan, frames.load(fixed[i])) if i in fixed else (next(plans), next(loaded)) for i in range(len(probed))]
        return [p for p, _ in out], [ld for _, ld in out]

    def _plan_and_decode(self, probed: list[Probed], opts: MediaOptions, room: int | None, most: int | None):
        """Plans and pixels of probed files, within `room` prompt tokens and `most` visual tokens."""
        count = self.runner.count_tokens
        plans = plan_all(probed, self.spec, opts, count)
        left = None if room is None else room - 2 * len(probed)  # the room less each medium's two markers
        if probed and left is not None and left < len(probed):  # not even a token each
            raise UsageError(f"the text leaves room for {max(0, room)} prompt tokens of media: too few for {len(probed)} images and videos")
        caps = [c for c in (most, left) if c is not None]
        if caps and sum(p.visual_tokens for p in plans) > min(caps):
            cap = min(caps)
            plans = plan_all(probed, self.spec, replace(opts, max_visual_tokens=min(cap, opts.max_visual_tokens or cap)), count)
        return decode_all(probed, plans, opts, self.max_source_pixels, self.runner.media)

    def _check_sizes(self, probed: list[Probed]) -> None:
        for p in probed:
            if self.max_source_pixels is not None and p.info.width * p.info.height > self.max_source_pixels:
                raise MediaError(p.source.label, f"is {p.info.width}x{p.info.height}: over the {self.max_source_pixels:,} pixels allowed here")

    def windows(self, source: str, opts: MediaOptions, timeline: Timeline, gen: GenerationOptions, require_video: bool = False,
                wanted: Callable[[Window], bool] = lambda w: True) -> Iterator[tuple[Window, Prepared | MediaError | None]]:
        """--segment: the clip's windows in order, each with its request (what `prepare` makes of
        `--start a --end b`), the error that kept it from being read, or None where `wanted` says
        no. The frames come from one pass over the file, each window as soon as its own are in;
        what keeps the whole clip from being cut is raised."""
        with self.resolver(opts) as resolver:
            [probed] = probe_all(resolver, (source,), opts, require_video)
            self._check_sizes([probed])
            cut = segments.plan_windows(probed, self.spec, self.sized(opts), timeline.segment, timeline.overlap, self.runner.count_tokens)
            chosen = [(w, plan) for w, plan in cut if wanted(w)]
            start = time.perf_counter()
            loads = media.load_windows(probed.source, probed.info, [plan for _, plan in chosen], opts.seek == "keyframe", self.max_source_pixels)
            taken = {w.index for w, _ in chosen}
            for w, plan in cut:
                if w.index not in taken:
                    yield w, None
                    continue
                loaded = next(loads)
                if isinstance(loaded, MediaError):
                    yield w, loaded
                else:
                    plan = decoded(plan, loaded)
                    yield w, Prepared((plan,), (loaded,), self.prompt([plan], gen), time.perf_counter() - start)
                start = time.perf_counter()

    def without_control(self, text: str) -> str:
        """Model output to be read back as a prompt (--summary's window answers): the chat
        template's control tokens it spelled out, taken out."""
        return self.runner.without_control(text)

    def prepare_text(self, text: str, gen: GenerationOptions) -> Prepared:
        """A request of text alone (--summary's over the windows' answers), which must leave the
        answer room in the model's context."""
        prepared = Prepared((), (), self.prompt([], replace(gen, prompt=text)))
        tokens, context = self.runner.count_tokens(prepared.text), self.runner.context_tokens
        if tokens + gen.max_new_tokens > context:
            raise UsageError(f"the summary's request takes {tokens:,} tokens and its answer up to {gen.max_new_tokens:,}, over the model's "
                             f"context of {context:,}: give a longer --segment or a smaller --max-new-tokens")
        return replace(prepared, prompt_tokens=tokens)

    def check_text(self, text: str, what: str) -> None:
        """Text is text: valid Unicode, and none of the chat template's control tokens, which the
        tokenizer would read as those tokens (a forged `<|im_start|>system` turn, an `<|image_pad|>`
        with no image)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UsageError(f"{what}: not valid Unicode text (a lone surrogate at character {e.start})") from None
        if (token := self.runner.control_token_in(text)) is not None:
            raise UsageError(f"{what}: holds {token}, a control token of the chat template that the model would read as one: remove it")

    def text_tokens(self, chat: list[dict]) -> int:
        """The prompt tokens of a conversation besides its media (`{"type": "media"}` parts)."""
        typed = _typed(chat, itertools.repeat("image"))
        media = sum(part["type"] == "image" for m in typed if not isinstance(m["content"], str) for part in m["content"])
        return self.runner.count_tokens(self.runner.prompt_text(typed)) - PLACEHOLDER_TOKENS * media

    def check_options_text(self, gen: GenerationOptions) -> None:
        """The texts the user gave on the command line, checked as message text is."""
        for what, text in (("--prompt", gen.prompt), ("--system", gen.system), ("--boxes", gen.boxes)):
            if text is not None:
                self.check_text(text, what)

    def check_generation(self, gen: GenerationOptions) -> None:
        """The command line's generation options against this model: its texts, and an answer that fits its context."""
        self.check_options_text(gen)
        context = self.runner.context_tokens
        if gen.max_new_tokens > context:
            raise UsageError(f"--max-new-tokens {gen.max_new_tokens}: over the model's context of {context:,} tokens; give at most that")

    def prompt(self, plans, gen: GenerationOptions) -> str:
        """The prompt text; with --boxes, the family's own grounding request for one image."""
        self.check_options_text(gen)
        if gen.boxes is not None:
            check_boxes([(p.source, p.kind) for p in plans], gen)
            gen = replace(gen, prompt=grounding.prompt(self.runner.family, gen.boxes))
        return self.runner.prompt_text(build_messages(plans, gen))

    @property
    def device(self) -> str:
        return self.runner.device

    def prepare(self, sources: tuple[str, ...], opts: MediaOptions, gen: GenerationOptions, require_video: bool = False) -> Prepared:
        """Everything before the model for one request (its media in one prompt); safe on a worker thread."""
        start = time.perf_counter()
        plans, loaded = self._decode(tuple(sources), opts, require_video)
        return Prepared(tuple(plans), tuple(loaded), self.prompt(plans, gen), time.perf_counter() - start)

    def ask(self, prepared: Prepared, gen: GenerationOptions) -> Prepared:
        """The same media with another question: nothing decoded again."""
        return replace(prepared, text=self.prompt(prepared.plans, gen), media_s=0.0)

    def prepare_chat(
        self, chat: list[dict], urls: list[str], opts: MediaOptions, gen: GenerationOptions, resolver: SourceResolver | None = None,
        room: int | None = None, timings: list | None = None, rates: list | float | None = None,
    ) -> Prepared:
        """A whole conversation whose media parts are `{"type": "media"}` placeholders for `urls`, in
        order; its media sized to take at most `room` prompt tokens (None: no bound); `timings` and
        `rates`: what places the videos sent as frames in time (decode_probed)."""
        start = time.perf_counter()
        plans, loaded = self._decode(tuple(urls), opts, resolver=resolver, room=room, timings=timings, rates=rates)
        return replace(self.conversation(chat, plans, loaded), media_s=time.perf_counter() - start)

    def conversation(self, chat: list[dict], plans: list, loaded: list) -> Prepared:
        """A conversation whose media parts are `{"type": "media"}` placeholders for media already
        decoded, in order (`qvl chat` keeps them from turn to turn), with its prompt tokens counted."""
        text = self.runner.prompt_text(_typed(chat, (p.kind for p in plans)))
        tokens = self.runner.count_tokens(text) + sum(p.tokens_with_markers - PLACEHOLDER_TOKENS for p in plans)
        return Prepared(tuple(plans), tuple(loaded), text, 0.0, tokens)

    @property
    def streams_batches(self) -> bool:
        """Whether `generate` streams every row of a batch (`on_texts`) and a batch `start`ed takes
        rows that join it as others end, or a batch of one streams and none joins (--engine hf)."""
        return self.runner.streams_batches

    def generate(self, batch: list[Prepared], gen: GenerationOptions, on_text=None, cancels=None, on_texts=None) -> list[Result | Exception]:
        """One batch through the model, each row's result or the exception that kept it from running
        (its inputs could not be built; the other rows run). `on_text` streams the answer of a batch of one
        (what fails is raised); `on_texts` (where `streams_batches`) one callback per row, None for a
        row that is not streamed; setting a row's event in `cancels` stops that row (its client went away)."""
        from qwen2vl_cli.rows import Row, generate

        self.ready()
        if on_text is not None:
            on_texts = [on_text]
        rows = [Row(p.text, list(p.loaded), gen, cancels[i] if cancels else None, on_texts[i] if on_texts else None) for i, p in enumerate(batch)]
        results = [self.finish(p, r, gen) for p, r in zip(batch, generate(self.runner, rows))]
        if on_text is not None and isinstance(results[0], Exception):
            raise results[0]
        return results

    def start(self, rows: list[Row], capacity: int = 0) -> Running:
        """A batch of these rows, running: its caller advances it and, within `capacity` rows
        (continuous batching, where `streams_batches`), joins others as rows end."""
        from qwen2vl_cli.rows import Running

        self.ready()
        return Running(self.runner, rows, capacity)

    def finish(self, prepared: Prepared, result: Result | Exception, gen: GenerationOptions, whole_json: bool = True) -> Result | Exception:
        """A row's Result as the request's: its plans, the time its media took, with --boxes the
        boxes read from the answer, with --schema its JSON; an exception stays one. `whole_json`:
        an answer whose JSON was cut off is an error (the CLI's rule; a server answers it with
        finish_reason length, as OpenAI does)."""
        if isinstance(result, Exception):
            return result
        found = grounding.read(self.runner.family, result.text, prepared.plans[0], gen.boxes) if gen.boxes else None
        result = replace(result, inputs=tuple(prepared.plans), media_s=prepared.media_s + (result.media_s or 0.0),
                         boxes=found.boxes if found else None, box_problems=found.problems if found else ())
        return schemas.structured(result, gen, whole_json) if gen.schema is not None else result


# The chat template writes <|vision_start|><|image_pad|><|vision_end|> (or <|video_pad|>) for a
# medium; the processor replaces all three with the medium's tokens_with_markers.
PLACEHOLDER_TOKENS = 3


def _typed(chat: list[dict], kinds) -> list[dict]:
    """The conversation with its `{"type": "media"}` parts typed as `kinds` says, in order."""
    kinds = iter(kinds)
    return [
        m if isinstance(m["content"], str)
        else {**m, "content": [{"type": next(kinds)} if part["type"] == "media" else part for part in m["content"]]}
        for m in chat
    ]


def answers(request: Request, gens: list[GenerationOptions], hooks: Hooks, stdin: BinaryIO | None = None) -> Iterator[Result]:
    """`describe` and `video`: one answer about the request's media for each of `gens` (several
    -p), in turn, as each ends; through the endpoint where the request names one (endpoint.py).
    Here, the media are probed before the model is looked for (a bad file fails before any
    download), decoded once while the weights load, and (where the runner keeps them) their
    vision outputs and the prompt's keys and values serve every later question. Out of memory
    before the first token (vision tower, prefill): once more at half the visual tokens, saying so.
    """
    if request.endpoint is not None:
        from qwen2vl_cli.endpoint import answers as remote

        yield from remote(request, gens, hooks)
        return
    with SourceResolver(stdin=stdin, max_bytes=request.media.max_download) as resolver:
        hooks.stage("Reading media")
        probed = probe_all(resolver, request.sources, request.media, request.require_video)
        check_boxes([(p.source.label, p.info.kind) for p in probed], request.generation)
        backend = LocalBackend(request.runtime, hooks, background=True)
        try:
            for gen in gens:
                backend.check_generation(gen)  # the tokenizer is in: a bad -p fails before any decoding
            hooks.stage("Decoding media")
            start = time.perf_counter()
            plans, loaded = backend.decode_probed(probed, request.media)
            media_s = time.perf_counter() - start
            hooks.inputs(plans)
            if note := cpu_budget_note(probed, plans, backend.spec, backend.sized(request.media)):
                hooks.note(note)
            if request.sheet is not None:
                _draw_sheet(request.sheet, plans, loaded, hooks)
            if len(gens) > 1:
                yield from together(backend, plans, loaded, gens, hooks, media_s)
                return
            result = _generate_or_shrink(backend, probed, plans, loaded, request, hooks, media_s)
            if request.draw is not None:
                grounding.save_drawing(probed[0].source, result.boxes or (), request.draw)
            yield result
        finally:
            backend.close()


def _draw_sheet(path: str, plans, loaded, hooks: Hooks) -> None:
    """--frames-sheet: the frames the model is about to get, drawn before it runs."""
    from qwen2vl_cli.sheet import Sheet

    sheet = Sheet(path)
    for plan, pixels in zip(plans, loaded):
        sheet.add(plan, pixels)
    sheet.save()
    hooks.note(sheet.said())


def together(backend: LocalBackend, plans, loaded, gens: list[GenerationOptions], hooks: Hooks, media_s: float) -> Iterator[Result]:
    """Several questions of the same media in one batch: the first is prefilled (its prompt kept),
    the others join at once and take the prompt up to their question from the cache, and all
    decode together. Answers are handed back in order; one's text streams while it is the one
    shown, the others' is held until theirs is."""
    from qwen2vl_cli.rows import Row

    backend.ready()
    hooks.stage("Encoding media and reading the prompt")
    prepared = [Prepared(tuple(plans), tuple(loaded), backend.prompt(plans, gen), media_s if n == 0 else 0.0) for n, gen in enumerate(gens)]
    held: list[list[str] | None] = [None] + [[] for _ in gens[1:]]  # None: shown as it comes

    def on_text(n: int) -> Callable[[str], None]:
        def text(chunk: str) -> None:
            if held[n] is None:
                hooks.text(chunk)
            else:
                held[n].append(chunk)
        return text

    rows = [Row(p.text, list(p.loaded), gen, on_text=on_text(n)) for n, (p, gen) in enumerate(zip(prepared, gens))]
    question = {id(row): n for n, row in enumerate(rows)}
    waiting, done, shown = list(rows), {}, 0
    running = None
    try:
        while shown < len(gens):
            if shown in done:
                result = backend.finish(prepared[shown], done.pop(shown), gens[shown])
                if isinstance(result, Exception):
                    raise result
                yield result
                shown += 1
                if shown < len(gens):
                    for chunk in held[shown]:
                        hooks.text(chunk)
                    held[shown] = None
                continue
            if running is None or not running.live:  # the first question, or those that could not join (transformers' generate)
                running = backend.start([waiting.pop(0)], capacity=len(waiting) + 1)
            for number, generation in running.advance():
                done[question[id(running.rows[number])]] = generation
            while waiting and running.open() and running.fits(waiting[0]):
                running.join(waiting.pop(0))
    except KeyboardInterrupt:
        raise GenerationInterrupted("") from None


def _generate_or_shrink(backend: LocalBackend, probed, plans, loaded, request: Request, hooks: Hooks, media_s: float) -> Result:
    streamed: list[str] = []

    def on_text(chunk: str) -> None:
        streamed.append(chunk)
        hooks.text(chunk)

    def attempt(plans, loaded) -> Result:
        prepared = Prepared(tuple(plans), tuple(loaded), backend.prompt(plans, request.generation), media_s)
        backend.ready()  # its own stage while the weights load; then what the model does first
        compiling = "; compiling the decode step (the first time for this size)" if backend.runner.engine == "compiled" else ""
        hooks.stage("Encoding media and reading the prompt" + compiling)
        return backend.generate([prepared], request.generation, on_text=on_text)[0]

    try:
        return attempt(plans, loaded)
    except Exception as e:
        if not is_out_of_memory(e) or streamed:
            raise
    total = sum(p.visual_tokens for p in plans)
    half = max(1, total // 2)
    hooks.note(f"out of memory with {total} visual tokens: trying again with --max-visual-tokens {half}")
    del loaded
    _free_memory(backend.device)
    start = time.perf_counter()
    plans, loaded = backend.decode_probed(probed, replace(request.media, max_visual_tokens=half))
    media_s = time.perf_counter() - start
    try:
        return attempt(plans, loaded)
    except Exception as e:
        if not is_out_of_memory(e) or streamed:
            raise
    raise QvlError(
        f"out of memory even with {half} visual tokens: try --max-visual-tokens {max(1, half // 2)}, or a smaller --max-new-tokens"
    )


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
