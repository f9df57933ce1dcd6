"""data.py: PyAV image/clip loading, resampling by timestamp, mp4 writing and the tensor cache.

Every test medium is built here with PyAV + numpy, so the ground truth is known: a frame's gray level encodes
its index, rotations are checked against the raw mp4 display matrix and the EXIF spec (not PyAV's own sign
convention), and the examples/ files are checked as shipped.
"""

import hashlib
import os
import struct
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import data

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ----------------------------------------------------------------------------- media builders
def encode(path, frames, pts=None, rate=8, rotation=None, container_format=None):
    """uint8 (T, H, W, 3) frames -> lossless-ish H.264 file; pts in units of 1/rate s (default 0, 1, 2...)."""
    with av.open(str(path), "w", format=container_format) as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.time_base = Fraction(1, rate)
        s.options = {"crf": "0"}
        if rotation is not None:
            s.set_display_rotation(rotation)
        if container_format == "avi":
            c.start_encoding()  # writes the header even when no frame follows
        for i, image in enumerate(frames):
            f = av.VideoFrame.from_ndarray(image, format="rgb24")
            f.pts, f.time_base = (i if pts is None else pts[i]), Fraction(1, rate)
            c.mux(s.encode(f))
        c.mux(s.encode())
    return path


def write_image(path, array, codec, fmt, pix_fmt):
    """One image file (png / mjpeg / libwebp) holding `array` given in pixel format `fmt`."""
    frame = av.VideoFrame.from_ndarray(array, format=fmt)
    frame = frame.reformat(format=pix_fmt) if fmt not in (pix_fmt, "pal8") else frame
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream(codec, rate=1)
        s.width, s.height, s.pix_fmt = frame.width, frame.height, pix_fmt
        c.mux(s.encode(frame))
        c.mux(s.encode())
    return path


def gray_frames(n, h=32, w=48):
    """Frame i is the constant gray 10 + 8 i, so its index can be read back from its mean."""
    return np.full((n, h, w, 3), 10, np.uint8) + 8 * np.arange(n, dtype=np.uint8)[:, None, None, None]


def indices(frames):
    return [round((float(f.float().mean()) - 10) / 8) for f in frames]


def marker(h, w):
    """White top-left quarter on black: every rotation and flip of it is distinct."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 4] = 255
    return a


def tkhd_matrix(path):
    """(a, b, c, d) of the mp4 track header's display matrix (ISO 14496-12 8.3.2), read from the raw bytes."""
    raw = Path(path).read_bytes()
    i = raw.index(b"tkhd") + 4
    offset = i + (40 if raw[i] == 0 else 52)  # version 0: 32-bit times, version 1: 64-bit times
    m = struct.unpack(">9i", raw[offset : offset + 36])
    return [v / 65536 for v in (m[0], m[1], m[3], m[4])]


def apply_matrix(img, a, b, c, d):
    """Display image per the spec: stored pixel (x, y) is shown at (a x + c y, b x + d y), y pointing down."""
    h, w = img.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    X, Y = a * xs + c * ys, b * xs + d * ys
    X, Y = (X - X.min()).astype(int), (Y - Y.min()).astype(int)
    out = np.zeros((Y.max() + 1, X.max() + 1, 3), np.uint8)
    out[Y, X] = img
    return out


def absdiff(a, b):
    return (
        torch.as_tensor(np.ascontiguousarray(a)).float() - torch.as_tensor(np.ascontiguousarray(b)).float()
    ).abs()


def diff(a, b):
    d = absdiff(a, b)
    return f"max abs diff {d.max():.1f}, mean {d.mean():.2f}"


# ----------------------------------------------------------------------------- the motion clip
@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotated_clip_decodes_in_display_orientation(tmp_path, rotation):
    stored = marker(32, 64)
    path = encode(tmp_path / "r.mp4", stored[None].repeat(2, 0), rotation=rotation)
    expected = apply_matrix(stored, *tkhd_matrix(path))
    frames, _ = data.load_clip(path, num_frames=1, height=expected.shape[0], width=expected.shape[1])
    assert absdiff(frames[0], expected).mean() < 2, (
        f"not the tkhd display orientation: {diff(frames[0], expected)}"
    )


def test_variable_frame_rate_clip_is_sampled_by_timestamp(tmp_path):
    pts = [0, 1, 2, 4, 5, 9, 10, 11, 15, 20, 21, 22, 26, 30, 31, 40]  # in 1/30 s: irregular gaps
    path = encode(tmp_path / "vfr.mp4", gray_frames(len(pts)), pts=pts, rate=30)
    frames, info = data.load_clip(path, num_frames=9, fps=8, height=32, width=48)
    # the frame on screen at k/8 s is the last one with pts/30 <= k/8
    expected = [max(i for i, p in enumerate(pts) if p / 30 <= k / 8 + 1e-9) for k in range(9)]
    assert indices(frames) == expected, f"picked {indices(frames)}, expected {expected}"
    assert info.times == pytest.approx([pts[i] / 30 for i in expected], abs=1e-4), info.times


def test_short_clip_repeats_last_frame_with_warning(tmp_path):
    path = encode(tmp_path / "short.mp4", gray_frames(10), rate=8)  # 1.25 s, 17 frames at 8 fps need 2.125 s
    with pytest.warns(UserWarning, match="repeating its last frame 7 times"):
        frames, info = data.load_clip(path, num_frames=17, fps=8, height=32, width=48)
    assert indices(frames) == list(range(10)) + [9] * 7 and info.repeated == 7, (indices(frames), info)


def test_native_flag_takes_consecutive_frames(tmp_path):
    path = encode(tmp_path / "c24.mp4", gray_frames(20), rate=24)
    frames, info = data.load_clip(path, num_frames=9, height=32, width=48, native=True)
    assert indices(frames) == list(range(9)) and info.fps is None, indices(frames)


def test_24fps_clip_at_8fps_takes_every_third_frame(tmp_path):
    path = encode(tmp_path / "c24.mp4", gray_frames(28), rate=24)
    frames, info = data.load_clip(path, num_frames=9, fps=8, height=32, width=48)
    assert indices(frames) == list(range(0, 27, 3)) and info.repeated == 0, (indices(frames), info)


def test_motion_clip_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="motion clip not found"):
        data.load_clip(tmp_path / "nope.mp4")


def test_motion_clip_not_a_video_is_a_clear_error(tmp_path):
    (tmp_path / "notes.mp4").write_text("this is not a video\n" * 50)
    with pytest.raises(ValueError, match="not a video"):
        data.load_clip(tmp_path / "notes.mp4")


def test_motion_clip_with_zero_frames_is_a_clear_error(tmp_path):
    path = encode(tmp_path / "empty.avi", gray_frames(0), container_format="avi")  # video stream, no frames
    with pytest.raises(ValueError, match="0 distinct frames"):
        data.load_clip(path)


def test_a_still_image_is_not_a_motion_clip(tmp_path):
    """FFmpeg opens a JPEG as a 1-frame video: as a clip it would be one picture repeated, with no motion."""
    with pytest.raises(ValueError, match="1 distinct frames decoded, 2 needed"):
        data.load_clip(EXAMPLES / "dog6" / "00.jpg", num_frames=9)
    one = encode(tmp_path / "one.mp4", gray_frames(1))
    assert data.load_clip(one, num_frames=1)[0].shape[0] == 1  # one frame asked for: one is enough
    with pytest.raises(ValueError, match="1 distinct frames"):
        data.load_clip(one, num_frames=9)
    with pytest.warns(UserWarning, match="too short"):  # two pictures: motion, however short
        assert len(data.load_clip(encode(tmp_path / "two.mp4", gray_frames(2)), num_frames=9)[0]) == 9


def test_reference_frames_are_evenly_spaced():
    clip = torch.arange(49)
    assert data.reference_frames(clip, k=4).tolist() == [0, 16, 32, 48]


# ----------------------------------------------------------------------------- subject images
def test_rgba_gray_and_palette_images_become_rgb(tmp_path):
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # red at half alpha: alpha is dropped, the colour kept
    write_image(tmp_path / "a.png", rgba, "png", "rgba", "rgba")
    write_image(tmp_path / "b.png", np.full((32, 48), 77, np.uint8), "png", "gray", "gray")
    palette = np.zeros((256, 4), np.uint8)
    palette[0] = [255, 0, 0, 200]  # ARGB: blue
    write_image(tmp_path / "c.png", (np.zeros((32, 48), np.uint8), palette), "png", "pal8", "pal8")
    got = data.load_images(tmp_path, height=32, width=48)
    expected = torch.tensor([[200, 0, 0], [77, 77, 77], [0, 0, 200]], dtype=torch.uint8)[:, None, None]
    expected = expected.expand(3, 32, 48, 3)
    assert got.shape == (3, 32, 48, 3) and torch.equal(got, expected), diff(got, expected)


def test_short_side_resize_and_center_crop_never_stretch(tmp_path):
    img = np.zeros((100, 200, 3), np.uint8)  # 2:1, red left band, green middle, blue right band
    img[:, :40, 0], img[:, 40:160, 1], img[:, 160:, 2] = 255, 255, 255
    write_image(tmp_path / "wide.png", img, "png", "rgb24", "rgb24")
    got = data.load_images(tmp_path, height=64, width=64)
    # 100 -> 64 rows, 200 -> 128 columns, centre 64 columns = source columns 50..150: green only
    assert got.shape == (1, 64, 64, 3), got.shape
    green = torch.tensor([0, 255, 0], dtype=torch.uint8).expand_as(got)
    assert absdiff(got, green).max() <= 2, f"side bands leaked in (stretched?): {diff(got, green)}"


def test_jpeg_exif_orientation_6_is_turned_clockwise(tmp_path):
    stored = marker(32, 64)
    write_image(tmp_path / "s.jpg", stored, "mjpeg", "rgb24", "yuvj444p")
    raw = (tmp_path / "s.jpg").read_bytes()
    tiff = b"II*\0" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + b"\0" * 4
    app1 = b"Exif\0\0" + tiff  # EXIF Orientation 6: the stored image must turn 90 degrees clockwise
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1  # APP1, right after the SOI marker
    (tmp_path / "s.jpg").write_bytes(raw[:2] + segment + raw[2:])
    got = data.load_images(tmp_path, height=64, width=32)[0]
    expected = np.rot90(stored, k=-1)  # k = -1: clockwise
    assert absdiff(got, expected).mean() < 4, diff(got, expected)


def test_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path):
    write_image(tmp_path / "good.png", np.full((32, 48, 3), 9, np.uint8), "png", "rgb24", "rgb24")
    (tmp_path / "bad.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 2000, np.uint8).tobytes())
    with pytest.warns(UserWarning, match="bad.jpg"):
        got = data.load_images(tmp_path, height=32, width=48)
    assert got.shape[0] == 1, got.shape


def test_truncated_jpeg_is_skipped_with_a_warning(tmp_path):
    """Half a download: FFmpeg decodes it without complaint, the lower half grey, unless errors explode."""
    whole = (EXAMPLES / "dog6" / "00.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(whole)
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.warns(UserWarning, match="skipping .*cut.jpg"):
        got = data.load_images(tmp_path, height=32, width=48)
    assert got.shape[0] == 1, got.shape


def test_missing_subject_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="subject folder not found"):
        data.load_images(tmp_path / "nope")


def test_folder_without_images_is_a_clear_error_listing_its_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no \.jpg.*readme\.txt"):
        data.load_images(tmp_path)


def test_folder_with_only_corrupt_images_is_a_clear_error_listing_them(tmp_path):
    for name in ("x.jpg", "y.png"):
        (tmp_path / name).write_bytes(b"\x00garbage" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"no decodable image.*x\.jpg, y\.png"):
            data.load_images(tmp_path)


# ----------------------------------------------------------------------------- writing mp4
def test_write_video_reads_back_as_h264_yuv420p_at_8fps(tmp_path):
    frames = torch.from_numpy(gray_frames(9))
    path = data.write_video(tmp_path / "out.mp4", frames, fps=8)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        got = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
        props = (len(got), s.height, s.width, s.codec_context.name, s.codec_context.pix_fmt, s.average_rate)
    assert props == (9, 32, 48, "h264", "yuv420p", 8), props
    assert indices(torch.from_numpy(np.stack(got))) == list(range(9)), diff(np.stack(got), frames)


@pytest.mark.parametrize("fps", [Fraction(24000, 1001), 8.0])
def test_write_video_accepts_fraction_and_float_rates(tmp_path, fps):
    path = data.write_video(tmp_path / "out.mp4", torch.zeros(4, 16, 16, 3, dtype=torch.uint8), fps=fps)
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == Fraction(fps), c.streams.video[0].average_rate


def test_write_video_same_frames_give_identical_bytes(tmp_path):
    frames = torch.randint(0, 256, (9, 64, 96, 3), dtype=torch.uint8)  # seeded by conftest
    clip = encode(tmp_path / "clip.mp4", gray_frames(12), rate=24)
    hashes = set()
    for i in range(6):  # unrelated decoding in between: x264 with B-frames made small frames drift after it
        data.load_clip(clip, num_frames=4, height=32, width=48)
        hashes.add(
            hashlib.sha256(data.write_video(tmp_path / f"{i}.mp4", frames.clone()).read_bytes()).hexdigest()
        )
    assert len(hashes) == 1, f"{len(hashes)} different files from the same frames"


def test_write_video_is_atomic(tmp_path, monkeypatch):
    path = data.write_video(tmp_path / "v.mp4", torch.zeros(3, 16, 16, 3, dtype=torch.uint8))
    before = path.read_bytes()
    calls = []

    def failing(image, format):  # fails on the second frame, mid-file
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return av.VideoFrame.from_ndarray(image, format=format)

    monkeypatch.setattr(data.av.VideoFrame, "from_ndarray", staticmethod(failing))
    with pytest.raises(RuntimeError, match="disk full"):
        data.write_video(path, torch.full((3, 16, 16, 3), 255, dtype=torch.uint8))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_atomic_write_syncs_the_bytes_before_the_rename(tmp_path, monkeypatch):
    """Checkpoints, videos, the cache and reports go through it: a crash after the rename must not find an
    empty file where the old one was."""
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), replace(a, b))[1])
    data.atomic_write(tmp_path / "x.bin", lambda tmp: tmp.write_bytes(b"abc"))
    assert events == ["fsync", "replace"] and (tmp_path / "x.bin").read_bytes() == b"abc"


@pytest.mark.parametrize(
    "frames, message",
    [
        (torch.zeros(2, 15, 16, 3, dtype=torch.uint8), "even height and width"),
        (torch.zeros(2, 3, 16, 16), "uint8"),
    ],
)
def test_write_video_rejects_odd_sizes_and_float_frames(tmp_path, frames, message):
    with pytest.raises(ValueError, match=message):
        data.write_video(tmp_path / "x.mp4", frames)


def test_to_float_and_to_uint8_round_trip():
    frames = torch.randint(0, 256, (2, 4, 6, 3), dtype=torch.uint8)
    video = data.to_float(frames)
    assert video.shape == (2, 3, 4, 6) and video.min() >= -1 and video.max() <= 1
    assert torch.equal(data.to_uint8(video), frames), diff(data.to_uint8(video), frames)


# ----------------------------------------------------------------------------- the tensor cache
def test_cache_key_follows_content_and_model_id(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"one")
    b.write_bytes(b"one")  # same bytes, another name
    key = data.cache_key([a], "tiny")
    assert data.cache_key([b], "tiny") == key, "a renamed copy must keep the key"
    assert data.cache_key([a], "cogvideox-5b") != key, "another model must change the key"
    a.write_bytes(b"two")
    assert data.cache_key([a], "tiny") != key, "new file content must change the key"


def test_load_or_compute_calls_fn_once_then_reads_disk(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"latents": torch.randn(2, 3), "emb": torch.arange(4, dtype=torch.bfloat16)}

    first = data.load_or_compute(tmp_path, "k", fn)
    second = data.load_or_compute(tmp_path, "k", fn)
    assert len(calls) == 1 and all(torch.equal(first[n], second[n]) for n in first), calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"], list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- examples/
def test_example_subject_dog6_loads_five_images():
    images = data.load_images(EXAMPLES / "dog6")
    assert images.shape == (5, 480, 720, 3) and images.dtype == torch.uint8, images.shape


def test_example_motion_clip_gives_49_frames_at_8fps():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # long enough: no repeated frames
        frames, info = data.load_clip(EXAMPLES / "motion.mp4")
    steps = np.diff(info.times)
    assert frames.shape == (49, 480, 720, 3) and info.repeated == 0, (frames.shape, info.describe())
    assert np.allclose(steps, 1 / 8, atol=1e-3), f"frame spacing {steps.min():.4f}..{steps.max():.4f} s"
