"""Render examples/motion.mp4: a red ball bouncing from left to right across a floor (numpy + PyAV).

A synthetic reference motion for the quick start and the tests: 6.5 s at 24 fps, 480x720, H.264 yuv420p.
It is deliberately *not* at 8 fps, so that data.load_clip's resampling by timestamp (every third frame) is
exercised on the shipped example. Five bounces, squash on each impact, a shadow that shrinks with height.
The output is byte-for-byte reproducible: data.write_video is deterministic (threads=1, bframes=0).

    python examples/make_motion_clip.py            # writes examples/motion.mp4
    python examples/make_motion_clip.py --out x.mp4
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, where data.py lives
import data  # noqa: E402

H, W, FPS, SECONDS = 480, 720, 24, 6.5
FLOOR = 380  # y of the floor line (pixels from the top)
RADIUS = 54
BOUNCES = 5


def smoothstep(edge: float, x: np.ndarray) -> np.ndarray:
    """1 inside (x < -edge), 0 outside (x > edge), a smooth ramp between: anti-aliased shape edges."""
    t = np.clip(0.5 - x / (2 * edge), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def background() -> np.ndarray:
    """Sky gradient above the floor, a darker floor below it: float (H, W, 3) in [0, 1]."""
    y = np.linspace(0, 1, H)[:, None, None]
    sky = (1 - y) * np.array([0.45, 0.68, 0.92]) + y * np.array([0.85, 0.92, 0.98])
    floor = np.array([0.55, 0.50, 0.42]) - 0.15 * (y - FLOOR / H)
    img = np.where(y < FLOOR / H, sky, floor)
    return np.broadcast_to(img, (H, W, 3)).copy()


def frame(t: float, bg: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The scene at time t (s): float (H, W, 3) in [0, 1]."""
    period = SECONDS / BOUNCES
    height = 220 * abs(np.sin(np.pi * t / period))  # ball bottom above the floor: |sin| arcs, one per bounce
    cx = 90 + (W - 180) * t / SECONDS  # constant speed to the right
    squash = 1 - 0.25 * max(0.0, 1 - height / 25)  # flatten by up to 25% when touching the floor
    rx, ry = RADIUS / np.sqrt(squash), RADIUS * squash  # keep the area roughly constant
    cy = FLOOR - height - ry
    img = bg.copy()
    # shadow: a soft dark ellipse on the floor, smaller and lighter the higher the ball
    s = 1 - height / 300
    d = np.sqrt(((xs - cx) / (RADIUS * 1.1 * s)) ** 2 + ((ys - FLOOR - 4) / (9 * s)) ** 2) - 1
    img *= 1 - 0.45 * s * smoothstep(0.4, d)[..., None]
    # ball: red with a highlight towards the upper left
    d = np.sqrt(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) - 1
    alpha = smoothstep(1.5 / RADIUS, d)[..., None]
    light = np.clip(1 - np.hypot(xs - (cx - rx / 3), ys - (cy - ry / 3)) / (1.6 * RADIUS), 0, 1)[..., None]
    ball = np.array([0.75, 0.08, 0.06]) + light**2 * np.array([0.25, 0.5, 0.45])
    return img * (1 - alpha) + np.clip(ball, 0, 1) * alpha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "motion.mp4")
    args = parser.parse_args()
    bg = background()
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    n = round(SECONDS * FPS)
    frames = np.stack([(frame(i / FPS, bg, ys, xs) * 255).round().astype(np.uint8) for i in range(n)])
    path = data.write_video(args.out, torch.from_numpy(frames), fps=FPS, crf=23)
    print(f"wrote {path}: {n} frames, {W}x{H}, {FPS} fps, {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
