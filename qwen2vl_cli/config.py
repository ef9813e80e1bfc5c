"""Defaults, environment variable names and the reference pipeline's constants."""

from __future__ import annotations

import os
import platform
import sys

DEFAULT_MODEL = "Qwen/Qwen2-VL-2B-Instruct"

ENV_MODEL = "QVL_MODEL"
ENV_DEVICE = "QVL_DEVICE"
ENV_DTYPE = "QVL_DTYPE"
ENV_ATTN = "QVL_ATTN"
ENV_DEBUG = "QVL_DEBUG"
ENV_MAX_IMAGE_PIXELS = "QVL_MAX_IMAGE_PIXELS"

DEFAULT_MAX_NEW_TOKENS = 512

# qwen-vl-utils 0.0.14 (vision_process.py): the reference sizing rules.
IMAGE_MIN_TOKENS = 4
IMAGE_MAX_TOKENS = 16384
VIDEO_MIN_TOKENS = 128
VIDEO_MAX_TOKENS = 768
VIDEO_TOTAL_TOKENS = 128000 * 0.9  # MODEL_SEQ_LEN * 0.9
MAX_ASPECT_RATIO = 200
FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

# On CPU the vision tower costs ~26 ms per visual token at 1280x720 (2B, 2 cores), so a photo at
# the reference budget takes half a minute. Without explicit pixel limits qvl uses these instead.
CPU_IMAGE_MAX_TOKENS = 256
CPU_VIDEO_TOTAL_TOKENS = 2048
CPU_VIDEO_MIN_TOKENS = 32

# Network sources.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
MAX_DOWNLOAD_BYTES = 2 * 1024**3
DOWNLOAD_DEADLINE_S = 600.0  # a server that drips one byte every few seconds is cut off here

# Animated images: browsers show frames with a delay under 20 ms for 100 ms; so does qvl.
MIN_FRAME_DURATION_S = 0.02
DEFAULT_FRAME_DURATION_S = 0.1


# Work on a worker thread that the process would wait for at exit (weights loading in the
# background): futures, or anything with done(), until they are done.
LOADS: set = set()


def loading() -> bool:
    """Whether a load is still running on a worker thread (the process would wait for it at exit)."""
    return any(not f.done() for f in list(LOADS))


def debug_enabled() -> bool:
    return os.environ.get(ENV_DEBUG, "") not in ("", "0")


def guess_device() -> str:
    """The device `auto` resolves to, guessed without importing torch (for `inspect`)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) not in ("", "-1") and (
        os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")
    ):
        return "cuda"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    return "cpu"
