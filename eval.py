"""Evaluation: the paper's metrics on generated videos (DualReal §4.1) and the controller plot (Fig. 7).

    python eval.py --videos outputs/ --subject examples/dog6 --prompts prompts.txt --out report.json
    python eval.py --plot-controller run/adapters.safetensors --prompt "a dog playing guitar" --out weights

CLIP-T, CLIP-I, DINO-I and T-Cons follow DreamVideo's public script (VGen metric/cal_metric_DreamVideo.py);
CLIP-I uses its ViT-B/32, not the paper's "enhanced CLIP" (no public weights). Temporal Flickering, Motion
Smoothness and Dynamic Degree are VBench's; Motion Smoothness needs the AMT-S network, which no package
provides, so it is null with the reason. Preprocessing is torch only, within 1/255 of the scripts' PIL one.
Tests (tests/test_eval.py): tiny random CLIP/ViT; identities, hand-computed formulas, a fake flow, the CLI.
Shapes: T frames, H x W pixels, E embedding width, R reference images, S denoising steps, n groups.
"""

import argparse
import json
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import av
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer, CLIPModel, ViTModel

import adapters
import checkpoint
import data
import diffusion
import encoders
import model

COLUMNS = dict(  # report key -> column title: the paper's seven metrics, then the mean flow magnitude
    clip_t="CLIP-T", clip_i="CLIP-I", dino_i="DINO-I", t_cons="T-Cons",
    temporal_flickering="Temporal Flickering", motion_smoothness="Motion Smoothness",
    dynamic_degree="Dynamic Degree", flow_top5_px="Flow top-5% (px)")  # fmt: skip
NOTES = {"clip_i": "CLIP ViT-B/32 as DreamVideo's script; the paper's 'enhanced CLIP' has no public weights"}
SMOOTHNESS = "needs VBench's AMT-S frame-interpolation model, which no installable package provides"
NO_TORCHVISION = "torchvision is not installed: `pip install torchvision` to compute Dynamic Degree with RAFT"
VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif")
is_video = lambda path: path.suffix.lower() in VIDEO_EXTS
is_image = lambda path: path.suffix.lower() in data.IMAGE_EXTS  # DreamVideo's script reads only .jpg
FlowFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # uint8 (H, W, 3) x2 -> flow (2, H', W') in px
# The reference scripts' torchvision pipeline: Resize(short side, bicubic), CenterCrop, ToTensor, Normalize.
Prep = namedtuple("Prep", "resize crop mean std")
CLIP_PREP = Prep(224, 224, encoders.CLIP_MEAN, encoders.CLIP_STD)
DINO_PREP = Prep(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet mean/std


def embed_frames(encode: Callable, prep: Prep, frames: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> preprocessed as `prep`, `encode`d `batch` frames at a time -> unit (T, E)."""
    feats, mean, std = [], torch.tensor(prep.mean)[:, None, None], torch.tensor(prep.std)[:, None, None]
    for chunk in frames.split(batch):
        x = chunk.permute(0, 3, 1, 2).float()  # (t, 3, H, W)
        h, w = x.shape[-2:]
        new = (prep.resize, int(prep.resize * w / h)) if h <= w else (int(prep.resize * h / w), prep.resize)
        for size in [(h, new[1]), new]:  # as PIL: a width pass, then a height pass, each rounded to uint8
            x = F.interpolate(x, size, mode="bicubic", antialias=True).round().clamp(0, 255)
        top, left = round((x.shape[-2] - prep.crop) / 2), round((x.shape[-1] - prep.crop) / 2)
        x = x[:, :, top : top + prep.crop, left : left + prep.crop] / 255  # (t, 3, crop, crop), as ToTensor
        feats.append(encode((x - mean) / std))
    return F.normalize(torch.cat(feats).float().cpu(), dim=-1)


def image_encoders(clip, dino) -> dict[str, tuple[Callable, Prep]]:
    """{"clip": (CLIP `image_embeds` before its norm, CLIP_PREP), "dino": (DINO's CLS token after the final
    LayerNorm, DINO_PREP)}. Spelled out: transformers v5's get_image_features returns an output object."""
    clip_fn = lambda x: clip.visual_projection(clip.vision_model(x.to(clip.device)).pooler_output)  # (T, E)
    dino_fn = lambda x: dino(pixel_values=x.to(dino.device)).last_hidden_state[:, 0]  # (T, 384)
    return {"clip": (clip_fn, CLIP_PREP), "dino": (dino_fn, DINO_PREP)}


def embed_text(clip, tokenizer, prompt: str) -> tuple[torch.Tensor, bool]:
    """prompt -> (unit CLIP text embedding (E,), truncated to CLIP's 77 tokens? DreamVideo's script fails)."""
    truncated = len(tokenizer(prompt)["input_ids"]) > 77
    ids = tokenizer(prompt, truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    out = clip.text_model(input_ids=ids.to(clip.device)).pooler_output
    return F.normalize(clip.text_projection(out)[0].float().cpu(), dim=-1), truncated


def alignment(refs: torch.Tensor, frames: torch.Tensor) -> float:
    """CLIP-T / CLIP-I / DINO-I: mean over refs (R, E) of dot(ref, mean of the unit frame features (T, E))."""
    return (refs.reshape(-1, refs.shape[-1]) @ frames.mean(0)).mean().item()


def temporal_consistency(frames: torch.Tensor) -> float:
    """T-Cons: mean cosine of consecutive normalised frame features (T, E)."""
    return (frames[:-1] * frames[1:]).sum(-1).mean().item()


def temporal_flickering(frames: torch.Tensor) -> float:
    """VBench: (255 - mean over adjacent pairs of their mean |difference|) / 255, uint8 (T, H, W, 3)."""
    diffs = (frames[1:].float() - frames[:-1].float()).abs().mean(dim=(1, 2, 3))  # (T-1,)
    return ((255 - diffs.mean()) / 255).item()


def dynamic_degree(frames: torch.Tensor, fps: float, flow: FlowFn, name: str = "video") -> tuple[bool, float]:
    """VBench: subsample to ~8 fps; a pair's score is the mean of its top 5 % flow magnitudes; the video is
    dynamic if round(4N/16) pairs score over 6 min(H, W)/256 px. -> (dynamic?, mean pair score in px)."""
    if len(frames) <= (step := max(1, round(fps / 8))):  # frames[::step] would keep a single frame: no pair
        raise ValueError(f"{name}: {len(frames)} frame(s) at {fps:g} fps leave 1 at ~8 fps; Dynamic Degree "
                         f"needs 2 (--no-flow skips it)")  # fmt: skip
    frames = frames[::step]  # (N, H, W, 3)
    thres, need = 6 * min(frames.shape[1:3]) / 256, round(4 * len(frames) / 16)
    mags = [flow(a, b).float().norm(dim=0).flatten() for a, b in zip(frames[:-1], frames[1:])]  # [(H' W',)]
    scores = [m.topk(max(1, int(0.05 * m.numel()))).values.mean().item() for m in mags]  # top 5 %, as VBench
    return sum(s > thres for s in scores) >= need, sum(scores) / len(scores)


def load_raft(device: str) -> tuple[FlowFn | None, str | None]:
    """(flow, None) with torchvision's RAFT-large, C_T_V1 weights (the port of VBench's raft-things.pth), 20
    updates, input padded to a multiple of 8 as VBench's InputPadder; (None, reason) without torchvision."""
    try:
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large
    except ImportError:
        print(f"Dynamic Degree skipped: {NO_TORCHVISION}")
        return None, NO_TORCHVISION
    raft = raft_large(weights=Raft_Large_Weights.C_T_V1).eval().to(device)

    def flow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = torch.stack([a, b]).permute(0, 3, 1, 2).to(device).float() / 127.5 - 1  # (2, 3, H, W) in [-1, 1]
        ph, pw = -x.shape[2] % 8, -x.shape[3] % 8
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate")
        return raft(x[:1], x[1:], num_flow_updates=20)[-1][0].cpu()  # (2, H', W')

    return flow, None


def read_video(path: Path) -> tuple[torch.Tensor, float]:
    """The frames of a video, upright -> (uint8 (T, H, W, 3), fps)."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [data.display_rgb(f).copy() for f in container.decode(stream)]
            fps = float(stream.average_rate or stream.guessed_rate or 8)
    except (av.FFmpegError, IndexError) as e:  # IndexError: no video stream
        raise ValueError(f"cannot decode {path} ({type(e).__name__}: {e})") from None
    if len(frames) < 2:
        raise ValueError(f"{path} has {len(frames)} frame(s); the temporal metrics need at least 2")
    return torch.stack([torch.from_numpy(f) for f in frames]), fps


def list_videos(inputs: list[str]) -> list[Path]:
    """--videos: video files and/or folders (their video files, sorted)."""
    videos = []
    for item in map(Path, inputs):
        if not item.exists():
            raise FileNotFoundError(f"--videos: {item} does not exist")
        videos += (found := sorted(filter(is_video, item.iterdir())) if item.is_dir() else [item])
        if not found or not is_video(found[0]):  # an empty folder, or a file that is not a video
            raise ValueError(f"--videos: {item} is not a video nor a folder of {'/'.join(VIDEO_EXTS)} videos")
    if len({v.name for v in videos}) != len(videos):
        raise ValueError("--videos: two videos share a file name; prompts are matched by file name")
    return videos


def read_prompts(path: Path, videos: list[Path], subject: Path | None) -> dict[str, tuple[str, Path]]:
    """{video name: (prompt, subject folder)} from one line per video, `video.mp4|||prompt` or DreamVideo's
    `video.mp4|||subject_dir|||prompt` (relative to the prompt file); blank and # lines are skipped."""
    entries = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = [s.strip() for s in line.split("|||")]
        if line.strip() and not line.startswith("#"):
            if len(parts) not in (2, 3) or not parts[-1]:
                raise ValueError(f"{path}:{n}: expected `video|||prompt` or `video|||subject_dir|||prompt`")
            entries[parts[0]] = (parts[-1], path.parent / parts[1] if len(parts) == 3 else subject)
    if missing := sorted({v.name for v in videos} - entries.keys()):
        raise ValueError(f"no prompt for video(s) {', '.join(missing)}: add `name|||prompt` lines to {path}")
    if extra := sorted(entries.keys() - {v.name for v in videos}):
        raise ValueError(f"prompt entries {', '.join(extra)} in {path} match no video in --videos")
    if any(s is None for _, s in entries.values()):
        raise ValueError("no subject folder: pass --subject DIR or use `video|||subject_dir|||prompt` lines")
    return entries


def evaluate(videos: list[Path], pairs: dict, clip, tokenizer, dino, flow: FlowFn | None) -> dict[str, dict]:
    """{video name: {metric: value}} for every video; flow=None skips Dynamic Degree."""
    nets, refs, rows = image_encoders(clip, dino), {}, {}  # refs: {subject: {net: (R, E)}}
    for path in tqdm(videos, desc="scoring"):
        prompt, subject = pairs[path.name]
        if subject not in refs:
            found = sorted(filter(is_image, subject.glob("*")))
            images = [torch.from_numpy(data.read_image(p).copy())[None] for p in found]  # (1, h, w, 3) each
            if not images:
                raise FileNotFoundError(f"no {'/'.join(data.IMAGE_EXTS)} images in subject folder {subject}")
            refs[subject] = {k: torch.cat([embed_frames(*n, im) for im in images]) for k, n in nets.items()}
        frames, fps = read_video(path)  # (T, H, W, 3)
        feats = {k: embed_frames(*n, frames) for k, n in nets.items()}  # {net: (T, E)}
        text, truncated = embed_text(clip, tokenizer, prompt)
        dynamic, magnitude = dynamic_degree(frames, fps, flow, path.name) if flow else (None, None)
        rows[path.name] = {
            "clip_t": alignment(text, feats["clip"]),
            "clip_i": alignment(refs[subject]["clip"], feats["clip"]),
            "dino_i": alignment(refs[subject]["dino"], feats["dino"]),
            "t_cons": temporal_consistency(feats["clip"]),
            "temporal_flickering": temporal_flickering(frames),
            "motion_smoothness": None,
            "dynamic_degree": dynamic,
            "flow_top5_px": magnitude,
            **{"frames": len(frames), "fps": fps, "prompt": prompt, "prompt_truncated": truncated},
        }
    return rows


def markdown(rows: dict[str, dict], means: dict[str, float | None]) -> str:
    fmt = lambda v: "n/a" if v is None else ("yes" if v else "no") if isinstance(v, bool) else f"{v:.4f}"
    lines = ["| video | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in [*rows.items(), ("**mean**", means)]:
        lines.append(f"| {name} | " + " | ".join(fmt(row[k]) for k in COLUMNS) + " |")
    return "\n".join(lines)


def controller_trace(adapters_file: Path, prompt: str, subject: Path, steps: int = 50, device: str = "cpu",
                     guidance: float = 6.0, seed: int = 42) -> tuple[list[int], torch.Tensor]:  # fmt: skip
    """Sample once as at inference (e: the first subject image, cropped as in training), recording after each
    step the identity weight 1 - ω of every group in the conditional branch -> (timesteps, weights (S, n))."""
    name = adapters.read_metadata(str(adapters_file))[1]["name"]  # the base model they were trained on
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    net = model.load_transformer(name, dtype)  # on the CPU (memory-mapped) while the encoders use the GPU
    adapters.load_adapters(net, str(adapters_file))
    c, weights, t5 = net.config, [], encoders.load_text_encoder(name, dtype, device)
    text, neg = (t5.encode(p, c.max_text_seq_length) for p in (prompt, ""))
    clip = encoders.load_image_encoder("tiny" if name == "tiny" else encoders.CLIP_ID, dtype, device)
    e = clip.embed(data.load_images(subject, *c.default_size)[:1].permute(0, 3, 1, 2))  # (1, E)
    del t5, clip  # T5-XXL and CLIP-H leave the GPU before the transformer comes: 24 GB, as in sample.py
    net.to(device)
    schedule = diffusion.load_schedule(checkpoint.find_scheduler(name))  # as sample.py does
    shape = (1, 13 + -13 % c.patch_t, c.in_channels, *(n // 8 for n in c.default_size))  # 49 frames; 1.5: 14
    record = lambda i, t, x: weights.append(1 - net.ext.last_omega[-1].float().cpu())  # (B', n): [neg; pos]
    kw = dict(generator=torch.Generator().manual_seed(seed), cond=e, callback=record, progress=False)
    diffusion.sample(net, schedule, text, neg, shape, steps, guidance, **kw)
    return schedule.timesteps(steps).tolist(), torch.stack(weights)  # (S, n)


def write_trace(timesteps: list[int], w: torch.Tensor, out: Path, title: str) -> None:
    """The trace as out.csv (a row per step, a column per group) and, with matplotlib, out.png (Fig. 7)."""
    csv, png = out.with_suffix(".csv"), out.with_suffix(".png")
    csv.parent.mkdir(parents=True, exist_ok=True)
    table = [["step", "timestep", *(f"group_{g}" for g in range(w.shape[1]))]]
    table += [[i, t, *(f"{v:.6f}" for v in row)] for i, (t, row) in enumerate(zip(timesteps, w.tolist()))]
    csv.write_text("".join(",".join(map(str, r)) + "\n" for r in table))
    print(f"wrote {csv}: identity weight 1 - ω, {w.shape[0]} steps x {w.shape[1]} groups")
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return print("no PNG: matplotlib is not installed (`pip install matplotlib` to draw the plot)")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(w.numpy(), label=[f"group {g}" for g in range(w.shape[1])])  # one line per group
    ax.set(xlabel="denoising step", ylabel="identity weight 1 - ω", title=title[:60])
    ax.legend(fontsize="small", ncol=2)
    fig.savefig(png, dpi=150, bbox_inches="tight")
    print(f"wrote {png}")


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The paper's metrics on videos, or the controller plot.")
    p.add_argument("--videos", nargs="+", help="video files and/or folders of videos to score")
    p.add_argument("--subject", type=Path, help="folder of subject images (CLIP-I/DINO-I; plot: e)")
    p.add_argument("--prompts", type=Path, help="`video|||prompt` or `video|||subject_dir|||prompt` lines")
    p.add_argument("--out", type=Path, default=Path("report.json"), help="JSON report (plot: CSV + PNG)")
    p.add_argument("--clip-model", default="openai/clip-vit-base-patch32", help="CLIPModel id or folder")
    p.add_argument("--dino-model", default="facebook/dino-vits16", help="ViTModel id or folder (DINO)")
    p.add_argument("--no-flow", action="store_true", help="skip Dynamic Degree (RAFT optical flow)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plot-controller", type=Path, metavar="ADAPTERS", help="trace a run's controller")
    p.add_argument("--prompt", help="plot: the prompt to sample")
    p.add_argument("--steps", type=int, default=50, help="plot: denoising steps (CFG 6, seed 42)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")
    if args.plot_controller:
        if not args.prompt or not args.subject:
            raise ValueError("--plot-controller needs --prompt TEXT and --subject DIR (e, as at inference)")
        trace = controller_trace(args.plot_controller, args.prompt, args.subject, args.steps, args.device)
        return write_trace(*trace, args.out, args.prompt)
    if not args.videos or not args.prompts:
        raise ValueError("pass --videos DIR_OR_FILES and --prompts FILE (and --subject DIR)")
    pairs = read_prompts(args.prompts, videos := list_videos(args.videos), args.subject)
    flow, reason = (None, "skipped with --no-flow") if args.no_flow else load_raft(args.device)
    clip = CLIPModel.from_pretrained(args.clip_model).eval().to(args.device)
    dino = ViTModel.from_pretrained(args.dino_model, add_pooling_layer=False).eval().to(args.device)
    rows = evaluate(videos, pairs, clip, AutoTokenizer.from_pretrained(args.clip_model), dino, flow)
    values = {k: [float(r[k]) for r in rows.values() if r[k] is not None] for k in COLUMNS}
    models = {"clip": args.clip_model, "dino": args.dino_model, "flow": flow and "raft_large C_T_V1"}
    unavailable = {"motion_smoothness": SMOOTHNESS} | ({"dynamic_degree": reason} if reason else {})
    average = {k: sum(v) / len(v) if v else None for k, v in values.items()}  # DD: the dynamic fraction
    report = dict(models=models, notes=NOTES, unavailable=unavailable, videos=rows, average=average)
    data.atomic_write(args.out, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))  # whole or absent
    print(markdown(rows, report["average"]) + f"\nwrote {args.out}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # a user's mistake: one line, no traceback
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        sys.exit(2)
