"""Build the chat messages for one request: media in order, then the prompt."""

from __future__ import annotations

from collections.abc import Sequence

from qwen2vl_cli.types import GenerationOptions, MediaPlan


def default_prompt(plans: Sequence[MediaPlan]) -> str:
    images = sum(p.kind == "image" for p in plans)
    videos = len(plans) - images
    if videos == 0:
        return "Describe this image." if images == 1 else "Describe these images."
    if images == 0:
        return "Describe this video." if videos == 1 else "Describe these videos."
    return "Describe these images and videos."


def build_messages(plans: Sequence[MediaPlan], gen: GenerationOptions) -> list[dict]:
    content: list[dict] = [{"type": p.kind} for p in plans]
    content.append({"type": "text", "text": gen.prompt if gen.prompt is not None else default_prompt(plans)})
    messages: list[dict] = []
    if gen.system is not None:
        messages.append({"role": "system", "content": gen.system})
    messages.append({"role": "user", "content": content})
    return messages
