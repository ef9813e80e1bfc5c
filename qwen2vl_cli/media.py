"""Open images and animated images with Pillow: probe headers, then load pixels at the planned size.

Videos go to `video.py`. The kind is decided by the bytes, never by the file name.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import replace

from qwen2vl_cli import config as C
from qwen2vl_cli.errors import MediaError, one_line
from qwen2vl_cli.sources import Source
from qwen2vl_cli.types import Loaded, MediaInfo, MediaOptions, MediaPlan

# Formats Pillow can hold as motion; multi-page TIFF and ICO are pages, not frames.
_ANIMATED_FORMATS = {"GIF", "PNG", "WEBP", "FLI"}
# Pillow identifies these but cannot decode them; they are videos.
_VIDEO_FORMATS = {"MPEG"}
_ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def _pil():
    from PIL import Image

    limit = os.environ.get(C.ENV_MAX_IMAGE_PIXELS)
    if limit:
        Image.MAX_IMAGE_PIXELS = int(limit) if limit.isdigit() and int(limit) > 0 else None
    return Image


def probe(src: Source, scan: bool = False, first_frame: bool = False) -> tuple[MediaInfo, tuple[str, ...]]:
    """What the headers say, and notes for the diagnostics. `scan`: index a video's packets too.
    `first_frame`: an animation will be read as its first frame, so its frames are not timed."""
    Image = _pil()
    from PIL import UnidentifiedImageError

    if src.frames is not None:  # sent as its frames: planned from them and their metadata (frames.plan)
        from qwen2vl_cli.frames import DEFAULT_FPS, probe_size

        width, height = probe_size(src.frames)
        count = len(src.frames)
        return MediaInfo(kind="video", width=width, height=height, format="video/jpeg frames", frames=count, fps=DEFAULT_FPS,
                         duration_s=count / DEFAULT_FPS), ()
    with src.open() as f:
        head = f.read(16)
        if not head:
            raise MediaError(src.label, "the file is empty")
        if _looks_like_video(head):  # skip Pillow's plugin search for the common containers
            from qwen2vl_cli.video import probe_video

            return probe_video(src, scan=scan), ()
        f.seek(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(f)
                img_format = img.format or "image"
        except Image.DecompressionBombError:
            raise MediaError(src.label, _bomb_message()) from None
        except UnidentifiedImageError:
            img = None
        except Exception as e:  # Pillow raises many kinds of error on corrupt bytes (struct.error, ...)
            raise MediaError(src.label, f"cannot read the image header ({one_line(e)})") from None
        if img is None or img_format in _VIDEO_FORMATS:
            from qwen2vl_cli.video import probe_video

            return probe_video(src, scan=scan), ()
        with img:
            try:
                return _probe_image(src, img, img_format, first_frame)
            except MediaError:
                raise
            except Exception as e:  # as above: a corrupt frame table, palette or EXIF block
                raise MediaError(src.label, f"corrupt {img_format} image ({one_line(e)})") from None


def _looks_like_video(head: bytes) -> bool:
    """MP4/MOV/3GP, Matroska/WebM, AVI and FLV by their magic bytes (anything else: Pillow, then PyAV)."""
    return head[4:8] == b"ftyp" or head[:4] == b"\x1aE\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI ") or head[:3] == b"FLV"


def _probe_image(src: Source, img, img_format: str, first_frame: bool = False) -> tuple[MediaInfo, tuple[str, ...]]:
    width, height = img.size
    n_frames = getattr(img, "n_frames", 1)
    if n_frames > 1 and img_format in _ANIMATED_FORMATS and getattr(img, "is_animated", False):
        if first_frame:
            return MediaInfo(kind="video", width=width, height=height, format=img_format, animated=True, frames=n_frames), ()
        # Pillow composites every frame onto the whole canvas: a 2 kB GIF of 1x1 frames on a
        # 7000x7000 canvas costs canvas x frames, so that is what is bounded, before any frame is read.
        limit = composite_limit()
        if limit is not None and width * height * n_frames > limit:
            raise MediaError(src.label, f"animated {img_format} of {n_frames} frames on a {width}x{height} canvas: {width * height * n_frames:,} "
                             f"pixels to composite, over the {limit:,} allowed; --first-frame reads its first frame only, or set "
                             f"{C.ENV_MAX_IMAGE_PIXELS} to raise the limit if you trust the file")
        times = _frame_times(src, img, n_frames)
        duration = times[-1] + _frame_duration(img)  # img is on the last frame now
        info = MediaInfo(
            kind="video",
            width=width,
            height=height,
            format=img_format,
            animated=True,
            frames=n_frames,
            fps=n_frames / duration,
            duration_s=duration,
            frame_times_s=times,
        )
        return info, (f"animated {img_format} with {n_frames} frames: read as a video (--first-frame for a still)",)
    notes = ()
    if n_frames > 1:
        notes = (f"{img_format} with {n_frames} pages: using the first",)
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block must not stop the image
        orientation = 1
    if orientation in _ROTATED:
        width, height = height, width
    return MediaInfo(kind="image", width=width, height=height, format=img_format), notes


def composite_limit() -> int | None:
    """Canvas pixels x frames an animation may take to read: twelve times Pillow's
    decompression-bomb warning size (about 2^30, a few seconds here), raised with it; None: no limit."""
    bomb = _pil().MAX_IMAGE_PIXELS
    return None if bomb is None else 12 * bomb


def frame_limit() -> int | None:
    """The largest video frame decoded (width x height) unless a server sets its own: Pillow's
    decompression-bomb limit for images; None: no limit."""
    bomb = _pil().MAX_IMAGE_PIXELS
    return None if bomb is None else 2 * bomb


def _frame_duration(img) -> float:
    ms = img.info.get("duration") or 0
    seconds = float(ms) / 1000.0
    return C.DEFAULT_FRAME_DURATION_S if seconds < C.MIN_FRAME_DURATION_S else seconds


def _frame_times(src: Source, img, n_frames: int) -> tuple[float, ...]:
    times, t = [], 0.0
    try:
        for i in range(n_frames):
            img.seek(i)
            if "duration" not in img.info:
                img.load()  # WebP sets a frame's duration only once the frame is decoded
            times.append(t)
            if i < n_frames - 1:
                t += _frame_duration(img)
    except Exception as e:  # Pillow's error types on corrupt frames vary
        raise MediaError(src.label, f"corrupt animation at frame {len(times)} ({one_line(e)})") from None
    return tuple(times)


def as_still(info: MediaInfo) -> MediaInfo:
    """An animated image taken as its first frame (--first-frame)."""
    return replace(info, kind="image", animated=False, frames=None, fps=None, duration_s=None, frame_times_s=None)


def effective_info(info: MediaInfo, opts: MediaOptions) -> MediaInfo:
    return as_still(info) if info.animated and opts.first_frame else info


def to_rgb(img):
    """RGB with alpha composited on white; 16-bit greyscale scaled to 8 bits."""
    Image = _pil()
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        import numpy as np

        arr = np.asarray(img).astype(np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def load(src: Source, info: MediaInfo, plan: MediaPlan, keyframes_only: bool = False, max_frame_pixels: int | None = None) -> Loaded:
    """Pixels at the plan's size. `max_frame_pixels`: no video frame larger than this is decoded
    (frames may change size after the first, which the header describes); None: frame_limit()."""
    loaded = _load(src, info, plan, keyframes_only, max_frame_pixels or frame_limit())
    return _timed(loaded, plan) if plan.kind == "video" else loaded


def load_windows(src: Source, info: MediaInfo, plans: list[MediaPlan], keyframes_only: bool = False,
                 max_frame_pixels: int | None = None) -> Iterator[Loaded | MediaError]:
    """The pixels of several plans of one video (--segment's windows, in time order), each as soon
    as its frames are in, or the MediaError that kept it from being read: a video file is read in
    one pass; an animation (small, and bounded when probed) once per plan."""
    if info.animated:
        for plan in plans:
            try:
                yield load(src, info, plan, keyframes_only, max_frame_pixels)
            except MediaError as e:
                yield e
        return
    from qwen2vl_cli.video import read_windows

    keyframes_only = keyframes_only and info.keyframes is not None
    for plan, loaded in zip(plans, read_windows(src, plans, keyframes_only, max_frame_pixels or frame_limit())):
        yield loaded if isinstance(loaded, MediaError) else _timed(loaded, plan)


def _timed(loaded: Loaded, plan: MediaPlan) -> Loaded:
    """A video's frames with what the processor's VideoMetadata holds of them."""
    metadata = {"fps": plan.native_fps, "frames_indices": list(plan.frame_indices or ()), "total_num_frames": plan.span_frames}
    return replace(loaded, video_metadata=metadata)


def _load(src: Source, info: MediaInfo, plan: MediaPlan, keyframes_only: bool, max_frame_pixels: int | None) -> Loaded:
    if plan.kind == "video" and not info.animated:
        from qwen2vl_cli.video import read_frames

        return read_frames(src, plan, keyframes_only=keyframes_only and info.keyframes is not None, max_frame_pixels=max_frame_pixels)
    Image = _pil()
    from PIL import ImageOps

    size = (plan.resized_width, plan.resized_height)
    try:
        with src.open() as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                if plan.kind == "image":
                    img.seek(0)
                    still = to_rgb(ImageOps.exif_transpose(img))
                    return Loaded(image=still.resize(size, Image.Resampling.BICUBIC))
                return _load_animation(img, plan, size)
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(src.label, _bomb_message()) from None
    except Exception as e:  # Pillow's error types on corrupt pixel data vary (OSError, struct.error, ...)
        raise MediaError(src.label, f"cannot decode the image: truncated or corrupt ({one_line(e)})") from None


def _load_animation(img, plan: MediaPlan, size: tuple[int, int]) -> Loaded:
    import numpy as np

    Image = _pil()
    indices = plan.frame_indices or ()
    out = np.empty((len(indices), size[1], size[0], 3), dtype=np.uint8)
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        slots.setdefault(index, []).append(slot)
    for index in sorted(slots):  # Pillow decodes animations forward; seek in order
        img.seek(index)
        frame = np.asarray(to_rgb(img).resize(size, Image.Resampling.BICUBIC))
        for slot in slots[index]:
            out[slot] = frame
    return Loaded(frames=out, frame_times_s=plan.frame_times_s)


def _bomb_message() -> str:
    Image = _pil()
    return (
        f"image is larger than Pillow's decompression-bomb limit of {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels: "
        f"downscale it, or set {C.ENV_MAX_IMAGE_PIXELS}=N if you trust the file"
    )
