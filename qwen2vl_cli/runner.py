"""Load a Qwen2-VL, Qwen2.5-VL or Qwen3-VL with transformers and build processor inputs; the
pieces a batch of rows (rows.py) needs from the loaded model: its sampling, its end tokens, the
a row's tokens as its Result, how long the vision tower took.

The runner never prints: text goes to the `on_text` callback, numbers come back in the result.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from functools import cached_property
from pathlib import Path

from qwen2vl_cli import devices, grounding, schemas
from qwen2vl_cli.config import debug_enabled
from qwen2vl_cli.errors import ModelError, UsageError, one_line
from qwen2vl_cli.families import QWEN2_VL, Family, family_of_config
from qwen2vl_cli.media_cache import MediaCache
from qwen2vl_cli.modelinfo import BUILDING, QUANTIZED_CHECKPOINTS, checkpoint_format, context_of, read_config, vision_spec_from_dict
from qwen2vl_cli.reference import RepetitionGuard
from qwen2vl_cli.types import GenerationOptions, Loaded, Result, RuntimeOptions, VisionSpec
from qwen2vl_cli.video_processor import ChunkedVideoProcessor
from qwen2vl_cli.vision_cache import VisionCache, default_bytes


class LoopFinder:
    """RepetitionGuard's rule over tokens read back from the device: the first generated length at
    which the guard would have stopped the row (the engine checks once a chunk, then trims there)."""

    def __init__(self):
        self.checked: dict[int, int] = {}  # row -> lengths already seen clean

    def __call__(self, row: int, tokens: list[int]) -> int | None:
        g = RepetitionGuard
        for length in range(max(self.checked.get(row, 0) + 1, g.MIN_SPAN), len(tokens) + 1):
            for n in range(1, g.MAX_PERIOD + 1):
                span = max(g.MIN_SPAN, g.REPEATS * n)
                if span > length:
                    break
                if all(tokens[i] == tokens[i - n] for i in range(length - 1, length - span + n - 1, -1)):
                    return length
        self.checked[row] = len(tokens)
        return None


class VisionClock:
    """Time spent in the vision tower while it is installed: hooks around `model.model.visual`,
    timed with CUDA events on a GPU (read once the work is done, so no extra synchronisation) and
    with the host clock elsewhere."""

    def __init__(self, model):
        import torch

        self.tower = getattr(getattr(model, "model", None), "visual", None)
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.spans: list = []
        self._event = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else None
        self._handles: list = []

    def __enter__(self) -> VisionClock:
        if self.tower is not None:
            self._handles = [self.tower.register_forward_pre_hook(self._start), self.tower.register_forward_hook(self._stop)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def _mark(self):
        if self._event is None:
            return time.perf_counter()
        event = self._event()
        event.record()
        return event

    def _start(self, module, args) -> None:
        self.spans.append([self._mark(), None])

    def _stop(self, module, args, output) -> None:
        self.spans[-1][1] = self._mark()

    def seconds(self) -> float | None:
        """The tower's time over every call; None when it did not run (a text-only prompt)."""
        done = [(a, b) for a, b in self.spans if b is not None]
        if not done:
            return None
        if self.cuda:
            return sum(a.elapsed_time(b) for a, b in done) / 1000
        return sum(b - a for a, b in done)


def weight_bytes(model) -> int:
    """Bytes of a model's weights as they are held: a quantized one's (torchao's tensor subclasses)
    by the tensors inside it, a tied or shared one once."""
    seen, total = set(), 0

    def held(t) -> int:
        if hasattr(t, "__tensor_flatten__"):  # a tensor subclass: its data, scales and zero points
            names, _ = t.__tensor_flatten__()
            return sum(held(getattr(t, n)) for n in names)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    for tensor in list(model.parameters()) + list(model.buffers()):
        total += held(tensor.data if not hasattr(tensor, "__tensor_flatten__") else tensor)
    return total + sum(getattr(m, "held_bytes", 0) for m in model.modules())  # int8.py's packed weights


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


class Runner:
    def __init__(self, runtime: RuntimeOptions, caps: devices.Capabilities | None = None):
        self.runtime = runtime
        self.caps = caps if caps is not None else devices.detect()
        self.device = devices.choose_device(runtime.device, self.caps)
        self.dtype = devices.choose_dtype(runtime.dtype, self.device, self.caps)
        self.attn = devices.choose_attn(runtime.attn, self.device, self.dtype, self.caps)
        self.engine = devices.choose_engine(runtime.engine, self.attn, self.device)
        self.quantize = devices.check_quantize(runtime.quantize, self.device)
        self.int8_cpu = devices.int8_on_cpu(self.quantize, self.device)  # int8.py's layers, converted after loading
        if self.engine == "compiled" and self.int8_cpu:
            raise UsageError("--engine compiled does not take --quantize int8 on a CPU (qvl's int8 kernels are opaque to the compiler); use --engine static")
        if not debug_enabled():
            import logging

            # torchao, where installed, registers its types with torch's tracer, which warns of each when transformers imports it
            logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
        self.model = None
        self.processor = None
        self.family: Family = QWEN2_VL
        self.context_tokens = 32768  # the model's max_position_embeddings, once its config is read
        self.load_s = 0.0
        self.weights_bytes = 0
        self.stored = "?"  # how the checkpoint's weights are stored (its dtype, or a quantization method)
        self.use_caches(runtime.cache_size if runtime.cache_size is not None else default_bytes(self.device))

    def use_caches(self, size: int) -> None:
        """Fresh reuse caches sharing `size` bytes (0: none)."""
        from qwen2vl_cli.prefix_cache import PrefixCache  # torch with it

        # A medium's tower output is a tenth of its keys and values; its decoded pixels less again.
        self.media = MediaCache(size // 8) if size > 0 else None
        self.vision = VisionCache(size // 4) if size > 0 else None
        self.prefixes = PrefixCache(size - size // 4 - size // 8) if size > 0 else None

    def load_processor(self, model_dir: Path) -> None:
        """The family (from config.json), the tokenizer and image/video processors: fast, and they decide the sizes."""
        import transformers
        from transformers import AutoProcessor

        config = read_config(str(model_dir)) or {}
        self.family = family_of_config(config, self.runtime.model)
        self.stored = checkpoint_format(config)
        if self.stored in QUANTIZED_CHECKPOINTS and self.quantize != "none":
            raise ModelError(f"--quantize {self.quantize}: {self.runtime.model} is already quantized ({self.stored}); drop --quantize")
        self.context_tokens = context_of(config) or 32768
        if not debug_enabled():
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
        try:
            self.processor = AutoProcessor.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load the processor of {self.runtime.model}: {one_line(e)}") from None
        self.processor.video_processor = ChunkedVideoProcessor(self.processor.video_processor, self.dtype, self.device)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row at its end

    def load_model(self, model_dir: Path) -> None:
        import torch
        import transformers

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            with BUILDING:
                self.model = getattr(transformers, self.family.model_class).from_pretrained(
                    model_dir,
                    dtype=self._load_dtype(),
                    attn_implementation=self.attn,
                    device_map=self.device if self.device != "cpu" else None,
                    **self._quantization(),
                ).eval()
        except ImportError as e:  # a quantized checkpoint whose library is not installed: transformers names it
            quantized = f"its weights are {self.stored}-quantized: " if self.stored in QUANTIZED_CHECKPOINTS else ""
            raise ModelError(f"cannot load model {self.runtime.model}: {quantized}{one_line(e)[:200]}") from None
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"cannot load model {self.runtime.model}: {one_line(e)}") from None
        except Exception as e:
            if type(e).__name__ != "SafetensorError":  # a truncated or corrupt weights file
                raise
            raise ModelError(f"cannot load model {self.runtime.model}: its weights are damaged ({one_line(e)}); download them again") from None
        if self.int8_cpu:
            from qwen2vl_cli import int8

            int8.quantize_cpu(self.model, getattr(torch, self.dtype), self._load_dtype(), model_dir)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.load_s = time.perf_counter() - start
        self.weights_bytes = weight_bytes(self.model)
        self._check_engine()

    def _load_dtype(self):
        """The dtype weights load at: the run's, or for int8.py's conversion the checkpoint's own
        (a bfloat16 file is not widened first: the load's peak is the file's size)."""
        import torch

        if self.int8_cpu and self.stored in ("bfloat16", "float16", "float32"):
            return getattr(torch, self.stored)
        return getattr(torch, self.dtype)

    def _quantization(self) -> dict:
        """--quantize on CUDA: transformers quantizes each linear weight of the language model with
        torchao as it loads it (the peak is the quantized model, not a full-precision copy beside
        it); the vision tower, the output head and the embeddings stay as they are (a quantized
        tower reads pictures wrong, and torchao advises leaving the embeddings)."""
        if self.quantize == "none" or self.int8_cpu:
            return {}
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        config = Int8WeightOnlyConfig() if self.quantize == "int8" else Int4WeightOnlyConfig(group_size=128)
        return {"quantization_config": TorchAoConfig(config, modules_to_not_convert=["model.visual", "lm_head"])}

    def _check_engine(self) -> None:
        """The static loop needs transformers' current cache API; without it, auto means hf."""
        from qwen2vl_cli import steps

        if self.engine == "compiled":
            steps.use_compile_cache()
        if self.engine in ("static", "compiled", "graph") and (reason := steps.unsupported(self.model)):
            if self.runtime.engine != "auto":
                raise ModelError(f"--engine {self.engine}: {reason}; use --engine hf")
            self.engine = "hf"

    def vision_spec(self) -> VisionSpec:
        ip = self.processor.image_processor
        size = ip.size if isinstance(ip.size, dict) else dict(ip.size)
        return vision_spec_from_dict(
            {"patch_size": ip.patch_size, "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size, "size": size},
            self.family,
        )

    def count_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    @cached_property
    def grammars(self):
        """Compiled JSON Schemas for rows whose answers must follow one (grammar.py)."""
        from qwen2vl_cli.grammar import Grammars

        return Grammars(self.processor.tokenizer, self.model.get_output_embeddings().out_features, self.eos_ids())

    def matcher(self, gen: GenerationOptions):
        """A fresh grammar matcher for a row with these options (--schema; --boxes for the families
        that answer boxes in JSON, so the answer always parses); None for a free answer."""
        if gen.schema is not None:
            return self.grammars.matcher(gen.schema)
        if gen.boxes is not None and (boxes := grounding.schema(self.family)) is not None:
            return self.grammars.matcher(schemas.canonical(boxes))
        return None

    @cached_property
    def longest_token(self) -> int:
        """Characters of the vocabulary's longest token: a text of n characters is at least
        n / this many tokens (byte-level entries are at least as long as the text they stand for)."""
        return max(1, max(map(len, self.processor.tokenizer.get_vocab())))

    @cached_property
    def _control(self) -> re.Pattern:
        special = [t.content for t in self.processor.tokenizer.added_tokens_decoder.values() if t.special and t.content not in TEXT_MARKERS]
        return re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) or r"(?!)")

    def control_token_in(self, text: str) -> str | None:
        """The first of the chat template's control tokens (`<|im_end|>`, `<|image_pad|>`, ...) in
        `text`, which the tokenizer would read as that token, not as text; None when there is none."""
        found = self._control.search(text)
        return found.group(0) if found else None

    def without_control(self, text: str) -> str:
        """`text` with the chat template's control tokens taken out (model output read back as a prompt)."""
        return self._control.sub("", text)

    def prompt_text(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def inputs(self, texts: str | list[str], media: list[Loaded]):
        """Processor inputs for one or more prompts (media in prompt order), already at their planned size."""
        import torch

        from transformers.video_utils import VideoMetadata

        images = [m.image for m in media if m.image is not None]
        videos = [torch.from_numpy(m.frames).permute(0, 3, 1, 2) for m in media if m.frames is not None]
        images_kwargs: dict = {"do_resize": False}
        if self.device != "cpu":  # pixels go to the GPU as bytes and are normalised and patched there
            images_kwargs["device"] = self.device
        videos_kwargs: dict = {"do_resize": False}
        if videos and self.family.video_metadata:
            videos_kwargs.update(do_sample_frames=False, video_metadata=[VideoMetadata(**m.video_metadata) for m in media if m.frames is not None])
        return self.processor(
            text=[texts] if isinstance(texts, str) else texts,
            images=images or None,
            videos=videos or None,
            images_kwargs=images_kwargs,
            videos_kwargs=videos_kwargs,
            padding=True,
            return_tensors="pt",
        )

    @property
    def streams_batches(self) -> bool:
        """Whether a batch can stream every row's text (qvl's loop can; transformers' streamer takes one row)."""
        return self.engine != "hf"

    def eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def sampling(self, gen: GenerationOptions):
        """The engine's sampling for these options, the model's own repetition penalty where they set none."""
        from qwen2vl_cli.sampling import Sampling

        penalty = gen.repetition_penalty if gen.repetition_penalty is not None else self.model.generation_config.repetition_penalty
        return Sampling(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k, repetition_penalty=penalty,
                        min_new_tokens=min(gen.min_new_tokens or 0, gen.max_new_tokens), seed=gen.seed)

    def pad_id(self) -> int:
        pad = self.model.generation_config.pad_token_id
        return pad if pad is not None else self.eos_ids()[0]

    def result(self, new, prompt_tokens: int, visual_tokens: int, ttft: float | None, rate: float | None, looped_at: int | None = None,
               engine: str = "hf") -> Result:
        """One row's Result: its text, tokens and finish reason (anything after its end, the
        end-of-sequence token or where the repetition guard stopped it, is padding), and this
        runner's settings; the request's plans and media time are the backend's to add."""
        eos_ids = set(self.eos_ids())
        tokens = [int(t) for t in new]
        eos_end = next((i + 1 for i, t in enumerate(tokens) if t in eos_ids), None)
        if eos_end is not None and (looped_at is None or eos_end <= looped_at):
            tokens, finish = tokens[:eos_end], "stop"
        elif looped_at is not None:
            tokens, finish = tokens[:looped_at], "repetition"
        else:
            finish = "length"
        return Result(
            text=self.processor.tokenizer.decode(tokens, skip_special_tokens=True), model=self.runtime.model, device=self.device,
            dtype=self.dtype, attn=self.attn, prompt_tokens=prompt_tokens, visual_tokens=visual_tokens, generated_tokens=len(tokens),
            load_s=self.load_s, ttft_s=ttft, decode_tokens_per_s=rate, peak_memory_bytes=peak_memory_bytes(self.device),
            finish_reason=finish, engine=engine, tokens=tuple(tokens),
            weights=self.quantize if self.quantize != "none" else self.stored if self.stored in QUANTIZED_CHECKPOINTS else self.dtype,
            weights_bytes=self.weights_bytes,
        )


# Special tokens a prompt holds as text: Qwen2-VL's grounding markers (its own grounding prompt
# is "Find <|object_ref_start|>the cat<|object_ref_end|>"). Turns and media stay the template's alone.
TEXT_MARKERS = frozenset({"<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>"})


# Processor outputs with one entry per prompt token, padded on the left as the processor pads them.
_TOKEN_KEYS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0}


def stack_rows(rows: list, pad_id: int):
    """Processor inputs of one prompt each as the processor makes them for all of them at once:
    the per-token tensors left-padded to the widest, the media's pixels and grids in row order."""
    import torch
    from transformers import BatchFeature

    width = max(int(r["input_ids"].shape[1]) for r in rows)
    data = {}
    for key in dict.fromkeys(k for r in rows for k in r.keys()):
        parts = [r[key] for r in rows if key in r]
        if key in _TOKEN_KEYS:
            fill = pad_id if _TOKEN_KEYS[key] is None else _TOKEN_KEYS[key]
            parts = [torch.cat([p.new_full((1, width - p.shape[1]), fill), p], dim=1) for p in parts]
        data[key] = torch.cat(parts)
    return BatchFeature(data=data)
