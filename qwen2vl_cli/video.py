"""PyAV: probe a video's container metadata and decode only the planned frames, resized as they come.

No full-resolution frame is kept: each chosen frame is converted to RGB, resized with bicubic
filtering (as the reference's resize) and copied into one preallocated uint8 array.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from qwen2vl_cli.errors import MediaError
from qwen2vl_cli.media import Loaded, _one_line
from qwen2vl_cli.sources import Source
from qwen2vl_cli.types import MediaInfo, MediaPlan


def _open(src: Source):
    import av

    target = str(src.path) if src.path is not None else src.open()  # a path lets FFmpeg do its own I/O
    try:
        return av.open(target, mode="r", metadata_errors="ignore")
    except av.FFmpegError as e:
        raise MediaError(src.label, f"not an image or a video that qvl can read ({_one_line(e)})") from None


def probe_video(src: Source) -> MediaInfo:
    import av

    container = _open(src)
    with container:
        if not container.streams.video:
            raise MediaError(src.label, "has no video stream (audio only?)")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = ctx.width, ctx.height
        tb = stream.time_base or Fraction(1, av.time_base)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        frames = stream.frames or 0
        duration = None
        if stream.duration:
            duration = float(stream.duration * tb)
        elif container.duration:
            duration = container.duration / av.time_base
        if frames <= 0 or width <= 0 or height <= 0:
            # Containers such as WebM, MKV and raw streams do not store a frame count: demux packets
            # (no decoding) to count them.
            frames, span = _count_packets(src, container, stream)
            if duration is None and span:
                duration = span
        if frames <= 0:
            raise MediaError(src.label, "the video stream has no frames")
        if width <= 0 or height <= 0:
            raise MediaError(src.label, "the video stream does not say its size")
        if fps <= 0:
            if not duration:
                raise MediaError(src.label, "the video does not say its frame rate or duration")
            fps = frames / duration
        if duration is None:
            duration = frames / fps
        fmt = f"{container.format.name.split(',')[0]}/{ctx.name}"
    return MediaInfo(kind="video", width=width, height=height, format=fmt, frames=frames, fps=fps, duration_s=duration)


def _count_packets(src: Source, container, stream) -> tuple[int, float | None]:
    import av

    count, lo, hi = 0, None, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the flush packet at the end
            count += 1
            if packet.pts is not None:
                end = packet.pts + (packet.duration or 0)
                lo = packet.pts if lo is None else min(lo, packet.pts)
                hi = end if hi is None else max(hi, end)
    except av.FFmpegError as e:
        if count == 0:
            raise MediaError(src.label, f"cannot read the video stream ({_one_line(e)})") from None
    span = float((hi - lo) * stream.time_base) if lo is not None and hi is not None and stream.time_base else None
    return count, span


def read_frames(src: Source, plan: MediaPlan) -> Loaded:
    """Decode forward, keeping the planned frame indices; decoding stops after the last one."""
    import av
    from PIL import Image

    indices = plan.frame_indices or ()
    w, h = plan.resized_width, plan.resized_height
    out = np.empty((len(indices), h, w, 3), dtype=np.uint8)
    slots: dict[int, list[int]] = {}
    for slot, index in enumerate(indices):
        slots.setdefault(index, []).append(slot)
    last = max(slots)
    times = [0.0] * len(indices)
    filled = 0
    decoded = 0
    t0 = None
    container = _open(src)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = stream.time_base
        try:
            for frame in container.decode(stream):
                index = decoded
                decoded += 1
                if frame.pts is not None and t0 is None:
                    t0 = frame.pts
                if index in slots:
                    image = frame.to_image().resize((w, h), Image.Resampling.BICUBIC)
                    pixels = np.asarray(image)
                    # Frames flushed at the end carry no .time; pts * time_base is always right.
                    t = float((frame.pts - t0) * tb) if frame.pts is not None and tb else index / plan.native_fps
                    for slot in slots[index]:
                        out[slot] = pixels
                        times[slot] = t
                        filled += 1
                if index >= last:
                    break
        except av.FFmpegError as e:
            if filled == 0:
                raise MediaError(src.label, f"cannot decode the video ({_one_line(e)})") from None
    notes: tuple[str, ...] = ()
    if filled < len(indices):
        if filled == 0:
            raise MediaError(src.label, "no frame could be decoded")
        # The container promised more frames than the stream holds: repeat the last one decoded.
        for slot in range(filled, len(indices)):
            out[slot] = out[filled - 1]
            times[slot] = times[filled - 1]
        notes = (f"the stream ended after {decoded} frames (metadata said {plan.frames}): last frame repeated",)
    return Loaded(frames=out, frame_times_s=tuple(times), notes=notes)
