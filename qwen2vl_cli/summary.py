"""`qvl inspect --model M` without media: architecture, parameter counts, processor and device facts."""

from __future__ import annotations

from qwen2vl_cli import devices
from qwen2vl_cli.errors import UsageError
from qwen2vl_cli.families import family_of_config
from qwen2vl_cli.modelinfo import bytes_on_disk, checkpoint_format, parameter_counts, read_config, read_processor_settings, vision_spec_from_dict


def _millions(n: int) -> str:
    if n < 1e6:
        return f"{n:,}"
    return f"{n / 1e6:,.1f} M" if n < 1e9 else f"{n / 1e9:,.2f} B"


def _gb(n: float) -> str:
    from qwen2vl_cli.sources import format_size

    return format_size(int(n))


def _weights(model: str, config: dict, counts: dict, device: str, dtype: str) -> dict:
    """How the weights are stored, their bytes on disk, and what they take in memory at each --dtype
    and with --quantize int8: on a CPU (int8.py) the language model's linear layers, the head and
    the embeddings int8 with a scale a row (one copy for a model whose head is its embeddings, where
    q8.c runs), the vision tower's linear layers at the checkpoint's dtype where it is narrower; on
    CUDA (torchao) the language model's linear layers int8, the rest at the dtype."""
    from qwen2vl_cli.devices import q8_expected

    width = {"float32": 4, "bfloat16": 2, "float16": 2}
    compute = width.get(dtype, 4)
    stored = checkpoint_format(config)
    linear, rows = counts["language_linear"], counts["language_linear_rows"]
    if device == "cpu":
        head = counts["embeddings"] + counts["vocabulary"] * 4
        vision = counts["vision_linear"]
        copies = 1 if counts["lm_head"] == 0 and q8_expected() else 2
        int8 = (linear + rows * 4 + copies * head + vision * min(compute, width.get(stored, compute))
                + (counts["total"] - linear - counts["embeddings"] - (0 if counts["lm_head"] == 0 else counts["embeddings"]) - vision) * compute)
    else:
        int8 = linear + rows * compute + (counts["total"] - linear) * compute
    return {
        "format": stored,
        "on disk": _gb(size) if (size := bytes_on_disk(model)) else "not on this machine",
        "in memory, float32": _gb(counts["total"] * 4),
        "in memory, bfloat16": _gb(counts["total"] * 2),
        f"in memory, --quantize int8 ({device}, {dtype} for the rest)": _gb(int8),
    }


def summarize(model: str) -> dict[str, dict]:
    config = read_config(model)
    if config is None:
        raise UsageError(
            f"--model {model}: not on this machine (neither a directory nor in the Hugging Face cache): "
            f"run `hf download {model}` or pass a model directory"
        )
    text = config.get("text_config") or config
    vision = config.get("vision_config") or {}
    family = family_of_config(config, model)
    settings = read_processor_settings(model) or {}
    spec = vision_spec_from_dict(settings, family)
    # Qwen2-VL's tower names its width embed_dim and its output hidden_size; later towers say
    # hidden_size and out_hidden_size.
    qwen2 = "embed_dim" in vision
    width = vision.get("embed_dim") if qwen2 else vision.get("hidden_size")
    mlp = (vision.get("mlp_ratio") or 0) * (width or 0) if qwen2 else vision.get("intermediate_size")
    counts = parameter_counts(model)
    caps = devices.detect()
    device = devices.choose_device("auto", caps)
    dtype = devices.choose_dtype("auto", device, caps)
    return {
        f"{model}": {
            "family": f"{family.name} ({config.get('model_type')})",
            "architecture": ", ".join(config.get("architectures") or [config.get("model_type", "?")]),
            "grounding coordinates": "0..1000 of the image" if family.coordinates == "relative1000" else "pixels of the resized input",
        },
        "Vision tower": {
            "blocks": vision.get("depth"),
            "width": width,
            "heads": vision.get("num_heads"),
            "MLP size": int(mlp) if mlp else None,
            "output (merger) size": vision.get("hidden_size") if qwen2 else vision.get("out_hidden_size"),
            "patch / merge / temporal patch": f"{spec.patch_size} / {spec.merge_size} / {spec.temporal_patch_size}",
        },
        "Language model": {
            "layers": text.get("num_hidden_layers"),
            "hidden size": text.get("hidden_size"),
            "heads (KV heads)": f"{text.get('num_attention_heads')} ({text.get('num_key_value_heads')})",
            "MLP size": text.get("intermediate_size"),
            "vocabulary": text.get("vocab_size"),
            "tied embeddings": "yes" if config.get("tie_word_embeddings", text.get("tie_word_embeddings")) else "no",
        },
        "Parameters (meta device, no weights read)": {
            "vision tower": _millions(counts["vision_tower"]),
            "merger": _millions(counts["merger"]),
            "language model": _millions(counts["language_model"]),
            "lm head": _millions(counts["lm_head"]) if counts["lm_head"] else "tied to the embeddings",
            "total": _millions(counts["total"]),
        },
        "Weights": _weights(model, config, counts, device, dtype),
        "Processor": {
            "min pixels": f"{spec.min_pixels:,} ({spec.min_pixels // spec.factor**2} tokens)",
            "max pixels": f"{spec.max_pixels:,} ({spec.max_pixels // spec.factor**2} tokens)",
            "image mean": settings.get("image_mean"),
            "image std": settings.get("image_std"),
        },
        "This machine": {
            "auto device": device + (f" ({caps.cuda_name})" if device == "cuda" else ""),
            "auto dtype": dtype,
            "attention": ", ".join(devices.usable_attn(device, dtype, caps)),
        },
    }
