"""Build a tiny random Qwen2-VL, Qwen2.5-VL or Qwen3-VL on disk: real tokenizer layout, each
family's chat template and processor settings, random weights of toy shapes.

Run as a script to save one for manual use: ``python tests/tiny_model.py DIR [FAMILY]``
(FAMILY: qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_vl_moe; default qwen2_vl).
"""

from __future__ import annotations

import sys
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2-VL-2B-Instruct's preprocessor_config.json.
PREPROCESSOR = dict(
    patch_size=14,
    merge_size=2,
    temporal_patch_size=2,
    min_pixels=3136,
    max_pixels=12845056,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
    resample=3,
    rescale_factor=1 / 255,
)

# Qwen3-VL-*-Instruct's template without its tool-calling branches (qvl sends no tools): no default
# system message, media rendered by a macro, the same vision markers.
QWEN3_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- macro render_content(content, do_vision_count) %}{%- if content is string %}{{- content }}"
    "{%- else %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}"
    "{%- if do_vision_count %}{%- set image_count.value = image_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif 'video' in item or item.type == 'video' %}"
    "{%- if do_vision_count %}{%- set video_count.value = video_count.value + 1 %}{%- endif %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{%- endmacro %}"
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0].content, false) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- set content = render_content(message.content, True) %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3-VL-2B-Instruct's preprocessor_config.json and video_preprocessor_config.json.
QWEN3_PREPROCESSOR = dict(
    patch_size=16,
    merge_size=2,
    temporal_patch_size=2,
    size={"shortest_edge": 65536, "longest_edge": 16777216},
    image_mean=[0.5, 0.5, 0.5],
    image_std=[0.5, 0.5, 0.5],
)
QWEN3_VIDEO_PREPROCESSOR = dict(QWEN3_PREPROCESSOR, size={"shortest_edge": 4096, "longest_edge": 25165824})

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

CORPUS = [
    "Describe this image.",
    "Describe these images.",
    "Describe this video.",
    "What is in the picture? A cat sits on a red sofa next to a window.",
    "The photo shows a street at night with cars, lights and people walking.",
    "A man rides a bicycle along the river while the sun sets behind the hills.",
    "You are a helpful assistant.",
    "system user assistant",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}",
]
# Text the newer families produce often: time stamps before video frames, JSON grounding.
NEWER_CORPUS = ["<0.5 seconds> <1.0 seconds> <12.5 seconds>", '[{"bbox_2d": [12, 30, 200, 410], "label": "the red car"}]']


def build_tokenizer(extra: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((CORPUS + list(extra)) * 20, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)  # ids follow the regular vocabulary, in Qwen2's order
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
    )


def _text_config(family: str, ids: dict, vocab: int) -> dict:
    config = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        rope_theta=1000000.0,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
        initializer_range=0.5,  # wide weights so greedy output varies with the input
    )
    if family.startswith("qwen3"):
        # Qwen3 text: explicit head_dim, q/k norms, interleaved M-RoPE sections.
        config.update(head_dim=16, rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                      rope_theta=5000000.0)
    if family == "qwen3_vl_moe":
        config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    return config


def _vision_config(family: str) -> dict:
    if family == "qwen2_vl":
        return dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.5)
    if family == "qwen2_5_vl":
        # Window attention in block 0, full attention in block 1, as the real towers alternate.
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1],
                    tokens_per_second=2, initializer_range=0.5)
    # Qwen3-VL: a learned position grid interpolated to each image, deepstack features from block 0.
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
                initializer_range=0.5)


_CLASSES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3VLVideoProcessor"),
}


def build(out_dir: str | Path, family: str = "qwen2_vl", seed: int = 0) -> Path:
    """Save a tiny model of `family` (model, tokenizer, processor) to ``out_dir`` and return it."""
    import torch
    import transformers

    config_cls, model_cls, processor_cls, video_cls = (getattr(transformers, name) for name in _CLASSES[family])
    out = Path(out_dir)
    tokenizer = build_tokenizer(() if family == "qwen2_vl" else tuple(NEWER_CORPUS))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = config_cls(
        text_config=_text_config(family, ids, len(tokenizer)),
        vision_config=_vision_config(family),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    if family.startswith("qwen3"):
        image_processor = transformers.Qwen2VLImageProcessor(**QWEN3_PREPROCESSOR)
        video_processor, template = video_cls(**QWEN3_VIDEO_PREPROCESSOR), QWEN3_CHAT_TEMPLATE
    else:
        image_processor = transformers.Qwen2VLImageProcessor(**PREPROCESSOR)
        video_processor, template = video_cls(**PREPROCESSOR), CHAT_TEMPLATE
    processor = processor_cls(
        image_processor=image_processor, video_processor=video_processor, tokenizer=tokenizer, chat_template=template
    )
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or (len(sys.argv) == 3 and sys.argv[2] not in FAMILIES):
        sys.exit(f"usage: python tests/tiny_model.py OUT_DIR [{'|'.join(FAMILIES)}]")
    print(build(*sys.argv[1:]))
