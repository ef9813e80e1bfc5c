"""PyAV: probe a video's container, then decode only the planned frames, resized as they come.

The sampler reads the packet index first (demuxing, no decoding) so it knows every frame's
presentation index and where the keyframes are. Then it decodes forward with FFmpeg's threads,
skips decoding non-reference frames that no chosen frame needs, seeks over gaps longer than a
GOP, and converts each chosen frame to RGB and the planned size into one preallocated uint8
array. No full-resolution frame is kept.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

from qwen2vl_cli.errors import InternalError, MediaError, one_line
from qwen2vl_cli.sources import Source
from qwen2vl_cli.types import Loaded, MediaInfo, MediaPlan


# The demuxers FFmpeg may use: single-file video containers and raw streams. Not playlists or
# manifests (HLS, DASH, concat), which open the files they list, the server's own files included.
CONTAINERS = "mov,matroska,avi,flv,mpegts,mpeg,h264,hevc,m4v,ivf,obu,ogg,asf,mjpeg,yuv4mpegpipe,nut"


@dataclass(frozen=True)
class PacketIndex:
    """Every frame's pts in presentation order, and which of them are keyframes."""

    pts: tuple[int, ...]
    keyframes: tuple[int, ...]  # presentation indices
    span_s: float | None  # first pts to the end of the last frame

    def keyframe_before(self, index: int) -> int:
        """The last keyframe at or before `index` (0 when there is none)."""
        pos = bisect.bisect_right(self.keyframes, index) - 1
        return self.keyframes[pos] if pos >= 0 else 0


def _open(src: Source):
    import av
    import av.container

    target = str(src.path) if src.path is not None else src.open()  # a path lets FFmpeg do its own I/O
    # PyAV before 19 decodes metadata strictly unless told otherwise (a bad tag would stop the
    # file); 19 removed the keyword and always decodes leniently.
    lenient = {"metadata_errors": "ignore"} if hasattr(av.container.Container, "metadata_errors") else {}
    try:
        container = av.open(target, mode="r", options={"format_whitelist": CONTAINERS}, **lenient)
    except av.ArgumentError:  # what FFmpeg says of a format outside the list
        raise MediaError(src.label, "not an image or a video that qvl can read (not a video container it takes, such as MP4 or WebM)") from None
    except av.FFmpegError as e:
        raise MediaError(src.label, f"not an image or a video that qvl can read ({one_line(e)})") from None
    names = container.format.name.split(",")
    if "image2" in names or any(n.endswith("_pipe") for n in names):
        # FFmpeg's still-image readers (image2 goes by the file name): Pillow could not read it, so it is no image.
        container.close()
        raise MediaError(src.label, "not an image or a video that qvl can read")
    return container


def _fraction(value) -> Fraction | None:
    """A PyAV rational as a Fraction; None when it is missing, zero or undefined.

    PyAV before 19 gives Fraction or None; 19 gives AVRational values, 0/1 or 0/0 when unknown.
    """
    num, den = getattr(value, "numerator", 0), getattr(value, "denominator", 0)
    return Fraction(num, den) if num and den else None


def _time_base(stream) -> Fraction:
    import av

    return _fraction(stream.time_base) or Fraction(1, av.time_base)


def _data_errors() -> tuple[type[BaseException], ...]:
    """What FFmpeg and PyAV raise on bad bytes; anything else is a bug, not the user's file."""
    import av

    return (av.FFmpegError, EOFError, OverflowError, UnicodeDecodeError)


def _bug(src: Source, e: BaseException) -> InternalError:
    import av

    return InternalError(
        f"{src.label}: the video reader failed ({type(e).__name__}: {one_line(e)}; PyAV {av.__version__}): "
        "this is a bug in qvl, please report it with the output of QVL_DEBUG=1"
    )


def scan_packets(src: Source, container, stream) -> tuple[int, PacketIndex | None]:
    """Demux (no decoding) to count and index the frames; the index is None when packets lack pts."""
    import av

    entries: list[tuple[int, bool]] = []
    count, timed, last_end = 0, True, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue  # the flush packet at the end
            count += 1
            if packet.pts is None:
                timed = False
            elif timed:
                entries.append((packet.pts, packet.is_keyframe))
                end = packet.pts + (packet.duration or 0)
                last_end = end if last_end is None else max(last_end, end)
    except av.FFmpegError as e:
        if count == 0:
            raise MediaError(src.label, f"cannot read the video stream ({one_line(e)})") from None
    entries.sort()
    pts = tuple(p for p, _ in entries)
    if not timed or not pts or len(set(pts)) != len(pts):
        return count, None
    keyframes = tuple(i for i, (_, key) in enumerate(entries) if key)
    tb = _fraction(stream.time_base)
    span = float((last_end - pts[0]) * tb) if tb else None
    return count, PacketIndex(pts, keyframes, span)


def probe_video(src: Source, scan: bool = False) -> MediaInfo:
    """Container metadata; with `scan`, or where the container has no frame count, a packet scan."""
    try:
        return _probe_video(src, scan)
    except MediaError:
        raise
    except _data_errors() as e:  # FFmpeg's own ENOMEM included: a declared-huge stream is bad input
        raise MediaError(src.label, f"corrupt video ({one_line(e)})") from None
    except MemoryError:
        raise
    except Exception as e:
        raise _bug(src, e) from e


def _probe_video(src: Source, scan: bool) -> MediaInfo:
    import av

    container = _open(src)
    with container:
        if not container.streams.video:
            raise MediaError(src.label, "has no video stream (audio only?)")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:
            raise MediaError(src.label, "the video stream's codec is unknown to FFmpeg")
        width, height = ctx.width, ctx.height
        tb = _time_base(stream)
        rate = _fraction(stream.average_rate) or _fraction(stream.guessed_rate) or _fraction(stream.base_rate)
        fps = float(rate) if rate else 0.0
        frames = stream.frames or 0
        duration = None
        if stream.duration:
            duration = float(stream.duration * tb)
        elif container.duration:
            duration = container.duration / av.time_base
        keyframes = None
        if scan or frames <= 0:
            # WebM, MKV and raw streams store no frame count: count the packets (no decoding).
            counted, index = scan_packets(src, container, stream)
            frames = counted
            if index is not None:
                keyframes = index.keyframes
                duration = duration or index.span_s
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
    return MediaInfo(
        kind="video", width=width, height=height, format=fmt, frames=frames, fps=fps, duration_s=duration, keyframes=keyframes
    )


class _Frames:
    """The output arrays of one or more plans of the same clip (the windows of --segment, in time
    order), filled slot by slot as the chosen frames are decoded; a frame several plans chose is
    converted once. A plan's array is made when its first frame comes and handed out, in plan
    order, once the decoder is past its last frame (frames come in presentation order: one not
    in by then never will be), so only the plans being filled hold pixels."""

    def __init__(self, plans: list[MediaPlan]):
        self.plans = plans
        self.slots: dict[int, list[tuple[int, int]]] = {}  # frame index -> (plan, slot) pairs
        for n, plan in enumerate(plans):
            for slot, index in enumerate(plan.frame_indices or ()):
                self.slots.setdefault(index, []).append((n, slot))
        self.todo = sorted(self.slots)  # frame indices still to fill, ascending
        self.last = [max(plan.frame_indices or (0,)) for plan in plans]
        self.pixels: dict = {}  # plan -> its array, while it is being filled
        self.times: dict[int, list[float]] = {}
        self.got: dict[int, list[bool]] = {}  # plan -> which of its slots are filled
        self.given = 0  # plans handed out (a prefix)
        from av.video.reformatter import VideoReformatter

        # One scaler context each, reused for every frame (a frame's own reformat() builds a new one).
        self._to_rgb = VideoReformatter()
        self._resize: dict[tuple[int, int], VideoReformatter] = {}

    def _open(self, n: int):
        import numpy as np

        if n not in self.pixels:
            plan = self.plans[n]
            count = len(plan.frame_indices or ())
            self.pixels[n] = np.empty((count, plan.resized_height, plan.resized_width, 3), dtype=np.uint8)
            self.times[n], self.got[n] = [0.0] * count, [False] * count
        return self.pixels[n]

    def put(self, index: int, frame, t: float) -> list[int]:
        """A decoded frame into every slot that chose it; the plans to hand out now."""
        # Full-resolution RGB first, then bicubic in RGB: within 0.05 (mean, uint8) of the
        # reference's resize, where one-step YUV scaling is 1.5 off.
        rgb = self._to_rgb.reformat(frame, format="rgb24")
        sized: dict[tuple[int, int], object] = {}
        for n, slot in self.slots.pop(index):
            size = (self.plans[n].resized_width, self.plans[n].resized_height)
            if size not in sized:
                scaler = self._resize.setdefault(size, type(self._to_rgb)())
                sized[size] = scaler.reformat(rgb, width=size[0], height=size[1], interpolation="BICUBIC").to_ndarray()
            self._open(n)[slot] = sized[size]
            self.times[n][slot], self.got[n][slot] = t, True
        self.todo.remove(index)
        return self.past(index)

    def lose(self, index: int) -> list[int]:
        """A chosen frame whose packet could not be decoded: its slots stay empty; the plans to hand out now."""
        if self.slots.pop(index, None) is not None:
            self.todo.remove(index)
        return self.past(index)

    def past(self, index: int) -> list[int]:
        """The plans the decoder is past (their last frame at or before `index`), in order, not handed out yet."""
        ready = []
        while self.given + len(ready) < len(self.plans) and self.last[self.given + len(ready)] <= index:
            ready.append(self.given + len(ready))
        return ready

    def take(self, n: int, src: Source, why: MediaError | None = None) -> Loaded | MediaError:
        """Plan `n`'s frames, handed out: a slot the stream never filled takes the nearest frame
        decoded before it (else after it); a plan with none is `why` (or "no frame")."""
        self.given = max(self.given, n + 1)
        for index in [i for i in self.plans[n].frame_indices or () if i in self.slots]:  # the decoder never reached them
            self.lose(index)
        got = self.got.pop(n, None)
        if got is None or not any(got):
            self.pixels.pop(n, None)
            self.times.pop(n, None)
            return why or MediaError(src.label, "no frame could be decoded")
        pixels, times = self.pixels.pop(n), self.times.pop(n)
        filled = [i for i, ok in enumerate(got) if ok]
        for slot in (i for i, ok in enumerate(got) if not ok):
            nearest = max((i for i in filled if i < slot), default=None)
            nearest = nearest if nearest is not None else min(filled)
            pixels[slot], times[slot] = pixels[nearest], times[nearest]
        missing = len(got) - len(filled)
        notes = (f"{missing} of its {len(got)} frames could not be decoded (the stream ended early or is damaged): "
                 "the nearest decoded frame stands in for each",) if missing else ()
        return Loaded(frames=pixels, frame_times_s=tuple(times), notes=notes)


def read_frames(src: Source, plan: MediaPlan, keyframes_only: bool = False, max_frame_pixels: int | None = None) -> Loaded:
    """Decode the planned frames. With `keyframes_only` the plan holds keyframe indices (--seek keyframe).
    `max_frame_pixels`: FFmpeg decodes no frame larger than this (a header can describe a small
    first frame of a stream whose later frames are huge), and a larger one ends the read."""
    [loaded] = read_windows(src, [plan], keyframes_only, max_frame_pixels)
    if isinstance(loaded, Exception):
        raise loaded
    return loaded


def read_windows(src: Source, plans: list[MediaPlan], keyframes_only: bool = False,
                 max_frame_pixels: int | None = None) -> Iterator[Loaded | MediaError]:
    """Several plans of one clip (--segment's windows, in time order) in one pass over the file:
    each plan's frames as soon as the decoder is past its last one, or the MediaError that kept it
    from being read, for every plan in order. A damaged packet costs the frames it held (a plan
    that lost some takes its nearest decoded frames for them); the pass goes on. The pass waits
    while the caller does: memory holds only the plans being filled."""
    import av

    out = _Frames(plans)
    failure: MediaError | None = None
    broke = False  # the stream broke off: what was decoded is kept
    try:
        with _open(src) as container:
            _, index = scan_packets(src, container, container.streams.video[0])
        with _open(src) as container:  # a fresh one: raw streams cannot seek back after the scan
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if max_frame_pixels is not None:  # FFmpeg checks every frame's size before allocating it
                stream.codec_context.options = {"max_pixels": str(max_frame_pixels)}
            if index is None or len(index.pts) != plans[0].frames:
                steps = _decode_counting(container, stream, out, plans[0].native_fps)
            else:
                steps = _decode_indexed(container, stream, out, index, keyframes_only)
            for ready in steps:
                for n in ready:
                    yield out.take(n, src)
    except MediaError as e:
        failure = e
    except av.ArgumentError as e:  # what FFmpeg's frame size check returns (EINVAL): not a stream cut short
        if max_frame_pixels is None:
            failure = MediaError(src.label, f"cannot decode the video ({one_line(e)})")
        else:
            failure = MediaError(src.label, f"a frame is over the {max_frame_pixels:,} pixels allowed here (its header said "
                                            f"{plans[0].width}x{plans[0].height}), or the stream is corrupt")
    except _data_errors() as e:
        failure, broke = MediaError(src.label, f"cannot decode the video ({one_line(e)})"), True
    except MemoryError:
        raise
    except Exception as e:
        raise _bug(src, e) from e
    for n in range(out.given, len(plans)):  # the stream ended, or the read stopped, before these plans' last frames
        yield failure if failure is not None and not broke else out.take(n, src, failure)


# Decoding up to this many unwanted frames is cheaper than a seek and a decoder restart.
SEEK_GAP_FRAMES = 32
# Damaged packets a pass steps over before it gives up on the rest of the stream.
MAX_DAMAGED_PACKETS = 64


def _decode_indexed(container, stream, out: _Frames, index: PacketIndex, keyframes_only: bool) -> Iterator[list[int]]:
    """Decode forward from the chosen frames' keyframes; yields the plans each frame completed."""
    import av

    ctx = stream.codec_context
    tb = _time_base(stream)
    position = {p: i for i, p in enumerate(index.pts)}
    wanted = {index.pts[i] for i in out.slots}
    t0 = index.pts[0]
    demuxed = -1  # presentation index of the last packet sent to the decoder
    errors = 0
    while out.todo:
        target = out.todo[0]
        keyframe = index.keyframe_before(target)
        if keyframe > demuxed + SEEK_GAP_FRAMES:
            # A GOP or more lies between here and the next chosen frame: jump to its keyframe.
            # seek() takes a presentation timestamp and lands on the keyframe at or before it.
            container.seek(index.pts[keyframe], stream=stream, backward=True)
        for packet in container.demux(stream):
            if packet.size:
                if keyframes_only and packet.pts not in wanted:
                    continue  # keyframes decode alone; VP9 ignores skip_frame=NONKEY, so pick packets here
                demuxed = max(demuxed, position.get(packet.pts, -1))
                # Non-reference frames nobody chose need not be decoded at all.
                ctx.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
            try:
                frames = ctx.decode(packet)
            except av.ArgumentError:
                raise  # a frame over the size limit ends the read
            except _data_errors():  # a damaged packet: the frame it held is lost, the pass goes on
                errors += 1
                if errors > MAX_DAMAGED_PACKETS:
                    raise
                yield out.lose(position.get(packet.pts, -1))
                continue
            for frame in frames:
                i = position.get(frame.pts)
                if i is not None and i in out.slots:
                    yield out.put(i, frame, float((frame.pts - t0) * tb))
            if not out.todo:
                return
            # Seek again once the decoder has given up everything before the next gap.
            if out.todo[0] != target and index.keyframe_before(out.todo[0]) > demuxed + SEEK_GAP_FRAMES:
                break
        else:
            return  # end of stream


def _decode_counting(container, stream, out: _Frames, native_fps: float | None) -> Iterator[list[int]]:
    """No usable packet index: decode forward, counting frames in presentation order; yields the
    plans each frame completed."""
    tb = _time_base(stream)
    t0 = None
    last = max(out.slots)
    for i, frame in enumerate(container.decode(stream)):
        if t0 is None and frame.pts is not None:
            t0 = frame.pts
        if i in out.slots:
            # Frames flushed at the end carry no .time; pts * time_base is always right.
            t = float((frame.pts - t0) * tb) if frame.pts is not None else i / (native_fps or 1.0)
            yield out.put(i, frame, t)
        if i >= last:
            return
