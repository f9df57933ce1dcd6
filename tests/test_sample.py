"""sample.py's command line on the tiny model: the mp4 it writes, determinism by seed, the flags reaching the
sampler, one-line errors with exit code 2, and DualReal adapters conditioned on a subject image.

The CLI runs in-process through sample.main (no interpreter start-up), once through a subprocess for the
`python sample.py` entry point. Small settings keep each run about a second: 2 steps, 9 frames, 32x48.
The numerical match to diffusers' CogVideoXPipeline is tests/test_pipeline.py.
"""

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import adapters
import encoders
import model
import sample

REPO = Path(__file__).resolve().parent.parent
IMAGE, OTHER_IMAGE = REPO / "examples/dog6/00.jpg", REPO / "examples/dog6/01.jpg"
SMALL = ["--model", "tiny", "--prompt", "a sks dog playing guitar on the beach", "--steps", "2"]
SMALL += ["--frames", "9", "--height", "32", "--width", "48"]


def generate(folder: Path, name: str, *extra: str) -> Path:
    out = folder / name
    assert sample.main([*SMALL, "--out", str(out), *extra]) == out
    return out


def frames(path: Path) -> np.ndarray:
    """uint8 (T, H, W, 3), decoded with PyAV."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mean_abs_diff(a: Path, b: Path) -> float:
    return float(np.abs(frames(a).astype(float) - frames(b).astype(float)).mean())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Videos shared by several tests: the default settings twice, another seed."""
    folder = tmp_path_factory.mktemp("runs")
    return {
        "base": generate(folder, "base.mp4"),
        "again": generate(folder, "again.mp4"),
        "seed7": generate(folder, "seed7.mp4", "--seed", "7"),
    }


# ------------------------------------------------------------------------------------------ the video file


def test_writes_h264_yuv420p_mp4_with_requested_frames_and_size(runs):
    with av.open(str(runs["base"])) as container:
        stream = container.streams.video[0]
        codec, pix_fmt, rate = stream.codec_context.name, stream.codec_context.pix_fmt, stream.average_rate
    got = (codec, pix_fmt, rate, frames(runs["base"]).shape)
    assert got == ("h264", "yuv420p", 8, (9, 32, 48, 3)), got


def test_same_seed_gives_an_identical_file(runs):
    assert digest(runs["base"]) == digest(runs["again"]), (
        f"mean abs diff {mean_abs_diff(runs['base'], runs['again'])}"
    )


def test_another_seed_gives_another_video(runs):
    diff = mean_abs_diff(runs["base"], runs["seed7"])
    assert diff > 1.0, f"seeds 42 and 7: mean abs pixel difference only {diff:.3f}"


def test_default_size_is_the_transformers_trained_size(tmp_path):
    """tiny is trained on an 8x12 latent grid: 64x96 pixels (CogVideoX: 60x90 latents, 480x720)."""
    out = tmp_path / "default.mp4"
    sample.main(["--model", "tiny", "--prompt", "a dog", "--steps", "1", "--frames", "1", "--out", str(out)])
    assert frames(out).shape == (1, 64, 96, 3), frames(out).shape


@pytest.mark.parametrize(
    "flags,versus",
    [(["--sampler", "ddim"], []), (["--dynamic-cfg"], []), (["--cfg-by-index"], ["--dynamic-cfg"])],
    ids=["ddim-vs-dpm", "dynamic-vs-static-cfg", "cfg-by-index-vs-by-timestep"],
)
def test_sampling_flags_reach_the_sampler(runs, tmp_path, flags, versus):
    base = runs["base"] if not versus else generate(tmp_path, "versus.mp4", *versus)
    diff = mean_abs_diff(generate(tmp_path, "flags.mp4", *flags), base)
    assert diff > 1.0, f"{flags} vs {versus}: mean abs pixel difference only {diff:.3f}"


# ------------------------------------------------------------------------------------------ DualReal adapters


def adapters_file(folder: Path, cond_dim: int = 32, num_layers: int = 2) -> Path:
    """Adapters on the tiny model as if trained: random adapter weights (W_up starts at zero, which would
    change nothing). The controller keeps its init, omega = 0.5: the motion adapters, and e, always count."""
    torch.manual_seed(0)
    base = model.CogVideoXTransformer(replace(model.get_config("tiny"), num_layers=num_layers))
    ext = adapters.attach(base, adapters.AdapterConfig(cond_dim=cond_dim))
    with torch.no_grad():
        for p in ext.family_params("identity") + ext.family_params("motion"):
            p.add_(torch.randn_like(p) * 0.5)
    path = folder / f"adapters-{cond_dim}-{num_layers}.safetensors"
    adapters.save_adapters(ext, str(path))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """An adapters file, and videos made with it (official CFG: e in both branches)."""
    folder = tmp_path_factory.mktemp("adapters")
    path = adapters_file(folder)
    with_e = ["--adapters", str(path), "--reference", str(IMAGE)]
    return {"file": path, "with": generate(folder, "with.mp4", *with_e), "args": with_e, "folder": folder}


def test_adapters_change_the_video(runs, trained):
    diff = mean_abs_diff(trained["with"], runs["base"])
    assert diff > 1.0, f"with vs without adapters: mean abs pixel difference only {diff:.3f}"


def test_zero_uncond_e_changes_the_video(trained):
    out = generate(trained["folder"], "zero.mp4", *trained["args"], "--zero-uncond-e")
    diff = mean_abs_diff(out, trained["with"])
    assert diff > 1.0, f"--zero-uncond-e vs e in both branches: mean abs pixel difference only {diff:.3f}"


def test_reference_image_conditions_the_adapters(trained):
    out = generate(
        trained["folder"], "other.mp4", "--adapters", str(trained["file"]), "--reference", str(OTHER_IMAGE)
    )
    diff = mean_abs_diff(out, trained["with"])
    assert diff > 1.0, f"two reference images: mean abs pixel difference only {diff:.3f}"


# ------------------------------------------------------------------------------------------ one-line errors


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Files for the bad-input cases."""
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "file").write_text("a file where a folder should be")
    (folder / "notes.jpg").write_text("not an image")
    (folder / "taken.mp4").write_text("a video the user keeps")
    encoders.CLIPVisionConfig(**encoders.TINY_CLIP).save_pretrained(folder / "clip-config-only")  # no weights
    good, dim16, deep = adapters_file(folder), adapters_file(folder, 16), adapters_file(folder, num_layers=3)
    return dict(dir=folder, good=good, dim16=dim16, deep=deep)


BAD = {  # name -> (extra arguments, given the `inputs` paths; a phrase the one-line error must contain)
    "unknown sampler": (lambda p: ["--sampler", "euler"], "invalid choice"),
    "frames not 8k+1": (lambda p: ["--frames", "10"], "8k+1"),
    "frames 4k+1 but not 8k+1": (lambda p: ["--frames", "13"], "8k+1"),  # 4 latents decode to 16 frames
    "height not /16": (lambda p: ["--height", "40"], "multiples of 16"),
    "width zero": (lambda p: ["--width", "0"], "multiples of 16"),
    "steps zero": (lambda p: ["--steps", "0"], "--steps >= 1"),
    "out not mp4": (lambda p: ["--out", str(p["dir"] / "video.avi")], ".mp4"),
    "out unwritable": (lambda p: ["--out", str(p["dir"] / "file" / "x.mp4")], "cannot write"),
    "out exists": (lambda p: ["--out", str(p["dir"] / "taken.mp4")], "exists: pass --overwrite"),
    "unknown device": (lambda p: ["--device", "tpu"], "--device tpu"),
    "no checkpoint": (lambda p: ["--model", str(p["dir"] / "missing")], "no folder"),
    "a newline in a path": (lambda p: ["--model", str(p["dir"] / "two\nlines")], "no folder"),
    "clip model without weights": (lambda p: ["--adapters", str(p["good"]), "--reference", str(IMAGE),
                                              "--clip-model", str(p["dir"] / "clip-config-only")],
                                   "no file named"),
    "reference alone": (lambda p: ["--reference", str(IMAGE)], "--adapters and --reference"),
    "adapters alone": (lambda p: ["--adapters", str(p["good"])], "--adapters and --reference"),
    "adapters missing": (lambda p: ["--adapters", str(p["dir"] / "no.safetensors"), "--reference",
                                    str(IMAGE)], "no adapters file"),
    "reference missing": (lambda p: ["--adapters", str(p["good"]), "--reference", str(p["dir"] / "no.jpg")],
                          "reference image not found"),
    "reference not an image": (lambda p: ["--adapters", str(p["good"]), "--reference",
                                          str(p["dir"] / "notes.jpg")], "cannot decode"),
    "adapters for another CLIP": (lambda p: ["--adapters", str(p["dim16"]), "--reference", str(IMAGE)],
                                  "expects a 16-d image embedding"),
    "adapters for another base": (lambda p: ["--adapters", str(p["deep"]), "--reference", str(IMAGE)],
                                  "were trained for 3 blocks"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_code_2(case, inputs, tmp_path, capsys):
    extra, phrase = BAD[case]
    out = tmp_path / "never.mp4"
    with pytest.raises(SystemExit) as stop:
        sample.main([*SMALL, "--out", str(out), *extra(inputs)])
    err = capsys.readouterr().err.strip()
    ok = stop.value.code == 2 and len(err.splitlines()) == 1 and phrase in err and not out.exists()
    assert ok, f"exit code {stop.value.code}, stderr {err!r}, wrote the video: {out.exists()}"


def test_script_exits_2_with_one_line_and_no_traceback(tmp_path):
    args = [*SMALL, "--frames", "12", "--out", str(tmp_path / "x.mp4")]
    result = subprocess.run([sys.executable, "sample.py", *args], capture_output=True, text=True, cwd=REPO)
    err = result.stderr.strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1 and "8k+1" in err, (result.returncode, err)
