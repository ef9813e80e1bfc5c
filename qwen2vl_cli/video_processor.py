"""The family's video processor done a chunk of frames at a time: what the runner hands the
processor in place of its own, to the same values with one float copy instead of three."""

from __future__ import annotations


class ChunkedVideoProcessor:
    """The family's video processor, done a few frames at a time straight into one preallocated tensor.

    Run on a whole clip, the processor converts every frame to float32, normalizes, then copies it
    all again to patchify and again to concatenate: three full-size float copies. Here each chunk
    of frames is gathered into patch order and converted in one copy, then normalized in place with
    the processor's own fused mean and std, so the values are bit for bit the processor's.
    `pixel_values_videos` is stored in the model's dtype, which the vision tower casts to anyway.
    On a GPU (`device`), the frames go there as bytes, a chunk at a time, and the work is done there.
    """

    CHUNK_FRAMES = 16

    def __init__(self, inner, dtype: str, device: str = "cpu"):
        self.inner = inner
        self.dtype = dtype
        self.device = device

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, videos, do_resize: bool = True, video_metadata=None, return_metadata: bool = False, **kwargs):
        import torch
        from transformers import BatchFeature
        from transformers.video_utils import make_batched_metadata

        p = self.inner
        if do_resize or not (p.do_rescale and p.do_normalize):  # not the path qvl feeds: the processor's own
            return p(videos, do_resize=do_resize, video_metadata=video_metadata, return_metadata=return_metadata, **kwargs)
        tp, ps, m = p.temporal_patch_size, p.patch_size, p.merge_size
        # The processor's fused rescale-and-normalize constants, computed the way it computes them.
        device = torch.device(self.device)
        mean = (torch.tensor(p.image_mean) * (1.0 / p.rescale_factor))[:, None].to(device)
        std = (torch.tensor(p.image_std) * (1.0 / p.rescale_factor))[:, None].to(device)
        # Frames arrive at their planned size (T, C, H, W), so every grid is known before any work.
        grids = [(-(-v.shape[0] // tp), v.shape[2] // ps, v.shape[3] // ps) for v in videos]
        channels = videos[0].shape[1]
        dtype = getattr(torch, self.dtype)
        out = torch.empty((sum(t * h * w for t, h, w in grids), channels * tp * ps * ps), dtype=dtype, device=device)
        offset = 0
        step = max(tp, self.CHUNK_FRAMES // tp * tp)
        direct = dtype == torch.float32  # float32 output: normalize in place; else via one chunk buffer
        for video, (_, gh, gw) in zip(videos, grids):
            for start in range(0, video.shape[0], step):
                chunk = video[start : start + step].to(device)
                if pad := -chunk.shape[0] % tp:  # the processor repeats the last frame
                    chunk = torch.cat([chunk, chunk[-1:].expand(pad, -1, -1, -1)])
                gt = chunk.shape[0] // tp
                rows = gt * gh * gw
                patches = chunk.reshape(gt, tp, channels, gh // m, m, ps, gw // m, m, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
                target = out[offset : offset + rows] if direct else torch.empty((rows, out.shape[1]), device=device)
                target.view(patches.shape).copy_(patches)
                target.view(rows, channels, -1).sub_(mean).div_(std)
                if not direct:
                    out[offset : offset + rows] = target
                offset += rows
        data = {"pixel_values_videos": out, "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if return_metadata or video_metadata is not None:  # Qwen2.5-VL and Qwen3-VL read the frames' times from it
            data["video_metadata"] = make_batched_metadata(videos, video_metadata)
        return BatchFeature(data=data)
