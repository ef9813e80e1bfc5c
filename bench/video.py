"""Video preparation: qvl's PyAV sampler against the reference (qwen-vl-utils + the processor).

Makes H.264 clips from FFmpeg's testsrc2 (libx264 veryfast: GOP 250, B-frames), then for each clip
runs, in separate processes, N times each:
  reference   qwen_vl_utils.process_vision_info + processor(...)   (decord backend)
  qvl         probe + plan + PyAV sampler + chunked processor      (same options, same outputs)
  keyframe    qvl with --seek keyframe
  decode      PyAV decoding every frame, nothing else: the floor when all frames must be decoded
Wall is measured inside each process from file to processor outputs (imports and processor load
excluded); peak RSS is the whole process's (wait4). Results are printed and written to RESULTS.md.

With --segment instead: a 60 min 720p clip cut into 60 s windows (`qvl video --segment 60`), the
tiny model on the CPU: preparing every window (one pass) against the decode floor, generation
alone, the whole run against both, peak RSS, and each window's fidelity to `--start a --end b`.

Usage: python bench/video.py [--long] [--runs 3]
       python bench/video.py --segment [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from results import machine, write_section

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLIPS = {
    "60s-720p": dict(seconds=60, size="1280x720"),
    "10min-720p": dict(seconds=600, size="1280x720"),
    "30min-1080p": dict(seconds=1800, size="1920x1080", long=True),
}
REFERENCE_RSS_LIMIT = 20 * 1024**3  # the reference is stopped here so the machine survives the 30 min clip


def make_clip(path: Path, seconds: int, size: str) -> None:
    import av

    if path.exists():
        return
    print(f"encoding {path.name} ({seconds} s, {size}) ...", file=sys.stderr, flush=True)
    w, h = map(int, size.split("x"))
    tmp = path.with_suffix(".part.mp4")
    with av.open(f"testsrc2=size={size}:rate=30:duration={seconds}", format="lavfi") as src, av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for frame in src.decode(video=0):
            frame = frame.reformat(format="yuv420p")
            frame.pts = None
            frame.pict_type = av.video.frame.PictureType.NONE  # let x264 choose keyframes (GOP 250)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    tmp.rename(path)


def tiny_processor_dir() -> Path:
    """A processor with Qwen2-VL-2B's settings (the tiny test model's; no weights are used)."""
    target = HERE / "clips" / "tiny-model"
    if not (target / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from tests.tiny_model import build

        build(target)
    return target


# ---- children -------------------------------------------------------------------------------


def child_reference(clip: str, model: str) -> dict:
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model)
    messages = [{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": "Describe this video."}]}]
    start = time.perf_counter()
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos, meta = process_vision_info(messages, return_video_kwargs=True, return_video_metadata=True)
    video, metadata = videos[0]
    inputs = processor(text=[text], videos=[video], padding=True, return_tensors="pt")
    wall = time.perf_counter() - start
    grid = inputs["video_grid_thw"][0].tolist()
    return {"wall": wall, "indices": list(map(int, metadata["frames_indices"])), "size": list(video.shape[-2:]), "grid": grid,
            "tokens": int(inputs["input_ids"].shape[1])}


def child_qvl(clip: str, model: str, seek: str = "exact") -> dict:
    from qwen2vl_cli.devices import Capabilities
    from qwen2vl_cli.messages import build_messages
    from qwen2vl_cli.pipeline import decode_all, plan_all, probe_all
    from qwen2vl_cli.runner import Runner
    from qwen2vl_cli.sources import SourceResolver
    from qwen2vl_cli.types import GenerationOptions, MediaOptions, RuntimeOptions

    runner = Runner(RuntimeOptions(model, device="cpu"), caps=Capabilities(cpu_bf16=True))
    runner.load_processor(Path(model))
    opts = MediaOptions(seek=seek)  # the reference's defaults: no CPU budget
    start = time.perf_counter()
    with SourceResolver() as resolver:
        probed = probe_all(resolver, (clip,), opts)
        plans = plan_all(probed, runner.vision_spec(), opts)
        plans, loaded = decode_all(probed, plans, opts)
        text = runner.prompt_text(build_messages(plans, GenerationOptions(prompt="Describe this video.")))
        inputs = runner.inputs(text, loaded)
    wall = time.perf_counter() - start
    p = plans[0]
    return {"wall": wall, "indices": list(p.frame_indices), "size": [p.resized_height, p.resized_width],
            "grid": inputs["video_grid_thw"][0].tolist(), "tokens": int(inputs["input_ids"].shape[1])}


def child_decode(clip: str, model: str) -> dict:
    import av

    start = time.perf_counter()
    with av.open(clip) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = sum(1 for _ in container.decode(stream))
    return {"wall": time.perf_counter() - start, "frames": frames}


def child_compare(clip: str, model: str) -> dict:
    """Mean absolute pixel difference between qvl's frames and the reference's, same indices."""
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
    import torch
    from qwen_vl_utils import fetch_video

    from qwen2vl_cli import media, sizing
    from qwen2vl_cli.sources import Source
    from qwen2vl_cli.types import MediaOptions, VisionSpec

    ref = fetch_video({"video": clip})
    src = Source(clip, path=Path(clip))
    info, _ = media.probe(src)
    plan = sizing.plan(clip, info, VisionSpec(), MediaOptions())
    ours = torch.from_numpy(media.load(src, info, plan).frames).permute(0, 3, 1, 2).float()
    diff = (ours - ref).abs()
    return {"mean_abs_diff": diff.mean().item(), "max_abs_diff": diff.max().item()}


# ---- --segment: a long clip as a timeline -----------------------------------------------------

SEGMENT = 60.0  # seconds a window
NEW_TOKENS = 32  # every window's answer, exactly (--min-new-tokens too): generation the same each run
FIDELITY_WINDOWS = 3  # first, middle and last window read alone too, for their pixels


def _backend(model: str):
    sys.path.insert(0, str(ROOT))
    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import RuntimeOptions
    from tests.helpers import Quiet

    return LocalBackend(RuntimeOptions(model, device="cpu", dtype="float32"), Quiet())


def _windows(backend, clip: str, keep: bool):
    """Every window prepared as `qvl video --segment` prepares it (one pass, processor inputs
    built): (windows, wall, what each holds); `keep` keeps their requests for generation."""
    import hashlib

    from qwen2vl_cli.types import GenerationOptions, MediaOptions, Timeline

    gen = GenerationOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    start = time.perf_counter()
    seen, kept = [], []
    for w, prepared in backend.windows(clip, MediaOptions(), Timeline(SEGMENT), gen, True):
        inputs = backend.runner.inputs(prepared.text, list(prepared.loaded))  # the window's tensors for the model
        plan = prepared.plans[0]
        seen.append({"window": w.index, "start": w.start_s, "end": w.end_s, "indices": list(plan.frame_indices),
                     "size": [plan.resized_height, plan.resized_width], "visual": plan.visual_tokens, "tokens": int(inputs["input_ids"].shape[1]),
                     "pixels": hashlib.blake2b(prepared.loaded[0].frames.tobytes(), digest_size=8).hexdigest()})
        if keep:
            kept.append(prepared)
    return seen, time.perf_counter() - start, kept


def child_windows(clip: str, model: str) -> dict:
    """Preparing every window alone (no model run), then fidelity: each window's frames, size and
    tokens against `--start a --end b` of it, and the pixels of a few windows read alone."""
    import hashlib

    from qwen2vl_cli.pipeline import plan_all, probe_all
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    backend = _backend(model)
    backend.ready()
    seen, wall, _ = _windows(backend, clip, keep=False)
    same, pixels_same = 0, 0
    picked = {0, len(seen) // 2, len(seen) - 1}
    for w in seen:
        opts = backend.sized(MediaOptions(start=w["start"], end=w["end"]))
        with backend.resolver(opts) as resolver:
            probed = probe_all(resolver, (clip,), opts, True)
            [plan] = plan_all(probed, backend.spec, opts, backend.runner.count_tokens)
            prepared = backend.prepare((clip,), MediaOptions(start=w["start"], end=w["end"]),
                                       GenerationOptions(max_new_tokens=NEW_TOKENS), True) if w["window"] in picked else None
        same += (list(plan.frame_indices) == w["indices"] and [plan.resized_height, plan.resized_width] == w["size"]
                 and plan.visual_tokens == w["visual"])
        if prepared is not None:
            digest = hashlib.blake2b(prepared.loaded[0].frames.tobytes(), digest_size=8).hexdigest()
            pixels_same += digest == w["pixels"]
    return {"wall": wall, "windows": len(seen), "plans_equal": same, "pixels_checked": len(picked), "pixels_equal": pixels_same,
            "frames": sum(len(w["indices"]) for w in seen), "tokens": sum(w["tokens"] for w in seen)}


def child_generate(clip: str, model: str) -> dict:
    """Generation alone: every window prepared first (not timed), then answered one at a time as
    the CLI does on a CPU (batch size 1)."""
    from qwen2vl_cli.types import GenerationOptions

    backend = _backend(model)
    backend.ready()
    _, _, kept = _windows(backend, clip, keep=True)
    gen = GenerationOptions(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    start = time.perf_counter()
    tokens = sum(backend.generate([p], gen)[0].generated_tokens for p in kept)
    return {"wall": time.perf_counter() - start, "generated": tokens}


def child_timeline(clip: str, model: str) -> dict:
    """The whole run as a user types it: `qvl video CLIP --segment 60`, records to a file."""
    import tempfile

    out = Path(tempfile.mkdtemp()) / "timeline.jsonl"
    clip, model = str(Path(clip).resolve()), str(Path(model).resolve())
    cmd = [sys.executable, "-m", "qwen2vl_cli", "video", clip, "--segment", f"{SEGMENT:g}", "--model", model, "--device", "cpu",
           "--dtype", "float32", "--max-new-tokens", str(NEW_TOKENS), "--min-new-tokens", str(NEW_TOKENS), "-o", str(out), "-q"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(err.strip()[-300:])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return {"wall": wall, "cli_peak_rss": usage.ru_maxrss * 1024, "records": len(records),
            "errors": sum("error" in r for r in records)}


CHILDREN = {"reference": child_reference, "qvl": child_qvl, "keyframe": lambda c, m: child_qvl(c, m, "keyframe"),
            "decode": child_decode, "compare": child_compare, "windows": child_windows, "generate": child_generate,
            "timeline": child_timeline}


# ---- parent ---------------------------------------------------------------------------------


def run_child(mode: str, clip: Path, model: Path, rss_limit: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(clip), str(model)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = []
    if rss_limit:
        def watch():
            while proc.poll() is None:
                try:
                    rss = int(next(l for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS")).split()[1]) * 1024
                except (OSError, StopIteration):
                    return
                if rss > rss_limit:
                    killed.append(rss)
                    proc.kill()
                    return
                time.sleep(0.2)
        threading.Thread(target=watch, daemon=True).start()
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    peak = usage.ru_maxrss * 1024
    if killed:
        return {"failed": f"stopped at {killed[0] / 1024**3:.1f} GB RSS", "peak_rss": peak}
    if status != 0:
        last = (err.strip().splitlines() or ["?"])[-1]
        return {"failed": last[:120], "peak_rss": peak}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss"] = peak
    return result


def gb(n: float) -> str:
    return f"{n / 1024**3:.2f} GB"


def segment_main(args) -> None:
    """--segment: a 60 min 720p clip as 60 windows, the tiny model on the CPU; the sides alternated."""
    from results import publish, spread

    model = tiny_processor_dir()
    clip = HERE / "clips" / "60min-720p.mp4"
    clip.parent.mkdir(exist_ok=True)
    make_clip(clip, 3600, "1280x720")
    runs: dict[str, list[dict]] = {m: [] for m in ("decode", "windows", "generate", "timeline")}
    for round_ in range(args.runs):
        for mode in runs:
            r = run_child(mode, clip, model)
            if "failed" in r:
                raise SystemExit(f"{mode}: {r['failed']}")
            runs[mode].append(r)
            print(f"round {round_ + 1} {mode:9s} {r['wall']:7.2f} s  peak {gb(r['peak_rss'])}", file=sys.stderr, flush=True)
    walls = {m: [r["wall"] for r in rs] for m, rs in runs.items()}
    prep_vs_floor = [w / d for w, d in zip(walls["windows"], walls["decode"])]
    whole_vs_sum = [t / (w + g) for t, w, g in zip(walls["timeline"], walls["windows"], walls["generate"])]
    whole_vs_max = [t / max(w, g) for t, w, g in zip(walls["timeline"], walls["windows"], walls["generate"])]
    win = runs["windows"][0]
    peak = max(r["cli_peak_rss"] for r in runs["timeline"])
    publish([
        "## Long video as a timeline (`bench/video.py --segment`)",
        "",
        f"Machine: {machine()}. Command: `python bench/video.py --segment --runs {args.runs}` (the sides alternated, "
        f"{args.runs} rounds; median (min-max)). A 60 min 1280x720 H.264 clip (30 fps, GOP 250, B-frames), "
        f"`--segment {SEGMENT:g}`: {win['windows']} windows, {win['frames']} frames, {win['tokens']} prompt tokens in all; "
        f"the tiny model on the CPU in float32, {NEW_TOKENS} tokens a window.",
        "",
        "| what | wall | peak RSS |",
        "|---|---|---|",
        f"| PyAV decoding every frame (the floor) | {spread(walls['decode'], 1, ' s')} | {gb(max(r['peak_rss'] for r in runs['decode']))} |",
        f"| preparing every window alone (one pass, processor inputs) | {spread(walls['windows'], 1, ' s')} | {gb(max(r['peak_rss'] for r in runs['windows']))} |",
        f"| generation alone (windows prepared before) | {spread(walls['generate'], 1, ' s')} | {gb(max(r['peak_rss'] for r in runs['generate']))} |",
        f"| `qvl video CLIP --segment {SEGMENT:g}` whole (process wall, load included) | {spread(walls['timeline'], 1, ' s')} | {gb(peak)} |",
        "",
        f"- Preparing all windows against the decode floor: {spread(prep_vs_floor)}x (target <= 1.2x).",
        f"- Peak RSS of the whole run: {gb(peak)} (target <= 2.5 GB).",
        f"- Whole run against preparation alone + generation alone: {spread(whole_vs_sum)}x (target <= 1.3x); against the "
        f"larger of the two: {spread(whole_vs_max)}x (1.0 would be a perfect overlap).",
        f"- Fidelity: {win['plans_equal']} of {win['windows']} windows have the frame indices, size and visual tokens of `--start a --end b` "
        f"of that window; the pixels of {win['pixels_checked']} windows (first, middle, last) read alone equal the one pass's in "
        f"{win['pixels_equal']}. Every run wrote {runs['timeline'][0]['records']} records, {runs['timeline'][0]['errors']} errors.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long", action="store_true", help="also the 30 min 1080p clip (about 8 min to encode)")
    parser.add_argument("--segment", action="store_true", help="the timeline benchmark instead: a 60 min 720p clip in 60 s windows")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", help="one clip name")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "CLIP", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, clip, model = args.child
        print(json.dumps(CHILDREN[mode](clip, model)))
        return
    if args.segment:
        return segment_main(args)

    model = tiny_processor_dir()
    rows, checks = [], []
    for name, spec in CLIPS.items():
        if (spec.get("long") and not args.long) or (args.only and name != args.only):
            continue
        clip = HERE / "clips" / f"{name}.mp4"
        clip.parent.mkdir(exist_ok=True)
        make_clip(clip, spec["seconds"], spec["size"])
        results: dict[str, list[dict]] = {}
        for mode in ("decode", "qvl", "keyframe", "reference"):
            runs = 1 if (mode == "reference" and spec.get("long")) else args.runs
            results[mode] = []
            for _ in range(runs):
                r = run_child(mode, clip, model, REFERENCE_RSS_LIMIT if mode == "reference" else None)
                print(f"{name:12s} {mode:9s} " + (f"{r['wall']:7.2f} s" if "wall" in r else r["failed"]) + f"  peak {gb(r['peak_rss'])}", file=sys.stderr, flush=True)
                results[mode].append(r)
                if "failed" in r:
                    break
        ref, ours = results["reference"][0], results["qvl"][0]
        if "failed" not in ref and "failed" not in ours:
            same = {k: ref[k] == ours[k] for k in ("indices", "size", "grid", "tokens")}
            checks.append((name, same, len(ours["indices"]), ours["size"]))
        rows.append((name, results))
    pixel = run_child("compare", HERE / "clips" / "60s-720p.mp4", model) if not args.only or args.only == "60s-720p" else None
    report = render(rows, checks, pixel, args)
    print(report)
    write_section(report)


def stats(runs: list[dict]) -> tuple[float | None, float | None, int]:
    walls = [r["wall"] for r in runs if "wall" in r]
    peak = max(r["peak_rss"] for r in runs)
    return (min(walls), statistics.median(walls), peak) if walls else (None, None, peak)


def render(rows, checks, pixel, args) -> str:
    lines = [
        "## Video preparation (`bench/video.py`)",
        "",
        f"Machine: {machine()}. Command: `python bench/video.py{' --long' if args.long else ''} --runs {args.runs}`.",
        "File to processor outputs (no model), default options (fps 2, reference pixel budget); "
        f"wall min / median of {args.runs} runs, peak RSS of the whole process.",
        "",
        "| clip | path | wall min | wall median | peak RSS | vs reference (wall, RSS) | vs decode floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, results in rows:
        ref_min, _, ref_peak = stats(results["reference"])
        floor, _, _ = stats(results["decode"])
        for mode, label in (("reference", "reference (qwen-vl-utils + decord)"), ("qvl", "qvl"), ("keyframe", "qvl --seek keyframe"), ("decode", "PyAV decode of every frame")):
            lo, med, peak = stats(results[mode])
            if lo is None:
                lines.append(f"| {name} | {label} | {results[mode][0]['failed']} | | {gb(peak)} | | |")
                continue
            vs_ref = f"{ref_min / lo:.1f}x faster, {ref_peak / peak:.1f}x less" if ref_min and mode != "reference" else ""
            vs_floor = f"{lo / floor:.2f}x" if floor and mode in ("qvl", "keyframe") else ""
            lines.append(f"| {name} | {label} | {lo:.2f} s | {med:.2f} s | {gb(peak)} | {vs_ref} | {vs_floor} |")
    lines += ["", "Fidelity on these clips (qvl against the reference, same options):", ""]
    for name, same, n, size in checks:
        ok = ", ".join(f"{k} {'equal' if v else 'DIFFERENT'}" for k, v in same.items())
        lines.append(f"- {name}: {n} frames at {size[1]}x{size[0]}: {ok}")
    if pixel and "mean_abs_diff" in pixel:
        lines.append(f"- 60s-720p pixels: mean absolute difference {pixel['mean_abs_diff']:.3f}, max {pixel['max_abs_diff']:.0f} (uint8 units)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
