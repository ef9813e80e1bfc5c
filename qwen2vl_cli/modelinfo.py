"""Find a model on disk or in the Hugging Face cache and read its settings without loading weights."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

from qwen2vl_cli.errors import ModelError
from qwen2vl_cli.families import QWEN2_VL, Family, family_of_config
from qwen2vl_cli.types import VisionSpec

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# transformers builds a model by patching torch and its own classes while it does (tie_weights, the
# init functions): two builds at once in one process leave both models, and every later one, untied.
BUILDING = threading.Lock()


# What loading needs from a hub repo; other weight formats and docs are skipped.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def locate_model(model: str) -> Path:
    """The local directory of `model`, downloading a hub model that is not cached yet.

    A cached model loads from its snapshot with no network call, so start-up never waits on the hub.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {model}: the directory has no config.json; give a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model directory")
        return path
    if path.exists():
        raise ModelError(f"--model {model}: is a file; give a model directory or a hub id such as Qwen/Qwen2-VL-2B-Instruct")
    if not _HUB_ID.match(model) or model.startswith((".", "~")):
        raise ModelError(f"--model {model}: no such directory, and not a hub id such as Qwen/Qwen2-VL-2B-Instruct")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(model, allow_patterns=MODEL_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"model {model} is not in the Hugging Face cache and the hub is offline: "
            f"run `hf download {model}` where there is network, or pass --model DIR"
        )
    try:
        return Path(snapshot_download(model, allow_patterns=MODEL_FILES))
    except GatedRepoError:
        raise ModelError(f"model {model} is gated: accept its terms on huggingface.co and run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise ModelError(f"--model {model}: no such model on the Hugging Face hub (or it needs `hf auth login`)") from None
    except (LocalEntryNotFoundError, OSError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = lines[0].removeprefix("Got: ")[:160]
        raise ModelError(
            f"cannot download model {model} ({reason}): check the network, or run `hf download {model}` "
            "where there is one and pass --model DIR"
        ) from None


def model_file(model: str, filename: str) -> Path | None:
    """A file of the model from its directory or the local cache; never downloads."""
    path = Path(model).expanduser()
    if path.is_dir():
        candidate = path / filename
        return candidate if candidate.is_file() else None
    if not _HUB_ID.match(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, filename)
    return Path(cached) if isinstance(cached, str) else None


def vision_spec_from_dict(d: dict, family: Family = QWEN2_VL) -> VisionSpec:
    """The image processor's settings over the family's defaults."""
    size = d.get("size") or {}
    default = family.spec
    return VisionSpec(
        patch_size=int(d.get("patch_size", default.patch_size)),
        merge_size=int(d.get("merge_size", default.merge_size)),
        temporal_patch_size=int(d.get("temporal_patch_size", default.temporal_patch_size)),
        min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or default.min_pixels),
        max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or default.max_pixels),
        time_stamps=family.time_stamps,
    )


def read_processor_settings(model: str) -> dict | None:
    """The image processor's settings: preprocessor_config.json (hub layout) or processor_config.json."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        file = model_file(model, name)
        if file is None:
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"--model {model}: cannot read {name} ({e})") from None
        return data.get("image_processor", data)
    return None


def vision_spec(model: str | None) -> VisionSpec | None:
    """The model's sizing settings when its files are at hand, else None (Qwen2-VL's without a model)."""
    if model is None:
        return VisionSpec()
    settings = read_processor_settings(model)
    if settings is None:
        return None
    return vision_spec_from_dict(settings, model_family(model))


def model_family(model: str) -> Family:
    """The family its config.json names; Qwen2-VL when the config is not at hand (inspect's sizes only)."""
    config = read_config(model)
    return QWEN2_VL if config is None else family_of_config(config, model)


def stamp_counter(model: str | None):
    """Counts tokens with the model's own tokenizer.json (the tokenizers library: no torch), or None."""
    file = model_file(model, "tokenizer.json") if model is not None else None
    if file is None:
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception:  # an unreadable tokenizer only costs the exact count: the Qwen rule stands in
        return None
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def read_config(model: str) -> dict | None:
    file = model_file(model, "config.json")
    if file is None:
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {model}: cannot read config.json ({e})") from None


def context_of(config: dict) -> int | None:
    """The model's context in tokens (its language model's max_position_embeddings), where the config says."""
    known = (config.get("text_config") or config).get("max_position_embeddings")
    return int(known) if known else None


def parameter_counts(model: str) -> dict[str, int]:
    """Parameters per part, counted on the meta device: no weights are read or allocated."""
    import torch
    import transformers
    from transformers import AutoConfig

    config_file = model_file(model, "config.json")
    if config_file is None:
        raise ModelError(f"--model {model}: not on this machine: run `hf download {model}` or pass a model directory")
    family = model_family(model)
    config = AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
    with BUILDING, torch.device("meta"):
        net = getattr(transformers, family.model_class)._from_config(config)
    visual = net.model.visual
    merger = sum(p.numel() for p in visual.merger.parameters())
    vision = sum(p.numel() for p in visual.parameters()) - merger
    language = sum(p.numel() for p in net.model.language_model.parameters())
    total = sum(p.numel() for p in net.parameters())  # tied lm_head is counted once
    linear = [m for m in net.model.language_model.modules() if isinstance(m, torch.nn.Linear)]  # what --quantize turns to int8
    seen = [m for m in visual.modules() if isinstance(m, torch.nn.Linear)]  # what int8.py keeps at the checkpoint's dtype on a CPU
    return {"vision_tower": vision, "merger": merger, "language_model": language, "lm_head": total - vision - merger - language, "total": total,
            "language_linear": sum(m.weight.numel() for m in linear), "language_linear_rows": sum(m.weight.shape[0] for m in linear),
            "vision_linear": sum(m.weight.numel() for m in seen), "vocabulary": net.lm_head.out_features,
            "embeddings": net.model.language_model.embed_tokens.weight.numel()}


# Published quantized checkpoints' methods (config.json's quantization_config): transformers loads
# each with a library of its own, and says which when it is missing.
QUANTIZED_CHECKPOINTS = frozenset({"awq", "gptq", "fp8", "compressed-tensors", "bitsandbytes", "torchao", "hqq", "quanto", "eetq"})


def checkpoint_format(config: dict) -> str:
    """How a checkpoint's weights are stored: its quantization method, else its dtype."""
    quantized = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if isinstance(quantized, dict) and quantized.get("quant_method"):
        return str(quantized["quant_method"]).lower()
    return str(config.get("dtype") or config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype") or "?")


def bytes_on_disk(model: str) -> int | None:
    """The weights files' bytes, where the model is on this machine."""
    config = model_file(model, "config.json")
    if config is None:
        return None
    files = [f for f in config.parent.iterdir() if f.suffix in (".safetensors", ".bin")]
    return sum(f.stat().st_size for f in files if f.exists()) or None
