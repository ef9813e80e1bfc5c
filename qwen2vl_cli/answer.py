"""The body of `describe` and `video`: a request built from the options, answered here or by an
endpoint, and rendered; `--each` as records."""

from __future__ import annotations

import itertools
import sys
from contextlib import closing
from dataclasses import replace

import typer

from qwen2vl_cli import options as O
from qwen2vl_cli.errors import GenerationInterrupted, UsageError
from qwen2vl_cli.types import GenerationOptions, check_generation


def answer(sources: list[str] | None, require_video: bool, options: dict) -> None:
    """The body of `describe` and `video`: build the request, run it, render."""
    from qwen2vl_cli.backend import answers
    from qwen2vl_cli.render import Reporter, print_json
    from qwen2vl_cli.types import Request

    json_out, quiet = O.take(O.output_options, options)
    timeline = O.take(O.timeline_options, options) if "segment" in options else None
    each = O.records(O.take(O.each_options, options), timeline)
    endpoint = O.take(O.endpoint_options, options)
    boxes, draw = O.take(O.grounding_options, options) if "boxes" in options else (None, None)
    sheet = O.take(O.sheet_options, options)
    questions = list(options.get("prompt") or ())
    generation = O.take(O.generation_options, options)
    if boxes is not None:
        if generation.prompt is not None:
            raise UsageError("--boxes asks with the model's own grounding prompt: drop --prompt")
        if generation.schema is not None:
            raise UsageError("--boxes writes the model's own answer: drop --schema or --json-object")
        if draw is not None and each is not None:
            raise UsageError("--draw writes one picture: drop it with --each (the records carry the boxes)")
        generation = replace(generation, boxes=boxes.strip())
    gens = [check_generation(replace(generation, prompt=q)) for q in questions] if len(questions) > 1 else [generation]
    runtime = O.take(O.runtime_options, options)
    if len(gens) > 1:  # the first question's media and prompt are kept for the others (the caches' default size)
        runtime = replace(runtime, cache_size=None)
    request = Request(
        sources=tuple(sources or ()),
        media=O.take(O.sizing_options, options),
        generation=generation,
        runtime=runtime,
        require_video=require_video,
        draw=draw,
        endpoint=endpoint,
        sheet=sheet,
    )
    if endpoint is not None and request.media.resize is not None:
        raise UsageError("--resize is not sent to an endpoint: give --min-pixels and --max-pixels (the same number) instead")
    if endpoint is not None and sheet is not None:
        raise UsageError("--frames-sheet draws the frames decoded here; with --endpoint the server decodes them: drop one")
    if timeline is not None:
        _check_timeline(request, timeline, each, len(gens))
    elif each is not None and sheet is not None:
        raise UsageError("--frames-sheet draws one run's frames: drop it with --each (with --segment it draws each window's)")
    if each is not None:
        return answer_each(request, each, quiet, endpoint, gens[1:], timeline)
    if not request.sources:
        raise UsageError("give MEDIA to describe (or --each --from FILE)")
    if require_video and len(request.sources) > 1:
        raise UsageError("qvl video takes one CLIP; add --each for one answer per clip")
    reporter = Reporter(quiet=quiet, stream=not json_out and boxes is None and generation.schema is None)
    several = len(gens) > 1
    results = answers(request, gens, reporter)
    with closing(results):
        for n, gen in enumerate(gens):
            if several:
                reporter.question(gen.prompt, first=n == 0)
            try:
                result = next(results)
            except GenerationInterrupted:
                reporter.end_text()
                raise
            finally:
                reporter.stop()
            reporter.end_text()
            if request.runtime.engine in ("compiled", "graph") and endpoint is None and result.engine != request.runtime.engine and n == 0:
                reporter.note(f"--engine {request.runtime.engine}: the decode step could not be made here (QVL_DEBUG=1 says why); "
                              f"it ran as {result.engine}, with the same answer")
            if result.boxes is not None:
                reporter.boxes(result, draw, listed=not json_out)
            if result.structured and not json_out:
                print_json(result.data)  # whole, once complete: never half an object
            reporter.summary(result)
            if json_out:
                print_json({"question": gen.prompt, **result.to_dict()} if several else result.to_dict())


def _check_timeline(request, timeline, each, questions: int) -> None:
    """--segment's options beside the others."""
    if request.endpoint is not None:
        raise UsageError("--segment decodes each window's frames here and runs the model here: drop --endpoint")
    if not request.sources and not each.each:
        raise UsageError("give CLIP to cut into windows (or --each --from FILE)")
    if len(request.sources) > 1 and not each.each:
        raise UsageError("--segment cuts one CLIP; add --each for the windows of several")
    if timeline.summary and questions > 1:
        raise UsageError("--summary answers one question for the whole clip: give one -p (or --summary-prompt)")
    if timeline.summary and each.format in ("srt", "vtt"):
        raise UsageError(f"--summary is a record of its own, not a subtitle: drop it with --format {each.format} (or use jsonl or text)")


def answer_each(request, each, quiet: bool, endpoint=None, more: list[GenerationOptions] = (), timeline=None) -> None:
    """`--each`: one record per input, the model loaded once (or a remote engine, --concurrency at a
    time); with `timeline` (--segment), one per window of each clip, and with its summary one more."""
    from qwen2vl_cli import batch, records as files
    from qwen2vl_cli.render import BatchProgress, Reporter, print_error
    from qwen2vl_cli.sheet import Sheet

    if not request.sources and each.from_file is None:
        raise UsageError("--each needs inputs: give MEDIA, or --from FILE (- for stdin) with one source per line")
    sources = files.iter_sources(request.sources, each.from_file, each.null)
    first = next(sources, None)  # an empty list is said before any file is made or model loaded
    if first is None:
        raise UsageError(f"--from {each.from_file}: no sources in it (one per line; blank lines and # comments are skipped)")
    sources = itertools.chain([first], sources)
    records = files.RecordFile(each.resume or each.output, resume=each.resume is not None,
                               resumable=each.format == "jsonl") if (each.resume or each.output) else None
    progress = None

    def failed(record: dict) -> None:  # --format text: a failure is said on stderr, not written as a caption
        message, source = record["error"]["message"], record["source"]
        text = message if message.startswith(source) else f"{source}: {message}"
        if progress is not None:
            progress.failure(text)
        else:
            print_error(text)

    # Bound before any live display starts: records go to the real stdout, whatever it is.
    plain = files.sink_for(records, sys.stdout)

    def sink(line: str) -> None:
        if progress is not None and records is None:
            progress.above(lambda: plain(line))
        else:
            plain(line)

    emitter = batch.Emitter(sink, each.format, each.ordered, failed)
    tally = batch.Tally()
    try:
        reporter = Reporter(quiet=quiet, stream=False)
        try:
            if endpoint is not None:
                from qwen2vl_cli.endpoint import EndpointBackend

                backend = EndpointBackend(endpoint, request.runtime.model)
            else:
                from qwen2vl_cli.backend import LocalBackend

                backend = LocalBackend(request.runtime, reporter)
                for gen in [request.generation, *more]:
                    backend.check_generation(gen)
                if timeline is not None and timeline.summary_prompt is not None:
                    backend.check_text(timeline.summary_prompt, "--summary-prompt")
        finally:
            reporter.stop()
        sources_total = files.count_sources(request.sources, each.from_file, each.null) if timeline is None else None  # windows: not known yet
        progress = BatchProgress(quiet, total=None if sources_total is None else sources_total * (1 + len(more)))  # a record per question
        sheet = Sheet(request.sheet) if request.sheet is not None else None
        batch.run_each(
            sources,
            backend,
            request.media,
            request.generation,
            key=files.request_key(request.media, request.generation, request.runtime),
            batch_size=endpoint.concurrency * len(endpoint.urls) if endpoint else each.batch_size or batch.default_batch_size(backend.device),
            emitter=emitter,
            tally=tally,
            done=records.done if records is not None and each.resume else frozenset(),
            require_video=request.require_video,
            on_progress=lambda: progress.update(tally),
            more=[(gen, files.request_key(request.media, gen, request.runtime)) for gen in more],
            timeline=timeline,
            answered=records.answered if records is not None and each.resume else None,
            sheet=sheet,
        )
    finally:
        if progress is not None:
            progress.close(tally)
        if records is not None:
            records.close()
        if endpoint is not None and len(endpoint.urls) > 1 and progress is not None:
            Reporter(quiet=quiet).note("answered by " + ", ".join(f"{url} {n}" for url, n in backend.served()))
    if sheet is not None and len(sheet):
        sheet.save()
        Reporter(quiet=quiet).note(sheet.said("got"))
    if tally.failed:
        raise typer.Exit(1)
