"""The `qvl` command line: Typer commands that validate, build a request, call the core and render.

No torch import here: `qvl --help` and `qvl inspect` start fast.
"""

from __future__ import annotations

import inspect as _inspect
import os
import sys
import traceback
import warnings
from dataclasses import replace
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from qwen2vl_cli import __version__, config as C, options as O
from qwen2vl_cli.answer import answer
from qwen2vl_cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, OutputClosed, UsageError, describe_exception


# Typer raises its click layer's ClickException for usage errors; find it without naming click.
_CLICK_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _flags_without_types(params: list) -> list:
    """Typer prints a flag's type in --help (`--json <bool>`), which reads as if it took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _ReaderGone:
    """A reader of stdout that went away (`qvl ... | head`), while help or a command writes: raised
    as OutputClosed, since click takes a BrokenPipeError for a failure (exit 1)."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)  # --help and --version write here
        except BrokenPipeError:
            raise OutputClosed() from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise OutputClosed() from None


class QvlCommand(_ReaderGone, TyperCommand):
    def get_params(self, ctx) -> list:
        return _flags_without_types(super().get_params(ctx))


class QvlGroup(_ReaderGone, TyperGroup):
    """The edge: every error becomes one line on stderr and a stable exit code."""

    def get_params(self, ctx) -> list:
        return _flags_without_types(super().get_params(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from qwen2vl_cli.render import print_error

        shown = warnings.showwarning
        if not C.debug_enabled():
            warnings.showwarning = _one_line_warning
        try:
            rv = super().main(args=args, prog_name=prog_name or "qvl", complete_var=complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except _CLICK_ERRORS as e:
            where = e.ctx.command_path if getattr(e, "ctx", None) is not None else self._named(args)
            if e.format_message():  # empty when the help was shown for a bare command
                print_error(f"{e.format_message()} (see `{where} --help`)")
            code = EXIT_USAGE
        except typer.Abort:
            code = EXIT_INTERRUPTED
        except OutputClosed:
            # The reader went away (`qvl ... | head`): it has what it wanted; stop quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 0
        except BaseException as e:  # noqa: BLE001 - the one place that maps everything to a message
            if isinstance(e, SystemExit):
                raise
            if C.debug_enabled():
                traceback.print_exc()
            message, code = describe_exception(e)
            print_error(message)
        finally:
            warnings.showwarning = shown
        if standalone_mode:
            sys.exit(code)
        return code

    def _named(self, args) -> str:
        """The command a usage error belongs to, where click's parser did not get as far as its context."""
        words = list(args) if args is not None else sys.argv[1:]
        name = next((w for w in words if not w.startswith("-")), None)  # the first word that is not an option
        return f"qvl {name}" if name in self.commands else "qvl"


app = typer.Typer(
    cls=QvlGroup,
    name="qvl",
    help="Describe images, animated GIFs and videos with Qwen2-VL, Qwen2.5-VL or Qwen3-VL. The answer goes to stdout, diagnostics to stderr.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"qvl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    pass


def _command(name: str, argument: _inspect.Parameter, groups: list, body, doc: str, no_args_is_help: bool = True) -> None:
    """Register `body(argument, **options)` as a Typer command whose options are the groups' options."""
    params = [argument] + [p for group in groups for p in O.params(group)]

    def command(**kwargs) -> None:
        body(kwargs.pop(argument.name), kwargs)

    # Typer reads the signature: one declaration per option, shared by every command that takes it.
    command.__signature__ = _inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    app.command(name=name, no_args_is_help=no_args_is_help, cls=QvlCommand)(command)


def _argument(name: str, annotation, default=_inspect.Parameter.empty) -> _inspect.Parameter:
    return _inspect.Parameter(name, _inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=default)


def _inspect_body(media: list[str] | None, options: dict) -> None:
    """Sizes, frames and token counts from headers and the model's settings; or a model summary."""
    from qwen2vl_cli import render
    from qwen2vl_cli.modelinfo import stamp_counter, vision_spec
    from qwen2vl_cli.pipeline import inspect as inspect_media

    model, device, json_out = O.take(O.inspect_options, options)
    opts = O.take(O.sizing_options, options)
    segment = O.take(O.segment_options, options)
    sheet_path = O.take(O.sheet_options, options)
    if not media and segment is not None:
        raise UsageError("--segment cuts a clip: give CLIP")
    if not media and sheet_path is not None:
        raise UsageError("--frames-sheet draws the frames of MEDIA: give MEDIA")
    if not media:
        if model is None:
            raise UsageError("give MEDIA to inspect, or --model M for a model summary")
        from qwen2vl_cli.summary import summarize

        summary = summarize(model)
        if json_out:
            render.print_json(summary)
        else:
            render.model_summary(summary)
        return
    resolved = C.guess_device() if device == "auto" else device
    spec = vision_spec(model)
    if spec is None:
        render.stderr_console().print(render.styled("note:", "yellow", f"{model} is not on this machine: using Qwen2-VL's default sizes"))
        spec = vision_spec(None)
    sized = replace(opts, cpu_budget=resolved == "cpu")
    count = stamp_counter(model) if spec.time_stamps else None
    sheet = None
    if sheet_path is not None:
        from qwen2vl_cli.sheet import Sheet

        sheet = Sheet(sheet_path)
    if segment is not None:
        from qwen2vl_cli import segments
        from qwen2vl_cli.records import window_fields

        shown, failed = segments.inspect(tuple(media), spec, sized, segment.segment, segment.overlap, count=count, sheet=sheet)
        if json_out:
            for w, p in shown:
                render.print_json({**window_fields(w), **p.to_dict()})
        elif shown:
            render.windows_table(shown)
    else:
        shown, failed = inspect_media(tuple(media), spec, sized, count=count, sheet=sheet)
        render.Reporter().inputs(shown, lines=False)
        if json_out:
            for p in shown:
                render.print_json(p.to_dict())
        elif shown:
            render.inspect_table(shown)
    if resolved == "cpu" and not opts.pixel_limits_given and shown:
        render.stderr_console().print("sized for CPU (smaller defaults); --device cuda shows GPU sizes", style="dim")
    if sheet is not None and len(sheet):
        sheet.save()
        render.Reporter().note(sheet.said())
    for error in failed:  # every input that could be read is shown; each one that could not is a line
        render.print_error(str(error))
    if failed:
        raise typer.Exit(EXIT_USAGE)


_ANSWER_GROUPS = [O.generation_options, O.sizing_options, O.runtime_options, O.output_options, O.each_options, O.endpoint_options]
_MEDIA_HELP = "Image, animated image or video: path, http(s):// URL, file:// URI, data: URI, or - for stdin."
_command(
    "describe",
    _argument("media", Annotated[Optional[list[str]], typer.Argument(metavar="MEDIA", help=_MEDIA_HELP + " Several go into one prompt, in order (with --each: one answer each).", show_default=False)], None),
    _ANSWER_GROUPS + [O.grounding_options, O.sheet_options],
    lambda media, options: answer(media, False, options),
    "Describe images, animated images or videos; the answer streams to stdout. --boxes finds things in an image.",
)
_command(
    "video",
    _argument("clip", Annotated[Optional[list[str]], typer.Argument(metavar="CLIP", help="Video or animated image: path, http(s):// URL, file:// URI, or - for stdin (several with --each).", show_default=False)], None),
    _ANSWER_GROUPS + [O.timeline_options, O.sheet_options],
    lambda clip, options: answer(clip, True, options),
    "Describe a video clip, sampled with the Qwen frame rules (2 frames per second by default). --segment: a record per window of the clip (a timeline; --format srt|vtt for subtitles).",
)
_command(
    "inspect",
    _argument("media", Annotated[Optional[list[str]], typer.Argument(metavar="MEDIA", help=_MEDIA_HELP, show_default=False)], None),
    [O.inspect_options, O.sizing_options, O.segment_options, O.sheet_options],
    _inspect_body,
    "Sizes, frames and token counts, without loading weights. With only --model: the model's summary.",
    no_args_is_help=False,
)

_command(
    "chat",
    _argument("media", Annotated[Optional[list[str]], typer.Argument(metavar="MEDIA", help="Images and videos for the first question (files or URLs); /image and /video add more later.", show_default=False)], None),
    [O.chat_generation_options, O.sizing_options, O.runtime_options, O.chat_options, O.chat_endpoint_options],
    lambda media, options: _chat(media, options),
    "A conversation about pictures and videos: each turn prefills only its own tokens. At a terminal a line editor (/help for its commands); with stdin piped, one turn per line.",
    no_args_is_help=False,
)


def _chat(media, options) -> None:
    from qwen2vl_cli.chat_ui import run

    run(media, options)


@app.command(cls=QvlCommand)
def serve(
    model: O.Model = C.DEFAULT_MODEL,
    served_model_name: Annotated[Optional[list[str]], typer.Option("--served-model-name", metavar="NAME", help="A name clients may ask for the model by (repeatable; /v1/models lists them, the first answers requests that name none). Default: the hub id, or a local directory's name.", show_default=False, rich_help_panel=O.SERVE_PANEL)] = None,
    device: O.Device = "auto",
    dtype: O.Dtype = "auto",
    attn: O.Attn = "auto",
    engine: O.Engine = "auto",
    quantize: O.Quantize = "none",
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to the network.", rich_help_panel=O.SERVE_PANEL)] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one; the address is printed).", rich_help_panel=O.SERVE_PANEL)] = 8000,
    api_key: O.ServeApiKey = None,
    batch_size: O.BatchSize = None,
    queue_size: Annotated[int, typer.Option(min=1, help="Requests that may wait; beyond that: 503.", rich_help_panel=O.SERVE_PANEL)] = 64,
    batching: Annotated[str, typer.Option(metavar="auto|continuous|fixed", help="continuous: requests join running batches (auto: on a GPU); fixed: a batch runs to its end.", rich_help_panel=O.SERVE_PANEL,
                                          autocompletion=O.complete("auto", "continuous", "fixed"))] = "auto",
    allowed_hosts: Annotated[Optional[list[str]], typer.Option("--allowed-hosts", metavar="NAME", help="Host names clients may use besides the listening address (repeatable; guards against DNS rebinding).", rich_help_panel=O.SERVE_PANEL)] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens one request may ask for; more is a 400.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = 4096,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(min=1, help="Most prompt tokens of one request, text and media (media are sized to fit); more is a 400. Default: 8192 on a CPU, else the model's context.", show_default=False, rich_help_panel=O.SERVE_LIMITS_PANEL)] = None,
    max_body: Annotated[str, typer.Option(metavar="SIZE", help="Largest request body (413 beyond it), e.g. 64M.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = "64M",
    max_media: Annotated[int, typer.Option(min=1, help="Most images and videos in one request.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = 16,
    max_visual_tokens: Annotated[int, typer.Option(min=1, help="Visual tokens of one request, all media together: qvl sizes them to fit.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = 16384,
    max_source_pixels: Annotated[int, typer.Option(min=1, help="Largest image or video frame as stored (width x height); for a video sent as frames, all its frames together.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = 50_000_000,
    max_frames: Annotated[int, typer.Option(min=2, help="Most frames of a video sent as frames (data:video/jpeg, as qvl --endpoint sends them).", rich_help_panel=O.SERVE_LIMITS_PANEL)] = 768,
    max_download: Annotated[str, typer.Option(metavar="SIZE", help="Most bytes fetched from one media URL.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = "256M",
    fetch_timeout: Annotated[float, typer.Option(min=1.0, metavar="SECONDS", help="Time for one media URL, from connecting to the last byte.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = 60.0,
    allow_urls_to: Annotated[Optional[list[str]], typer.Option("--allow-urls-to", metavar="CIDR", help="Let media URLs reach this network too (repeatable), e.g. 10.0.0.0/8. Default: public addresses only.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = None,
    allow_private_urls: Annotated[bool, typer.Option("--allow-private-urls", help="Let media URLs reach any address, loopback and private networks included.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = False,
    read_timeout: Annotated[float, typer.Option(min=0.1, metavar="SECONDS", help="Time for a request's headers to arrive (from connecting, or from the last answer), then for its body.", rich_help_panel=O.SERVE_LIMITS_PANEL)] = 30.0,
    max_connections: Annotated[Optional[int], typer.Option(min=1, help="Connections open at once; past it, the one longest without a request is closed (else the new one). Default: from the open-file limit, at most 4096.", show_default=False, rich_help_panel=O.SERVE_LIMITS_PANEL)] = None,
    cache_size: Annotated[Optional[str], typer.Option(metavar="SIZE", help="Room kept for what a later request can reuse: finished prompts' and answers' keys and values (a conversation's earlier turns, another question about the same picture), vision-tower outputs and decoded media, e.g. 512M; 0 turns them off. Default: 1G on a CPU, 2G on a GPU.", show_default=False, rich_help_panel=O.SERVE_PANEL)] = None,
    quiet: O.Quiet = False,
) -> None:
    """An OpenAI-compatible server: POST /v1/chat/completions (image_url, video_url, stream), GET /v1/models; GET /metrics (Prometheus) and GET /health."""
    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UsageError("qvl serve needs its extra: pip install 'qwen2vl-cli[serve]'")
    from qwen2vl_cli.render import Reporter
    from qwen2vl_cli.serve import serve as run_server  # imports fastapi
    from qwen2vl_cli.serve_requests import Limits
    from qwen2vl_cli.sources import parse_size

    batching = O.choice("batching", batching, ("auto", "continuous", "fixed"))
    limits = Limits(
        max_tokens=max_tokens,
        max_body_bytes=parse_size(max_body, "--max-body"),
        max_media=max_media,
        max_visual_tokens=max_visual_tokens,
        max_source_pixels=max_source_pixels,
        max_download=parse_size(max_download),
        fetch_deadline_s=fetch_timeout,
        allowed_networks=tuple(allow_urls_to or ()),
        allow_private_urls=allow_private_urls,
        max_prompt_tokens=max_prompt_tokens,
        read_timeout_s=read_timeout,
        max_connections=max_connections,
        max_frames=max_frames,
    )
    reporter = Reporter(quiet=quiet, stream=False)

    names = tuple(dict.fromkeys(served_model_name or ()))
    if any(not n.strip() or len(n) > 256 for n in names):
        raise UsageError("--served-model-name: give a name of 1 to 256 characters")
    from qwen2vl_cli.serve import served_names

    names = names or served_names(model)

    def announce(url: str) -> None:
        reporter.stop()
        shown = f" as {', '.join(names)}" if names != (model,) else ""
        reporter.console.print(f"qvl: serving {model}{shown} on {url} (Ctrl-C to stop)")

    runtime = replace(O.runtime_options(model, device, dtype, attn, engine, quantize),
                      cache_size=None if cache_size is None else parse_size(cache_size, "--cache-size"))  # None: the device's default
    run_server(runtime, host, port, api_key, batch_size, queue_size, reporter, announce,
               limits, tuple(allowed_hosts or ()), None if batching == "auto" else batching == "continuous", names)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning (Pillow's on odd files, say) as one line, like qvl's own notes."""
    from qwen2vl_cli.render import stderr_console, styled

    stderr_console().print(styled("note:", "yellow", " ".join(str(message).split())))


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if C.loading():
            # Weights still loading for a run that already ended (a bad input): nobody needs them,
            # and the interpreter would wait for the loading thread before exiting.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 1)
        raise
