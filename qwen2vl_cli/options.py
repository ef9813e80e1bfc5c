"""Options shared by several commands: declared once as Annotated aliases, and gathered into the
groups (each a signature) the commands are assembled from, each group making its part of a request."""

from __future__ import annotations

import inspect as _inspect
import re
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from qwen2vl_cli import config as C
from qwen2vl_cli.devices import ATTNS, DEVICES, DTYPES, ENGINES, QUANTIZE
from qwen2vl_cli.errors import UsageError
from qwen2vl_cli.types import EndpointOptions, GenerationOptions, MediaOptions, RuntimeOptions, Timeline, check_generation

MEDIA_PANEL = "Image sizing"
VIDEO_PANEL = "Video frames"
GEN_PANEL = "Generation"
RUN_PANEL = "Model and device"
OUT_PANEL = "Output"
GROUND_PANEL = "Grounding"

Model = Annotated[
    str,
    typer.Option("--model", "-m", envvar=C.ENV_MODEL, help="Hub id or local model directory.", rich_help_panel=RUN_PANEL),
]
def complete(*values: str):
    """Shell completion of an option's fixed values (`qvl --install-completion`)."""
    return lambda incomplete: [v for v in values if v.startswith(incomplete)]


Device = Annotated[
    str,
    typer.Option(envvar=C.ENV_DEVICE, help="auto | cuda | cpu | mps. auto: CUDA, else MPS, else CPU.", rich_help_panel=RUN_PANEL,
                 autocompletion=complete(*DEVICES)),
]
Dtype = Annotated[
    str,
    typer.Option(
        envvar=C.ENV_DTYPE,
        autocompletion=complete(*DTYPES),
        help="auto | bfloat16 | float16 | float32. auto: bfloat16 on GPUs that have it, else float16; on CPUs bfloat16 only with native support (AVX-512 BF16, AMX), else float32.",
        rich_help_panel=RUN_PANEL,
    ),
]
Attn = Annotated[
    str,
    typer.Option(
        envvar=C.ENV_ATTN,
        autocompletion=complete(*ATTNS),
        help="auto | flash_attention_2 | sdpa | eager. auto: flash_attention_2 on Ampere+ GPUs with flash-attn installed, else sdpa.",
        rich_help_panel=RUN_PANEL,
    ),
]
Engine = Annotated[
    str,
    typer.Option(
        envvar="QVL_ENGINE",
        autocompletion=complete(*ENGINES),
        help="auto | static | compiled | graph | hf. static: qvl's decode loop over a static KV cache, reading tokens back a chunk at a time; compiled: the same with its step compiled by inductor (tens of seconds the first time per shape, seconds once cached; on CUDA also a CUDA graph); graph: the eager step replayed as a CUDA graph (CUDA only); hf: transformers' generate (the reference). auto: graph on CUDA, static elsewhere, hf with flash_attention_2.",
        rich_help_panel=RUN_PANEL,
    ),
]

Quantize = Annotated[
    str,
    typer.Option(
        envvar="QVL_QUANTIZE",
        autocompletion=complete(*QUANTIZE),
        help="none | int8 | int4. The language model's weights, quantized while loading. int8 on an x86 CPU: its linear layers, head and embeddings a byte a weight (qvl's int8 kernel, built at first use with the machine's C compiler; PyTorch's fbgemm without one), the vision tower kept at the checkpoint's precision: about a quarter of float32's memory, decoding about 2.6x as fast. On CUDA: int8 or int4 weight-only with torchao (the quantize extra), the vision tower as it is.",
        rich_help_panel=RUN_PANEL,
    ),
]

Prompt = Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="The question. Give -p again to ask several of the same media: they are decoded, encoded and prefilled once, and each answer comes under its question (--json, --each: a record per question, with \"question\"). Default: \"Describe this image.\" (or video, or these images).", show_default=False, rich_help_panel=GEN_PANEL)]
System = Annotated[Optional[str], typer.Option(help="System message. Default: the chat template's (Qwen2-VL, Qwen2.5-VL: \"You are a helpful assistant.\"; Qwen3-VL: none).", rich_help_panel=GEN_PANEL)]
MaxNewTokens = Annotated[int, typer.Option(min=1, help="Most tokens to generate.", rich_help_panel=GEN_PANEL)]
MinNewTokens = Annotated[Optional[int], typer.Option(min=0, help="Generate at least this many tokens, even past the end (for benchmarks).", rich_help_panel=GEN_PANEL)]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 = greedy (deterministic); above 0 samples.", rich_help_panel=GEN_PANEL)]
TopP = Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Nucleus sampling (with --temperature > 0).", rich_help_panel=GEN_PANEL)]
TopK = Annotated[Optional[int], typer.Option(min=0, help="Top-k sampling (with --temperature > 0).", rich_help_panel=GEN_PANEL)]
RepetitionPenalty = Annotated[Optional[float], typer.Option(help="Default: the model's generation_config (1.05 for Qwen2-VL-Instruct, none for Qwen3-VL).", rich_help_panel=GEN_PANEL)]
RepeatGuard = Annotated[bool, typer.Option("--repeat-guard/--no-repeat-guard", help="Stop when the answer loops on one short phrase (finish_reason \"repetition\").", rich_help_panel=GEN_PANEL)]
Seed = Annotated[Optional[int], typer.Option(help="Random seed for sampling.", rich_help_panel=GEN_PANEL)]
Schema = Annotated[Optional[str], typer.Option(metavar="SCHEMA", help="The answer is JSON that follows this schema, always: a JSON Schema (inline, or a file), or fields such as 'caption, objects: list\\[str], outdoor: bool' (types str, int, float, bool, list\\[...]; all required). stdout gets the JSON once complete; --json and --each records carry it as \"data\". Not with --stop, --min-new-tokens or --boxes.", show_default=False, rich_help_panel=GEN_PANEL)]
Stop = Annotated[Optional[list[str]], typer.Option(metavar="TEXT", help="End the answer before this text (up to 4; give --stop again for each); the text itself is left out, as OpenAI's stop.", show_default=False, rich_help_panel=GEN_PANEL)]
JsonObject = Annotated[bool, typer.Option("--json-object", help="The answer is a JSON object (any), always; output as with --schema.", rich_help_panel=GEN_PANEL)]

MinPixels = Annotated[Optional[int], typer.Option(min=1, help="Least pixels per image or frame (images: the model's setting, 3136 for Qwen2-VL and Qwen2.5-VL, 65536 for Qwen3-VL; frames: 128 tokens' worth).", rich_help_panel=MEDIA_PANEL)]
MaxPixels = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        help="Most pixels per image or frame (default: the model's, 12845056; on CPU 200704 = 256 tokens).",
        rich_help_panel=MEDIA_PANEL,
    ),
]
MaxVisualTokens = Annotated[
    Optional[int],
    typer.Option(min=1, help="One budget for all images and frames of a request: qvl picks the sizes (and frame counts) and says what it chose.", rich_help_panel=MEDIA_PANEL),
]
MaxDownload = Annotated[str, typer.Option(metavar="SIZE", help="Most bytes read from a URL or stdin, e.g. 500M.", rich_help_panel=MEDIA_PANEL)]
Resize = Annotated[Optional[str], typer.Option(metavar="WxH", help="Exact size, each side rounded to a multiple of 28 (32 for Qwen3-VL).", rich_help_panel=MEDIA_PANEL)]
FirstFrame = Annotated[bool, typer.Option("--first-frame", help="Read animated GIF/WebP/APNG as a still (their first frame).", rich_help_panel=MEDIA_PANEL)]

Fps = Annotated[Optional[float], typer.Option(help="Frames sampled per second (default 2.0).", rich_help_panel=VIDEO_PANEL)]
Nframes = Annotated[Optional[int], typer.Option(min=1, help="Exact number of frames (instead of --fps); clamped to what the clip has.", rich_help_panel=VIDEO_PANEL)]
MinFrames = Annotated[Optional[int], typer.Option(min=1, help="Least frames with --fps (default 4).", rich_help_panel=VIDEO_PANEL)]
MaxFrames = Annotated[Optional[int], typer.Option(min=1, help="Most frames with --fps (default 768).", rich_help_panel=VIDEO_PANEL)]
Start = Annotated[Optional[str], typer.Option(metavar="SECONDS", help="Start of the clip: seconds, or 1:30, 1m30s.", show_default=False, rich_help_panel=VIDEO_PANEL)]
End = Annotated[Optional[str], typer.Option(metavar="SECONDS", help="End of the clip: seconds, or 1:30, 1m30s.", show_default=False, rich_help_panel=VIDEO_PANEL)]
Seek = Annotated[
    str,
    typer.Option(help="exact: the reference's frames. keyframe: the nearest keyframes only, decoded alone (fast preview).", rich_help_panel=VIDEO_PANEL,
                 autocompletion=complete("exact", "keyframe")),
]
TotalPixels = Annotated[
    Optional[int],
    typer.Option(min=1, help="Pixel budget for all frames together (default 90316800; on CPU 1605632).", rich_help_panel=VIDEO_PANEL),
]

Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of streaming text.", rich_help_panel=OUT_PANEL)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No diagnostics on stderr (errors still show).", rich_help_panel=OUT_PANEL)]

EACH_PANEL = "Many inputs"
Each = Annotated[bool, typer.Option("--each", help="One request per MEDIA with the same prompt and options; the model loads once. Records go out as JSON Lines.", rich_help_panel=EACH_PANEL)]
FromFile = Annotated[Optional[str], typer.Option("--from", metavar="FILE", help="Read sources from FILE, one per line (- for stdin; blank lines and # comments skipped). Implies --each.", rich_help_panel=EACH_PANEL)]
Null = Annotated[bool, typer.Option("--null", "-0", help="--from entries are NUL-separated (find -print0).", rich_help_panel=EACH_PANEL)]
Format = Annotated[str, typer.Option(help="jsonl: one JSON object per input (with --segment, per window). text: source<TAB>text, newlines escaped (a window's span before its text). srt, vtt: one clip's windows as subtitles (--segment).", rich_help_panel=EACH_PANEL,
                                     autocompletion=complete("jsonl", "text", "srt", "vtt"))]
Ordered = Annotated[bool, typer.Option("--ordered/--unordered", help="Records in input order, or as each finishes.", rich_help_panel=EACH_PANEL)]
Output = Annotated[Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write records to FILE (a new file), flushed after each.", rich_help_panel=EACH_PANEL)]
Resume = Annotated[Optional[str], typer.Option(metavar="FILE", help="Continue FILE: skip inputs it already answered with the same prompt and options, append the rest.", rich_help_panel=EACH_PANEL)]
BatchSize = Annotated[Optional[int], typer.Option(min=1, help="Inputs generated together (left-padded; on a GPU an ended row's slot goes to the next input at once). Default: 8 on CUDA, 4 on MPS, 1 on CPU.", rich_help_panel=EACH_PANEL)]

CHAT_PANEL = "Conversation"
ChatJson = Annotated[bool, typer.Option("--json", help="One JSON object per turn on stdout (the --json object, with \"turn\", \"question\", \"context_tokens\" and \"new_prompt_tokens\") instead of streaming text.", rich_help_panel=CHAT_PANEL)]
MaxContext = Annotated[Optional[int], typer.Option(min=16, metavar="TOKENS", help="Most tokens the conversation may hold, answers included (default: the model's context). Near it each turn says so; past it a turn is refused, and /clear starts again.", show_default=False, rich_help_panel=CHAT_PANEL)]
Blocks = Annotated[bool, typer.Option("--blocks", help="With stdin piped: a turn is a block of lines ended by a blank line (default: each line is a turn).", rich_help_panel=CHAT_PANEL)]

SERVE_PANEL = "Server"
SERVE_LIMITS_PANEL = "What one request may cost"
ENDPOINT_PANEL = "Remote engine"
Endpoint = Annotated[Optional[list[str]], typer.Option(envvar="QVL_ENDPOINT", metavar="URL", help="Send the requests to an OpenAI-compatible server (qvl serve, vLLM, SGLang), e.g. http://127.0.0.1:8000/v1. Repeat it (or give @FILE, one URL a line) to spread them over several: each goes to the one with the fewest in flight, and one that fails is left for a while.", show_default=False, rich_help_panel=ENDPOINT_PANEL)]
ChatEndpoint = Annotated[Optional[str], typer.Option("--endpoint", envvar="QVL_ENDPOINT", metavar="URL", help="Send the turns to an OpenAI-compatible server (qvl serve, vLLM, SGLang), e.g. http://127.0.0.1:8000/v1.", rich_help_panel=ENDPOINT_PANEL)]
PassUrls = Annotated[bool, typer.Option("--pass-urls", help="Send http(s) media URLs as they are instead of as data: URLs.", rich_help_panel=ENDPOINT_PANEL)]
Concurrency = Annotated[int, typer.Option(min=1, help="Requests in flight at each endpoint with --each --endpoint.", rich_help_panel=ENDPOINT_PANEL)]
ApiKey = Annotated[Optional[str], typer.Option(envvar="QVL_API_KEY", help="Send Authorization: Bearer KEY to the endpoint.", rich_help_panel=ENDPOINT_PANEL)]
ServeApiKey = Annotated[Optional[str], typer.Option("--api-key", envvar="QVL_API_KEY", help="Require Authorization: Bearer KEY from clients.", rich_help_panel=SERVE_PANEL)]

Boxes = Annotated[
    Optional[str],
    typer.Option(
        metavar="WHAT",
        help="Find WHAT in one image with the model's own grounding prompt; boxes come back in the image's pixels (stdout; --json: \"boxes\").",
        rich_help_panel=GROUND_PANEL,
    ),
]
Draw = Annotated[
    Optional[str],
    typer.Option(metavar="FILE", help="With --boxes: write the picture with the boxes drawn to this new .png/.jpg/.webp file.", rich_help_panel=GROUND_PANEL),
]


def parse_resize(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UsageError(f"--resize {text}: give WIDTHxHEIGHT, for example --resize 448x448")
    return int(m.group(1)), int(m.group(2))


def sizing_options(
    min_pixels: MinPixels = None,
    max_pixels: MaxPixels = None,
    resize: Resize = None,
    first_frame: FirstFrame = False,
    fps: Fps = None,
    nframes: Nframes = None,
    min_frames: MinFrames = None,
    max_frames: MaxFrames = None,
    start: Start = None,
    end: End = None,
    total_pixels: TotalPixels = None,
    seek: Seek = "exact",
    max_visual_tokens: MaxVisualTokens = None,
    max_download: MaxDownload = "2G",
) -> MediaOptions:
    from qwen2vl_cli.segments import parse_span
    from qwen2vl_cli.sources import parse_size

    opts = MediaOptions(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        total_pixels=total_pixels,
        resize=parse_resize(resize),
        fps=fps,
        nframes=nframes,
        min_frames=min_frames,
        max_frames=max_frames,
        start=None if start is None else parse_span(start, "--start"),
        end=None if end is None else parse_span(end, "--end"),
        first_frame=first_frame,
        seek=seek,
        max_visual_tokens=max_visual_tokens,
        max_download=parse_size(max_download),
    )
    from qwen2vl_cli.sizing import check_options

    return check_options(opts)


def generation_options(
    prompt: Prompt = None,
    system: System = None,
    max_new_tokens: MaxNewTokens = C.DEFAULT_MAX_NEW_TOKENS,
    min_new_tokens: MinNewTokens = None,
    temperature: Temperature = 0.0,
    top_p: TopP = None,
    top_k: TopK = None,
    repetition_penalty: RepetitionPenalty = None,
    seed: Seed = None,
    repeat_guard: RepeatGuard = True,
    schema: Schema = None,
    json_object: JsonObject = False,
    stop: Stop = None,
) -> GenerationOptions:
    from qwen2vl_cli import schemas

    if schema is not None and json_object:
        raise UsageError("--schema and --json-object both given: --json-object is any object; give one")
    first = prompt[0] if prompt else None  # several: _answer asks each in turn
    grammar = schemas.parse(schema) if schema is not None else schemas.canonical(schemas.JSON_OBJECT) if json_object else None
    return check_generation(
        GenerationOptions(first, system, max_new_tokens, min_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, repeat_guard,
                          schema=grammar, stop=tuple(stop or ()))
    )


ChatPrompt = Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A question asked first (give -p again for more, a turn each); then the conversation goes on at the prompt, or on stdin.", show_default=False, rich_help_panel=GEN_PANEL)]


def chat_generation_options(prompt: ChatPrompt = None, **rest) -> GenerationOptions:
    """generation_options, with -p as qvl chat reads it."""
    return generation_options(prompt, **rest)


_generation = _inspect.signature(generation_options, eval_str=True)
chat_generation_options.__signature__ = _generation.replace(
    parameters=[_generation.parameters["prompt"].replace(annotation=ChatPrompt)] + list(_generation.parameters.values())[1:],
)


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UsageError(f"--{name} {value}: choose one of {', '.join(allowed)}")
    return value


def runtime_options(
    model: Model = C.DEFAULT_MODEL, device: Device = "auto", dtype: Dtype = "auto", attn: Attn = "auto", engine: Engine = "auto",
    quantize: Quantize = "none",
) -> RuntimeOptions:
    return RuntimeOptions(
        model, choice("device", device, DEVICES), choice("dtype", dtype, DTYPES), choice("attn", attn, ATTNS), choice("engine", engine, ENGINES),
        quantize=choice("quantize", quantize, QUANTIZE),
    )


def grounding_options(boxes: Boxes = None, draw: Draw = None) -> tuple[str | None, str | None]:
    if draw is not None and boxes is None:
        raise UsageError("--draw shows what --boxes found: add --boxes WHAT")
    if boxes is not None and not boxes.strip():
        raise UsageError("--boxes needs what to find, e.g. --boxes 'the red car'")
    if draw is not None:
        from qwen2vl_cli.grounding import drawing_format

        drawing_format(draw)  # a name Pillow cannot write, or a file already there, fails before the model loads
    return boxes, draw


def output_options(json_out: Json = False, quiet: Quiet = False) -> tuple[bool, bool]:
    return json_out, quiet


def each_options(
    each: Each = False,
    from_file: FromFile = None,
    null: Null = False,
    format: Format = "jsonl",
    ordered: Ordered = True,
    output: Output = None,
    resume: Resume = None,
    batch_size: BatchSize = None,
):
    """The record options as given; `records` decides whether the run writes records."""
    from qwen2vl_cli.batch import EachOptions

    if output and resume and Path(output).expanduser().resolve() != Path(resume).expanduser().resolve():
        raise UsageError("--output and --resume name different files: give one")
    if resume and format != "jsonl":
        raise UsageError(f"--resume continues a JSON Lines file: drop --format {format}")
    return EachOptions(from_file, null, choice("format", format, ("jsonl", "text", "srt", "vtt")), ordered, output, resume, batch_size,
                       each=bool(each or from_file))


def records(each, timeline) -> object | None:
    """The run's record options: with --each/--from, or --segment (a record per window); else None,
    and then none of them may be given."""
    if each.format in ("srt", "vtt") and (timeline is None or each.each):
        raise UsageError(f"--format {each.format} writes one clip's windows as subtitles: give one CLIP with --segment, without --each")
    if each.format in ("srt", "vtt") and not each.ordered:
        raise UsageError(f"--format {each.format}: subtitles are in time order; drop --unordered")
    if timeline is not None or each.each:
        return each
    given = [name for name, value in (("--null", each.null), ("--output", each.output), ("--resume", each.resume),
             ("--batch-size", each.batch_size), ("--format", each.format != "jsonl"), ("--unordered", not each.ordered)) if value]
    if given:
        raise UsageError(f"{given[0]} works with --each (or --from FILE, or --segment)")
    return None


def endpoint_options(
    endpoint: Endpoint = None,
    api_key: ApiKey = None,
    pass_urls: PassUrls = False,
    concurrency: Concurrency = 4,
):
    if not endpoint:
        if pass_urls or concurrency != 4:
            raise UsageError(f"{'--pass-urls' if pass_urls else '--concurrency'} works with --endpoint URL")
        return None
    urls = []
    for given in endpoint:
        for url in (_url_file(given[1:]) if given.startswith("@") else given.split()):  # QVL_ENDPOINT may hold several
            if not url.startswith(("http://", "https://")):
                raise UsageError(f"--endpoint {url}: give an http(s):// URL, such as http://127.0.0.1:8000/v1")
            urls.append(url.rstrip("/"))
    if not urls:
        raise UsageError(f"--endpoint {endpoint[0]}: no URLs in it")
    return EndpointOptions(tuple(dict.fromkeys(urls)), api_key, pass_urls, concurrency)


def _url_file(path: str) -> list[str]:
    """--endpoint @FILE: one URL a line (blank lines and # comments skipped)."""
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--endpoint @{path}: cannot read it ({getattr(e, 'strerror', None) or e}); give a file of URLs, one a line") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def chat_endpoint_options(endpoint: ChatEndpoint = None, api_key: ApiKey = None, pass_urls: PassUrls = False):
    """endpoint_options for one endpoint, without --concurrency: a conversation has one request in flight."""
    return endpoint_options([endpoint] if endpoint else None, api_key, pass_urls)


Segment = Annotated[Optional[str], typer.Option(metavar="SECONDS", help="Cut the clip (or its --start/--end range) into windows this long (90, 1m30s, 1:30), each sampled as --start/--end of it would be; a last window shorter than a temporal patch joins the one before.", show_default=False, rich_help_panel=VIDEO_PANEL)]
Overlap = Annotated[Optional[str], typer.Option(metavar="SECONDS", help="With --segment: each window starts this much before the one before it ends.", show_default=False, rich_help_panel=VIDEO_PANEL)]


Summary = Annotated[bool, typer.Option("--summary", help="With --segment: after a clip's windows, one more record answering the question for the whole clip from the windows' answers and times (text only).", rich_help_panel=VIDEO_PANEL)]
SummaryPrompt = Annotated[Optional[str], typer.Option(metavar="TEXT", help="The question --summary answers (default: the windows' own); implies --summary.", show_default=False, rich_help_panel=VIDEO_PANEL)]
FramesSheet = Annotated[Optional[str], typer.Option(metavar="FILE", help="Write a picture of the frames the model gets (as it gets them: resized), each labelled with its index and time, a row per medium (per window with --segment), to this new .png/.jpg/.webp file.", show_default=False, rich_help_panel=OUT_PANEL)]


def segment_options(segment: Segment = None, overlap: Overlap = None) -> Timeline | None:
    """The windows' length and overlap in seconds; None without --segment."""
    from qwen2vl_cli.segments import parse_span

    if segment is None:
        if overlap is not None:
            raise UsageError("--overlap works with --segment SECONDS")
        return None
    length = parse_span(segment, "--segment")
    shared = parse_span(overlap, "--overlap") if overlap is not None else 0.0
    if length <= 0:
        raise UsageError(f"--segment {segment}: give a length above 0 seconds")
    if shared >= length:
        raise UsageError(f"--overlap {overlap}: must be shorter than --segment {segment}")
    return Timeline(length, shared)


def timeline_options(segment: Segment = None, overlap: Overlap = None, summary: Summary = False,
                     summary_prompt: SummaryPrompt = None) -> Timeline | None:
    """`qvl video`'s --segment, with its summary; None without --segment."""
    timeline = segment_options(segment, overlap)
    if timeline is None:
        if summary or summary_prompt is not None:
            raise UsageError(f"{'--summary' if summary else '--summary-prompt'} sums up the windows of --segment SECONDS: add it")
        return None
    if summary_prompt is not None and not summary_prompt.strip():
        raise UsageError("--summary-prompt: give the question the summary answers")
    return replace(timeline, summary=summary or summary_prompt is not None, summary_prompt=summary_prompt)


def sheet_options(frames_sheet: FramesSheet = None) -> str | None:
    if frames_sheet is not None:
        from qwen2vl_cli.pictures import picture_format

        picture_format(frames_sheet, "--frames-sheet", "frames.png")  # fails before any model loads or frame is decoded
    return frames_sheet


def inspect_options(
    model: Annotated[Optional[str], typer.Option("--model", "-m", envvar=C.ENV_MODEL, help="Read sizing settings from this model (local dir or HF cache; never downloads). Without MEDIA: summarize the model.", rich_help_panel=RUN_PANEL)] = None,
    device: Annotated[str, typer.Option(envvar=C.ENV_DEVICE, help="Size as this device would: cpu uses smaller defaults. auto guesses without importing torch.", rich_help_panel=RUN_PANEL,
                                        autocompletion=complete(*DEVICES))] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per input.", rich_help_panel=OUT_PANEL)] = False,
) -> tuple[str | None, str, bool]:
    return model, choice("device", device, ("auto", "cuda", "cpu", "mps")), json_out


def chat_options(
    json_out: ChatJson = False,
    quiet: Quiet = False,
    max_context: MaxContext = None,
    blocks: Blocks = False,
    cache_size: Annotated[Optional[str], typer.Option(metavar="SIZE", help="Room kept for the conversation's keys and values, vision-tower outputs and decoded media (each turn prefills only its own tokens), e.g. 2G; 0 turns them off (each turn prefills it all). Default: 1G on a CPU, 2G on a GPU.", show_default=False, rich_help_panel=CHAT_PANEL)] = None,
) -> tuple[bool, bool, int | None, bool, int | None]:
    from qwen2vl_cli.sources import parse_size

    return json_out, quiet, max_context, blocks, None if cache_size is None else parse_size(cache_size, "--cache-size")


def params(group) -> list[_inspect.Parameter]:
    return list(_inspect.signature(group, eval_str=True).parameters.values())


def take(group, kwargs: dict):
    """Call an option group with its own options, removed from kwargs."""
    return group(**{p.name: kwargs.pop(p.name) for p in params(group)})
