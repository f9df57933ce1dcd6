"""Data for DualReal: subject images and the motion clip in, mp4 out, and the tensor cache (METHOD.md §4).

DualReal learns identity from a few subject photos (each a 1-frame video) and motion from one clip of 49
frames at 480x720. CogVideoX was trained on 8 fps video, so the clip is resampled *by timestamp*: frame k is
the source frame on screen at start + k/8 s, which also works for variable-frame-rate phone clips (the
official code takes 49 consecutive native frames, so a 30 fps clip plays ~3x slower; native=True). Frames are
turned upright, the short side resized and the centre cropped: never stretched. All I/O is PyAV (FFmpeg).
Tests (tests/test_data.py) build rotated, variable-frame-rate, short and corrupt media with PyAV + numpy.

Layouts, one convention for the repo (T frames, H x W pixels):
  frames  uint8 (T, H, W, 3) RGB: what the loaders return and what write_video takes
  video   float (T, 3, H, W) in [-1, 1]: to_float(frames); the VAE wants it as (B, 3, T, H, W)
"""

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_EPS = 1e-6  # seconds: absorbs float error when a frame time equals a target time (3/24 s vs 1/8 s)


# ----------------------------------------------------------------------------- layouts and resizing
def to_float(frames: Tensor) -> Tensor:
    """uint8 (T, H, W, 3) -> float32 (T, 3, H, W) in [-1, 1]."""
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (T, 3, H, W)


def to_uint8(video: Tensor) -> Tensor:
    """float (T, 3, H, W) in [-1, 1] -> uint8 (T, H, W, 3) on the CPU, rounded and clamped."""
    return ((video.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def resize_crop(image: np.ndarray, height: int, width: int) -> Tensor:
    """uint8 (h, w, 3) -> (height, width, 3): scale (antialiased bicubic) to cover the target, centre-crop."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()  # (1, 3, h, w)
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (rh - height) // 2, (rw - width) // 2
    x = x[0, :, top : top + height, left : left + width]  # (3, height, width)
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)  # clamp: bicubic overshoots


def display_rgb(frame: av.VideoFrame) -> np.ndarray:
    """Decoded frame (any pixel format; alpha dropped) -> uint8 (h, w, 3) RGB, upright. `frame.rotation`: the
    display matrix's CCW angle (mp4 tkhd, JPEG EXIF; sign tested against both). Mirroring is ignored."""
    rgb = frame.to_ndarray(format="rgb24")
    k = round((frame.rotation or 0) / 90) % 4
    return np.rot90(rgb, k) if k else rgb  # np.rot90 with k > 0 turns counter-clockwise


# ----------------------------------------------------------------------------- subject images
def image_files(folder: str | Path) -> list[Path]:
    """The .jpg/.jpeg/.png/.webp files in `folder`, by name; other files (e.g. ATTRIBUTION.md) are ignored."""
    if not (folder := Path(folder)).is_dir():
        raise FileNotFoundError(f"subject folder not found: {folder} (pass a folder of .jpg/.png images)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ValueError(f"no .jpg/.jpeg/.png/.webp images in {folder} (found: {found})")
    return files


def read_image(path: str | Path) -> np.ndarray:
    """Image file -> uint8 (h, w, 3), upright. Damage raises ValueError (FFmpeg pads a cut JPEG with grey)."""
    try:
        with av.open(str(path)) as container:
            container.streams.video[0].codec_context.options = {"err_detect": "explode"}
            return display_rgb(next(container.decode(video=0)))
    except (av.FFmpegError, StopIteration, IndexError) as e:  # IndexError: no video stream at all
        raise ValueError(f"cannot decode {path} ({type(e).__name__}: {e})") from None


def load_images(folder: str | Path, height: int = 480, width: int = 720) -> Tensor:
    """image_files(folder) -> uint8 (N, height, width, 3); undecodable ones are skipped with a warning."""
    files, images = image_files(folder), []
    for path in files:
        try:
            images.append(resize_crop(read_image(path), height, width))
        except ValueError as e:
            warnings.warn(f"skipping {path}: not a decodable image ({e})", stacklevel=2)
    if not images:
        raise ValueError(f"no decodable image in {folder}; tried: {', '.join(p.name for p in files)}")
    return torch.stack(images)  # (N, H, W, 3)


# ----------------------------------------------------------------------------- the motion clip
@dataclass
class ClipInfo:
    """How a clip was resampled, for train.py to print and log."""

    path: str
    source_fps: float | None  # the stream's average frame rate (None when the container does not say)
    duration: float | None  # seconds, from the container header (None when unknown)
    fps: float | None  # the sampling rate asked for (None with native=True: consecutive frames)
    times: list[float]  # source timestamp (s, from the first frame) of each returned frame
    repeated: int  # trailing frames that repeat the last source frame because the clip is too short

    def describe(self) -> str:
        how = f"at {self.fps:g} fps by timestamp" if self.fps else "consecutive native frames"
        return (f"{self.path} ({self.source_fps or 0:.3g} fps, {self.duration or 0:.2f} s): "
                f"{len(self.times)} frames {how}, t = {self.times[0]:.3f}..{self.times[-1]:.3f} s, "
                f"{self.repeated} repeated")  # fmt: skip


def load_clip(path: str | Path, num_frames: int = 49, fps: float = 8.0, height: int = 480, width: int = 720,
              start: float = 0.0, native: bool = False) -> tuple[Tensor, ClipInfo]:  # fmt: skip
    """Video -> (uint8 (num_frames, height, width, 3), ClipInfo). Frame k is the last source frame with time
    <= start + k / fps (times from the first frame); native=True takes consecutive frames from `start`.
    A clip too short repeats its last frame, with a warning."""
    if not (path := Path(path)).is_file():
        raise FileNotFoundError(f"motion clip not found: {path} (pass an existing .mp4/.mov/.avi/.webm file)")
    if num_frames < 1 or fps <= 0 or start < 0:
        raise ValueError(f"need num_frames >= 1, fps > 0, start >= 0; got {num_frames}, {fps}, {start}")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise ValueError(f"{path} is not a video FFmpeg can open ({e}); pass an .mp4/.mov clip") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream (is it an audio file?); pass a video clip")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame + slice threads: a large speed-up on long HD clips
        src_fps = float(rate) if (rate := stream.average_rate or stream.guessed_rate) else None
        duration = stream.duration * stream.time_base if stream.duration else (container.duration or 0) / 1e6
        duration = float(duration) or None  # container.duration is in microseconds
        try:
            picked, end, repeated = _pick(container.decode(stream), num_frames, fps, start, native, src_fps)
        except av.FFmpegError as e:
            raise ValueError(f"cannot decode {path}: {e} (re-encode it, e.g. to H.264 mp4)") from None
        converted = {id(f): resize_crop(display_rgb(f), height, width) for _, f in picked}  # once per frame
        if len(converted) < min(2, num_frames):  # no frame decoded, or one picture only: no motion to learn
            raise ValueError(f"{path}: {len(converted)} distinct frames decoded, {min(2, num_frames)} needed")
    frames = torch.stack([converted[id(f)] for _, f in picked])  # (num_frames, H, W, 3)
    info = ClipInfo(str(path), src_fps, duration, None if native else fps, [t for t, _ in picked], repeated)
    if repeated:
        warnings.warn(f"{path} is too short for {num_frames} frames from {start} s (it ends at {end:.2f} s): "
                      f"repeating its last frame {repeated} times; pass a longer clip or a lower --fps",
                      stacklevel=2)  # fmt: skip
    return frames, info


def _pick(frames: Iterable[av.VideoFrame], num_frames: int, fps: float, start: float, native: bool, src_fps):
    """Stream the frames, holding the chosen ones only -> ([(time, frame)] * num_frames, end, repeated)."""
    targets = [start + k / fps for k in range(num_frames)]
    picked, prev, t0, end = [], None, None, 0.0
    for i, frame in enumerate(frames):
        t = frame.time if frame.time is not None else i / (src_fps or fps)
        t0 = t if t0 is None else t0
        t -= t0  # containers may start at a non-zero pts (edit lists, MPEG-TS)
        if native:
            if t >= start - _EPS:
                picked.append((t, frame))
        else:  # every target before this frame's time is shown by the previous frame
            while len(picked) < num_frames and t > targets[len(picked)] + _EPS:
                picked.append(prev or (t, frame))
        prev = (t, frame)
        shown = frame.duration * frame.time_base if frame.duration and frame.time_base else 0
        end = t + float(shown or (1.0 / src_fps if src_fps else 0.0))  # when this frame leaves the screen
        if len(picked) == num_frames:
            return picked, end, 0
    if prev is None:
        return [], 0.0, 0
    if native:
        repeated = num_frames - len(picked)
    else:  # targets still open when the stream ends; those at or after `end` lie past the clip
        repeated = sum(target >= end - _EPS for target in targets[len(picked) :])
    return picked + [prev] * (num_frames - len(picked)), end, repeated


def reference_frames(frames: Tensor, k: int = 4) -> Tensor:
    """(T, ...) -> (k, ...): frames round(linspace(0, T-1, k)) of a clip, the motion phase's CLIP cue."""
    return frames[torch.linspace(0, frames.shape[0] - 1, k).round().long()]


# ----------------------------------------------------------------------------- writing mp4
def write_video(path: str | Path, frames: Tensor | np.ndarray, fps: int | Fraction = 8, crf: int = 18):
    """uint8 (T, H, W, 3) RGB -> H.264 yuv420p mp4 at `fps` (int or Fraction; a float becomes a Fraction);
    H, W even (4:2:0). Written atomically; returns the path. Same frames, same bytes: threads=1 (x264's output
    depends on the thread count) and bframes=0 (with B-frames, small frames drifted between runs in tests)."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"need uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}; "
                         "see to_uint8")  # fmt: skip
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs an even height and width, got {height}x{width}")
    rate = Fraction(fps) if isinstance(fps, int | Fraction) else Fraction(fps).limit_denominator(1001)

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": "bframes=0"}
            for image in frames.cpu().numpy():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())  # flush the frames the encoder still holds

    return atomic_write(Path(path), encode)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) beside `path`, fsync, os.replace: `path` is whole or absent, even after a power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- the tensor cache
def cache_key(paths: Iterable[str | Path], model_id: str, extra: str = "") -> str:
    """sha256 hex of the files' bytes (not names or mtimes), the model id and `extra` (sizes, fps, prompt)."""
    h = hashlib.sha256()
    for data in [Path(p).read_bytes() for p in paths] + [model_id.encode(), extra.encode()]:
        h.update(len(data).to_bytes(8, "little") + data)  # length prefix: ("ab", "c") != ("a", "bc")
    return h.hexdigest()


def load_or_compute(cache_dir: str | Path, key: str, fn: Callable[[], dict]) -> dict[str, Tensor]:
    """CPU tensors cached under `key`; fn() computes them (saved atomically) if absent or unreadable."""
    if (path := Path(cache_dir) / f"{key}.safetensors").is_file():
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            warnings.warn(f"cache file {path} is unreadable ({e}); recomputing it", stacklevel=2)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in fn().items()}  # clone: own storage
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"key": key}))
    return tensors
