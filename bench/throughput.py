"""Captioning many images: the reference recipe in a loop against `qvl describe --each`.

In one process, on the same images, with the model loaded once and shared:
  (a) reference  process_vision_info + processor + generate, one image at a time
  (b) qvl        --each --batch-size 1 (the code path of the CLI: prefetch thread, records)
  (c) qvl        --each --batch-size B (left-padded batches, prefetch)
Generation is greedy with max_new_tokens = min_new_tokens, so every path produces the same number
of tokens. Images are mixed sizes within the reference's budget, so all paths see the same pixels.

Models: `tiny` (the test model) and `2b` (Qwen2-VL-2B's shapes with random weights, made once on
the meta device, filled, tied and saved under bench/clips/).

Usage: python bench/throughput.py [--model tiny|2b|both] [--images 64] [--tokens 32] [--batch-size 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from results import machine, write_section  # noqa: E402  (bench/ is on the path when run as a script)

SIZES = [(224, 224), (320, 240), (448, 336), (256, 384), (400, 300), (336, 448), (280, 280), (512, 288)]


def make_images(n: int) -> list[str]:
    import numpy as np
    from PIL import Image, ImageDraw

    folder = HERE / "clips" / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.jpg"
        if not path.exists():
            w, h = SIZES[i % len(SIZES)]
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            img.save(path, quality=90)
        paths.append(str(path))
    return paths


def model_dir(name: str) -> Path:
    from tests.tiny_model import build

    tiny = HERE / "clips" / "tiny-model"
    if not (tiny / "config.json").exists():
        build(tiny)
    if name == "tiny":
        return tiny
    target = HERE / "clips" / "qwen2vl-2b-random"
    if not (target / "model.safetensors.index.json").exists() and not (target / "model.safetensors").exists():
        build_2b(tiny, target)
    return target


def build_2b(tiny: Path, target: Path) -> None:
    """Qwen2-VL-2B's shapes (QWEN2VL.md) with random bf16 weights; the tiny model's tokenizer ids."""
    import torch
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    print("building the random-weight 2B model (about 4.4 GB on disk) ...", file=sys.stderr, flush=True)
    config = Qwen2VLConfig.from_pretrained(tiny)
    text = config.text_config
    text.vocab_size, text.hidden_size, text.intermediate_size = 151936, 1536, 8960
    text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads = 28, 12, 2
    text.rope_parameters["mrope_section"] = [16, 24, 24]
    text.layer_types = ["full_attention"] * 28
    vision = config.vision_config
    vision.depth, vision.embed_dim, vision.num_heads, vision.mlp_ratio, vision.hidden_size = 32, 1280, 16, 4, 1536
    config.tie_word_embeddings = True
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)
    model.tie_weights()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(target)
    AutoProcessor.from_pretrained(tiny).save_pretrained(target)


def run_reference(model, processor, images: list[str], tokens: int) -> float:
    import torch
    from qwen_vl_utils import process_vision_info

    start = time.perf_counter()
    for path in images:
        messages = [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": "Describe this image."}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs, video_inputs = process_vision_info(messages)
        inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_qvl(session, images: list[str], tokens: int, batch_size: int) -> tuple[float, list[dict]]:
    from qwen2vl_cli.batch import Emitter, Tally, run_each
    from qwen2vl_cli.types import GenerationOptions, MediaOptions

    out: list[dict] = []
    emitter = Emitter(lambda line: out.append(json.loads(line)), "jsonl", ordered=True)
    # The reference's pixel budget (explicit, so the CPU defaults do not shrink anything).
    media = MediaOptions(max_pixels=12845056)
    # Fixed length, as the reference loop: random weights loop, and the guard would stop them early.
    gen = GenerationOptions(prompt="Describe this image.", max_new_tokens=tokens, min_new_tokens=tokens, repeat_guard=False)
    tally = Tally()
    run_each(iter(images), session, media, gen, key="bench", batch_size=batch_size, emitter=emitter, tally=tally)
    if tally.failed:
        raise RuntimeError(f"{tally.failed} inputs failed: {[o['error'] for o in out if 'error' in o][:1]}")
    return tally.elapsed, out


def measure(name: str, args) -> dict:
    from transformers import AutoProcessor

    from qwen2vl_cli.backend import LocalBackend
    from qwen2vl_cli.types import RuntimeOptions
    from tests.helpers import Quiet

    path = model_dir(name)
    images = make_images(args.images)
    session = LocalBackend(RuntimeOptions(str(path), device=args.device, dtype=args.dtype), Quiet())
    reference_processor = AutoProcessor.from_pretrained(path)
    run_qvl(session, images[:2], 2, 2)  # warm-up: first-call costs out of every timing
    a = run_reference(session.runner.model, reference_processor, images, args.tokens)
    b, out_b = run_qvl(session, images, args.tokens, 1)
    c, out_c = run_qvl(session, images, args.tokens, args.batch_size)
    assert all(o["generated_tokens"] == args.tokens for o in out_b + out_c)
    n = len(images)
    return {"model": name, "images": n, "a": n / a, "b": n / b, "c": n / c, "device": session.runner.device,
            "visual_tokens": sum(o["visual_tokens"] for o in out_b) / n, "dtype": session.runner.dtype}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "2b", "both"), default="both")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens = min_new_tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: what qvl picks on this device")
    args = parser.parse_args()
    rows = [measure(m, args) for m in (("tiny", "2b") if args.model == "both" else (args.model,))]
    lines = [
        f"## Throughput, {' and '.join(r['model'] for r in rows)} (`bench/throughput.py`)",
        "",
        f"Machine: {machine()}, device {rows[0]['device']}. Command: `python bench/throughput.py --model {args.model} "
        f"--images {args.images} --tokens {args.tokens} --batch-size {args.batch_size} --device {args.device} --dtype {args.dtype}`.",
        f"{args.images} JPEGs of mixed sizes ({min(w * h for w, h in SIZES)}-{max(w * h for w, h in SIZES)} px), "
        f"greedy, {args.tokens} new tokens each, {rows[0]['dtype']}, one process, model loaded once.",
        "",
        "| model | (a) reference loop | (b) qvl --each, batch 1 | (c) qvl --each, batch "
        f"{args.batch_size} + prefetch | b/a | c/a |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} ({r['visual_tokens']:.0f} visual tokens/image) | {r['a']:.2f} images/s | {r['b']:.2f} images/s | "
                     f"{r['c']:.2f} images/s | {r['b'] / r['a']:.2f} | {r['c'] / r['a']:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    write_section(report)


if __name__ == "__main__":
    main()
