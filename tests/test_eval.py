"""eval.py: the metric formulas, the report, the input errors and the controller trace, on tiny models.

No downloads: CLIP and DINO are tiny random models built from configs (saved with save_pretrained for the CLI
tests), the CLIP tokenizer is a 54-token vocabulary written on the spot, and the controller trace runs the
repo's `tiny` transformer and encoders. Identities that hold for any weights are checked exactly; the paper's
numbers are not (they need the real checkpoints).
"""

import json
import runpy
import sys
import weakref
from dataclasses import asdict

import av
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

import adapters
import data
import diffusion
import encoders
import eval as ev
import model
from data import write_video


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(clip, tokenizer, dino, clip_dir, dino_dir): tiny random models, also saved with save_pretrained."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("models")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {f"{c}</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(small, vocab_size=54, max_position_embeddings=77, bos_token_id=52, eos_token_id=53)
    vision = dict(small, image_size=224, patch_size=32)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    dino = ViTModel(ViTConfig(**small, image_size=224, patch_size=16), add_pooling_layer=False).eval()
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    dino.save_pretrained(root / "dino")
    return clip, tokenizer, dino, root / "clip", root / "dino"


def encoder(models, which: str):
    """(encode, prep) of eval.image_encoders for "clip" or "dino"."""
    return ev.image_encoders(models[0], models[2])[which]


def gradient_image(h: int = 96, w: int = 128) -> torch.Tensor:
    """A structured uint8 (h, w, 3) image: smooth colour ramps."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (torch.stack([xx, yy, xx * yy], -1) * 255).round().to(torch.uint8)


def noise_video(t: int = 8, h: int = 96, w: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------- metric identities and formulas
def test_static_video_has_full_temporal_consistency_and_no_flicker(models):
    frames = gradient_image()[None].repeat(6, 1, 1, 1)  # (6, H, W, 3), identical frames
    t_cons = ev.temporal_consistency(ev.embed_frames(*encoder(models, "clip"), frames))
    flicker = ev.temporal_flickering(frames)
    assert abs(t_cons - 1) < 1e-5, f"T-Cons of identical frames {t_cons}, |diff| {abs(t_cons - 1):.2e}"
    assert flicker == 1.0, f"flicker of identical frames {flicker}, |diff| {abs(flicker - 1):.2e}"


@pytest.mark.parametrize("which", ["clip", "dino"])
def test_image_scored_against_a_video_of_itself_is_one(models, which):
    image = gradient_image()
    ref = ev.embed_frames(*encoder(models, which), image[None])  # (1, E)
    frames = ev.embed_frames(*encoder(models, which), image[None].repeat(20, 1, 1, 1))  # (20, E): 16 + 4
    score = ev.alignment(ref, frames)
    assert abs(score - 1) < 1e-5, (
        f"{which}-I of a video of its reference: {score}, |diff| {abs(score - 1):.2e}"
    )


@pytest.mark.parametrize("which", ["clip", "dino"])
def test_noise_video_scores_clearly_below_its_reference(models, which):
    ref = ev.embed_frames(*encoder(models, which), gradient_image()[None])
    score = ev.alignment(ref, ev.embed_frames(*encoder(models, which), noise_video()))
    assert score < 0.99, (
        f"{which}-I of random noise against a structured reference is {score}, expected < 0.99"
    )


@pytest.mark.parametrize("prep", [ev.CLIP_PREP, ev.DINO_PREP], ids=["clip", "dino"])
def test_preprocessing_matches_the_reference_pil_pipeline(prep):
    """The reference scripts run torchvision on PIL images: Resize(short side, bicubic), CenterCrop, ToTensor,
    Normalize. Rebuilt here with PIL itself, on noise next to a smooth ramp: at most one uint8 step apart."""
    image = pytest.importorskip("PIL.Image")
    frame = torch.cat([gradient_image(180, 270), noise_video(1, 180, 270)[0]], dim=1)  # (180, 540, 3)
    h, w = frame.shape[:2]
    size = (int(prep.resize * w / h), prep.resize)  # PIL (width, height); torchvision truncates the long side
    ref = torch.from_numpy(np.array(image.fromarray(frame.numpy()).resize(size, image.BICUBIC))).float() / 255
    top, left = round((ref.shape[0] - prep.crop) / 2), round((ref.shape[1] - prep.crop) / 2)
    ref = ref[top : top + prep.crop, left : left + prep.crop].permute(2, 0, 1)  # (3, crop, crop)
    seen = []
    ev.embed_frames(lambda x: seen.append(x) or x.flatten(1), prep, frame[None])
    ours = seen[0][0] * torch.tensor(prep.std)[:, None, None] + torch.tensor(prep.mean)[:, None, None]
    diff = (ours - ref).abs()
    assert diff.max() <= 1 / 255 + 1e-6, (
        f"max |diff| {diff.max() * 255:.2f}/255, mean {diff.mean() * 255:.4f}/255"
    )


def test_flickering_matches_a_hand_computed_value():
    frames = torch.zeros(3, 2, 2, 3, dtype=torch.uint8)
    frames[1] = 10  # pair 1: every value differs by 10 -> mean 10
    frames[2] = 10
    frames[2, 0] = 40  # pair 2: half the values differ by 30 -> mean 15
    expected = (255 - (10 + 15) / 2) / 255  # VBench: (255 - mean over pairs) / 255 = 0.950980...
    got = ev.temporal_flickering(frames)
    assert abs(got - expected) < 1e-7, (
        f"flicker {got} vs hand-computed {expected}, |diff| {abs(got - expected):.2e}"
    )


def constant_flow(magnitudes: list[float]):
    """A fake FlowFn: frame k is filled with the value k; the pair (k, k+1) gets a uniform flow of magnitude
    magnitudes[k], split as (0.6 m, 0.8 m) so that the magnitude is the vector norm, not one component."""

    def flow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m = magnitudes[int(a[0, 0, 0])]
        return torch.tensor([0.6 * m, 0.8 * m]).view(2, 1, 1).expand(2, *a.shape[:2])

    return flow


def indexed_frames(t: int, size: int = 64) -> torch.Tensor:
    return torch.arange(t, dtype=torch.uint8).view(t, 1, 1, 1).expand(t, size, size, 3).clone()


@pytest.mark.parametrize("n_above, expected", [(4, True), (3, False)])
def test_dynamic_degree_rule_with_a_fake_flow(n_above, expected):
    # 17 frames at 8 fps, 64x64: threshold 6 * 64 / 256 = 1.5 px, needs round(4 * 17 / 16) = 4 pairs above it
    mags = [2.0] * n_above + [1.0] * (16 - n_above)
    dynamic, mean_mag = ev.dynamic_degree(indexed_frames(17), 8.0, constant_flow(mags))
    want = sum(mags) / len(mags)
    assert dynamic is expected, f"{n_above} of 16 pairs above 1.5 px (4 needed): got dynamic={dynamic}"
    assert abs(mean_mag - want) < 1e-5, (
        f"mean top-5% magnitude {mean_mag} vs {want}, |diff| {abs(mean_mag - want):.2e}"
    )


def test_dynamic_degree_uses_the_top_five_percent_and_subsamples_to_8_fps():
    seen = []

    def flow(a, b):  # 5 % of the 64x64 pixels (204) move 10 px, the rest 0: the top-5 % mean is 10
        seen.append((int(a[0, 0, 0]), int(b[0, 0, 0])))
        f = torch.zeros(2, 64, 64)
        f[0].view(-1)[: int(0.05 * 64 * 64)] = 10.0
        return f

    dynamic, mean_mag = ev.dynamic_degree(indexed_frames(25), 24.0, flow)  # 24 fps -> every 3rd frame
    assert seen == [(k, k + 3) for k in range(0, 22, 3)], f"pairs compared at 24 fps: {seen}"
    assert abs(mean_mag - 10.0) < 1e-5, f"top-5% mean {mean_mag} vs 10, |diff| {abs(mean_mag - 10):.2e}"
    assert dynamic, "9 frames, all 8 pairs at 10 px > 1.5 px, 2 needed: should be dynamic"


def test_dynamic_degree_refuses_a_video_left_with_one_frame_at_8_fps():
    flow = constant_flow([2.0] * 4)
    with pytest.raises(ValueError, match=r"clip.mp4: 3 frame\(s\) at 24 fps .*--no-flow"):
        ev.dynamic_degree(indexed_frames(3), 24.0, flow, "clip.mp4")  # every 3rd frame: frame 0 only
    with pytest.raises(ValueError, match="2 frame"):
        ev.dynamic_degree(indexed_frames(2), 24.0, flow)
    assert ev.dynamic_degree(indexed_frames(4), 24.0, flow) == (True, 2.0), "frames 0 and 3: one pair"


def test_markdown_table_follows_the_column_order():
    row = dict.fromkeys(ev.COLUMNS, 0.5) | {"motion_smoothness": None, "dynamic_degree": True}
    table = ev.markdown({"v.mp4": row}, row).splitlines()
    assert table[0] == "| video | " + " | ".join(ev.COLUMNS.values()) + " |", table[0]
    cells = ["0.5000"] * 5 + ["n/a", "yes", "0.5000"]  # motion smoothness null, dynamic degree a boolean
    assert table[2] == "| v.mp4 | " + " | ".join(cells) + " |", table[2]


# ----------------------------------------------------------------------------- the CLI and its inputs
def write_png(path, image: torch.Tensor) -> None:
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        for packet in [*s.encode(av.VideoFrame.from_ndarray(image.numpy(), format="rgb24")), *s.encode()]:
            c.mux(packet)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """videos/{static,noise}.mp4, subject/{a,b}.png, prompts.txt (the noise video's prompt is too long)."""
    tmp_path = tmp_path_factory.mktemp("inputs")
    (tmp_path / "videos").mkdir()
    (tmp_path / "subject").mkdir()
    write_video(tmp_path / "videos" / "static.mp4", gradient_image()[None].repeat(5, 1, 1, 1), fps=8)
    write_video(tmp_path / "videos" / "noise.mp4", noise_video(5), fps=8)
    write_png(tmp_path / "subject" / "a.png", gradient_image())
    write_png(tmp_path / "subject" / "b.png", gradient_image().flip(1))
    long_prompt = " ".join(["dog"] * 30)  # 30 words of 3 tokens: more than CLIP's 77
    (tmp_path / "prompts.txt").write_text(f"# comment\nstatic.mp4|||a dog\n\nnoise.mp4|||{long_prompt}\n")
    return tmp_path


@pytest.fixture(scope="module")
def report(models, inputs):
    """The CLI's report on `inputs`, with `import torchvision` failing as if it were not installed (also when
    it was imported already)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("torchvision", "torchvision.models", "torchvision.models.optical_flow"):
            mp.setitem(sys.modules, name, None)
        return run_cli(models, inputs)


def run_cli(models, inputs, *extra) -> dict:
    out = inputs / "out" / "report.json"
    args = ["--videos", str(inputs / "videos"), "--subject", str(inputs / "subject")]
    args += ["--prompts", str(inputs / "prompts.txt"), "--out", str(out), "--device", "cpu"]
    ev.main(args + ["--clip-model", str(models[3]), "--dino-model", str(models[4]), *extra])
    return json.loads(out.read_text())


def test_report_has_every_metric_per_video_and_the_averages(report):
    keys = list(ev.COLUMNS)
    assert sorted(report["videos"]) == ["noise.mp4", "static.mp4"], (
        f"videos in report: {list(report['videos'])}"
    )
    for name, row in report["videos"].items():
        assert set(keys) <= set(row), f"{name} lacks {set(keys) - set(row)}"
        assert all(isinstance(row[k], float) for k in keys[:5]), f"{name}: {[row[k] for k in keys[:5]]}"
    assert list(report["average"]) == keys, f"averages: {list(report['average'])}"
    for k in keys[:5]:
        mean = sum(r[k] for r in report["videos"].values()) / 2
        assert abs(report["average"][k] - mean) < 1e-9, f"average {k}: {report['average'][k]} vs {mean}"
    assert report["videos"]["noise.mp4"]["prompt_truncated"] is True, "a prompt over 77 tokens is not flagged"
    assert report["videos"]["static.mp4"]["prompt_truncated"] is False, (
        "a short prompt is flagged as truncated"
    )


def test_report_agrees_with_the_metric_functions(models, inputs, report):
    row = report["videos"]["static.mp4"]
    frames, _ = ev.read_video(inputs / "videos" / "static.mp4")
    feats = ev.embed_frames(*encoder(models, "dino"), frames)
    found = sorted((inputs / "subject").glob("*.png"))
    images = [torch.from_numpy(data.read_image(p).copy())[None] for p in found]
    refs = torch.cat([ev.embed_frames(*encoder(models, "dino"), image) for image in images])
    for key, want in [
        ("temporal_flickering", ev.temporal_flickering(frames)),
        ("dino_i", ev.alignment(refs, feats)),
    ]:
        assert abs(row[key] - want) < 1e-6, f"{key}: report {row[key]} vs direct {want}"


def test_missing_torchvision_reports_dynamic_degree_as_null_with_install_hint(report):
    assert all(r["dynamic_degree"] is None for r in report["videos"].values()), "dynamic degree faked"
    assert "pip install torchvision" in report["unavailable"]["dynamic_degree"], report["unavailable"]


def test_dynamic_degree_reported_through_an_injected_flow(models, inputs, monkeypatch):
    fake = lambda a, b: torch.full((2, *a.shape[:2]), 3.0)  # 3 px in x and y: |flow| = 4.243 px everywhere
    monkeypatch.setattr(ev, "load_raft", lambda device: (fake, None))
    report = run_cli(models, inputs)  # 96x128 frames: threshold 6 * 96 / 256 = 2.25 px
    row = report["videos"]["static.mp4"]
    assert row["dynamic_degree"] is True and abs(row["flow_top5_px"] - 18**0.5) < 1e-5, row
    assert report["average"]["dynamic_degree"] == 1.0, report["average"]


def test_motion_smoothness_is_reported_unavailable_not_faked(report):
    assert all(r["motion_smoothness"] is None for r in report["videos"].values()), "motion smoothness faked"
    assert report["average"]["motion_smoothness"] is None, report["average"]
    assert "AMT-S" in report["unavailable"]["motion_smoothness"], report["unavailable"]


def test_empty_video_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a video nor a folder of .* videos"):
        ev.list_videos([str(tmp_path / "empty")])


def test_non_video_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a video"):
        ev.list_videos([str(tmp_path / "notes.txt")])
    (tmp_path / "broken.mp4").write_bytes(b"not an mp4 at all")
    with pytest.raises(ValueError, match="cannot decode .*broken.mp4"):
        ev.read_video(tmp_path / "broken.mp4")


def test_prompts_that_do_not_match_the_videos_are_a_clear_error(inputs):
    videos = ev.list_videos([str(inputs / "videos")])
    (inputs / "p.txt").write_text("static.mp4|||a dog\n")
    with pytest.raises(ValueError, match="no prompt for video.*noise.mp4"):
        ev.read_prompts(inputs / "p.txt", videos, inputs / "subject")
    (inputs / "p.txt").write_text("static.mp4|||a dog\nnoise.mp4|||a dog\nother.mp4|||a cat\n")
    with pytest.raises(ValueError, match="other.mp4 in .* match no video"):
        ev.read_prompts(inputs / "p.txt", videos, inputs / "subject")
    (inputs / "p.txt").write_text("static.mp4 a dog\n")
    with pytest.raises(ValueError, match=r"p.txt:1: expected `video\|\|\|prompt`"):
        ev.read_prompts(inputs / "p.txt", videos, inputs / "subject")


def test_prompt_file_accepts_both_line_formats(inputs, tmp_path):
    (inputs / "p.txt").write_text("# DreamVideo style, then ours\na.mp4|||subject|||a dog\nb.mp4 ||| a cat\n")
    got = ev.read_prompts(inputs / "p.txt", [tmp_path / "a.mp4", tmp_path / "b.mp4"], tmp_path / "other")
    assert got == {"a.mp4": ("a dog", inputs / "subject"), "b.mp4": ("a cat", tmp_path / "other")}, got


def test_cli_turns_a_user_error_into_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "an\nempty").mkdir()  # a newline in a path (a shell paste) still gives one line
    (tmp_path / "p.txt").write_text("a.mp4|||a dog\n")
    argv = ["eval.py", "--videos", str(tmp_path / "an\nempty"), "--prompts", str(tmp_path / "p.txt")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(ev.__file__, run_name="__main__")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: --videos") and "\n" not in err, (
        exit_info.value,
        err,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    argv = ["eval.py", "--videos", str(tmp_path), "--prompts", str(tmp_path / "p.txt"), "--device", "cuda"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(ev.__file__, run_name="__main__")
    err = capsys.readouterr().err.strip()
    want = "error: --device cuda: no CUDA GPU is visible here; use --device cpu"
    assert exit_info.value.code == 2 and err == want, (exit_info.value.code, err)


# ----------------------------------------------------------------------------- the controller plot
def tiny_adapters(path, bias: list[float] | None = None, base: str = "tiny") -> None:
    """adapters.safetensors for the tiny model (or `base`) with 2 controller groups. The controller's last
    layer is random so that ω changes along the trajectory (at initialization it is exactly 0.5 everywhere);
    with `bias`, its weight is zero instead, so that ω = sigmoid(bias) for any input."""
    ext = adapters.attach(
        model.load_transformer(base), adapters.AdapterConfig(cond_dim=32, groups=2)
    )  # e: 32-d
    last = ext.controller.head[-1]
    if bias is None:
        torch.nn.init.normal_(last.weight, std=1.0)
    else:
        last.bias.data = torch.tensor(bias)
    adapters.save_adapters(ext, str(path))


def test_controller_trace_records_one_identity_weight_per_step_and_group(inputs, tmp_path):
    tiny_adapters(tmp_path / "a.safetensors")
    timesteps, w = ev.controller_trace(
        tmp_path / "a.safetensors", "a dog playing guitar", inputs / "subject", 5
    )
    assert len(timesteps) == 5 and w.shape == (5, 2), f"{len(timesteps)} timesteps, weights {tuple(w.shape)}"
    assert timesteps == sorted(timesteps, reverse=True), f"timesteps not in denoising order: {timesteps}"
    assert ((w > 0) & (w < 1)).all(), f"identity weights outside (0, 1): min {w.min()}, max {w.max()}"
    spread = (w - w[0]).abs().max().item()
    assert spread > 1e-3, f"the identity weight never changes over the steps (max change {spread:.2e})"


def test_controller_trace_is_one_minus_the_motion_share_per_group(inputs, tmp_path):
    tiny_adapters(
        tmp_path / "a.safetensors", bias=[2.0, -1.0]
    )  # ω = sigmoid(bias) = (0.881, 0.269), constant
    _, w = ev.controller_trace(tmp_path / "a.safetensors", "a dog", inputs / "subject", 3)
    want = (1 - torch.sigmoid(torch.tensor([2.0, -1.0]))).expand(3, 2)  # identity weights (0.119, 0.731)
    diff = (w - want).abs()
    assert diff.max() < 1e-6, f"trace {w.tolist()} vs 1 - ω {want[0].tolist()}; max |diff| {diff.max():.2e}"


def test_controller_trace_frees_the_encoders_before_the_transformer_moves(inputs, tmp_path, monkeypatch):
    """On a GPU, T5-XXL (9.5 GiB), CLIP-H and the 5B transformer (10.4 GiB) together overflow 24 GB: the
    transformer waits on the CPU until both encoders are gone, as in sample.py."""
    events, move = [], model.CogVideoXTransformer.to

    def tracked(load):  # an encoder loader whose encoders log their release
        def spy(*args, **kwargs):
            encoder = load(*args, **kwargs)
            weakref.finalize(encoder, events.append, "encoder freed")
            return encoder

        return spy

    def logged_move(self, *args, **kwargs):
        events.append("transformer moved")
        return move(self, *args, **kwargs)

    for name in ("load_text_encoder", "load_image_encoder"):
        monkeypatch.setattr(encoders, name, tracked(getattr(encoders, name)))
    monkeypatch.setattr(model.CogVideoXTransformer, "to", logged_move)
    tiny_adapters(tmp_path / "a.safetensors")
    ev.controller_trace(tmp_path / "a.safetensors", "a dog", inputs / "subject", 2)
    assert events.count("encoder freed") == 2 and events[-1] == "transformer moved", events


def test_controller_trace_reads_the_scheduler_folder_of_a_checkpoint_root(inputs, tmp_path, monkeypatch):
    """A base model given as a diffusers-saved checkpoint root: scheduler/ holds only scheduler_config.json,
    whose SNR shift (3, as 2B) must reach the sampler. The encoders are the tiny ones (no downloads)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXTransformer3DModel

    CogVideoXTransformer3DModel(**asdict(model.get_config("tiny"))).save_pretrained(tmp_path / "transformer")
    CogVideoXDDIMScheduler(  # CogVideoX-2B's scheduler_config.json
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0, timestep_spacing="trailing",
    ).save_pretrained(tmp_path / "scheduler")  # fmt: skip
    tiny_adapters(tmp_path / "a.safetensors", base=str(tmp_path))
    load_t5, load_clip, schedules = encoders.load_text_encoder, encoders.load_image_encoder, []
    monkeypatch.setattr(encoders, "load_text_encoder", lambda path, *a, **k: load_t5("tiny", *a, **k))
    monkeypatch.setattr(encoders, "load_image_encoder", lambda path, *a, **k: load_clip("tiny", *a, **k))
    load_schedule = diffusion.load_schedule
    monkeypatch.setattr(
        diffusion, "load_schedule", lambda src: schedules.append(load_schedule(src)) or schedules[-1]
    )
    timesteps, w = ev.controller_trace(tmp_path / "a.safetensors", "a dog", inputs / "subject", 2)
    assert w.shape == (2, 2) and timesteps == [999, 499], f"timesteps {timesteps}, weights {tuple(w.shape)}"
    want = diffusion.Schedule(snr_shift_scale=3.0).alphas_cumprod
    assert torch.equal(schedules[0].alphas_cumprod, want), "the checkpoint's SNR shift 3 was not used"


def test_plot_controller_cli_writes_a_steps_by_groups_csv_and_a_png(inputs, tmp_path):
    tiny_adapters(tmp_path / "a.safetensors")
    out = tmp_path / "plot" / "weights"
    args = ["--plot-controller", str(tmp_path / "a.safetensors"), "--prompt", "a dog playing guitar"]
    ev.main(
        args + ["--subject", str(inputs / "subject"), "--steps", "4", "--out", str(out), "--device", "cpu"]
    )
    rows = [line.split(",") for line in out.with_suffix(".csv").read_text().splitlines()]
    assert rows[0] == ["step", "timestep", "group_0", "group_1"], rows[0]
    values = torch.tensor([[float(v) for v in r[2:]] for r in rows[1:]])
    assert values.shape == (4, 2), f"CSV body is {tuple(values.shape)}, expected (steps, groups) = (4, 2)"
    assert ((values > 0) & (values < 1)).all(), f"values outside (0, 1): {values}"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed: the PNG is optional")
    assert out.with_suffix(".png").stat().st_size > 0, "no PNG although matplotlib is installed"
