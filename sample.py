"""Sampling: a prompt (plus, optionally, trained DualReal adapters and a subject image) -> an mp4.

    python sample.py --model THUDM/CogVideoX-5b --prompt "a dog running on the beach" --out dog.mp4
    python sample.py --model tiny --prompt "a dog" --out tiny.mp4    # random tiny weights, seconds on a CPU

CogVideoXPipeline's recipe (reference/cogvideox.md §4.4): T5 embeds the prompts, diffusion.sample denoises
with CFG, the VAE decodes, data.write_video writes H.264 at 8 fps. DualReal (METHOD.md §6): the adapters get
e, the CLIP embedding of a subject image, in both CFG branches (official) or only the conditional one
(--zero-uncond-e: e = 0 in the other, DreamVideo). One component on the GPU at a time: CLIP, T5, transformer,
VAE (the plan for 5B on 24 GB; peak memory is printed). tests/test_pipeline.py matches sample_latents +
decode_video to diffusers' CogVideoXPipeline; tests/test_sample.py checks the command line.
Shapes: B batch, F latent frames, C latent channels, H W latent size; T frames of 8H x 8W pixels.
"""

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

import adapters
import checkpoint
import data
import diffusion
import encoders
import model
import vae

SPATIAL, TEMPORAL = 8, 4  # every CogVideoX VAE: 8x in space, 4x in time (after the first frame)


def fail(message: str):
    """A user's mistake: one line on stderr and exit code 2, no traceback."""
    print(f"sample.py: error: {' '.join(message.splitlines())}", file=sys.stderr)  # one line, always
    sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Text to video with CogVideoX, optionally with DualReal adapters")
    p.error = fail  # a bad argument gets one line too, not argparse's usage block
    p.add_argument("--model", default="THUDM/CogVideoX-5b", help="checkpoint root, hub id, or 'tiny'")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=6.0, help="CFG scale; <= 1 turns CFG off")
    p.add_argument("--dynamic-cfg", action="store_true", help="CogVideoX's dynamic CFG (official for 5B)")
    p.add_argument("--cfg-by-index", action="store_true", help="dynamic CFG driven by the step index, not t")
    p.add_argument("--sampler", choices=["dpm", "ddim"], default="dpm")
    p.add_argument("--frames", type=int, default=49, help="8k+1 (an odd latent count F decodes to 4F-3)")
    p.add_argument("--height", type=int, help="default: the model's trained size (480; 1.5: 768)")
    p.add_argument("--width", type=int, help="default: the model's trained size (720; 1.5: 1360)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="sample.mp4")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--tile", action="store_true", help="decode in spatial tiles (less memory)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="default: on for CUDA")
    p.add_argument("--adapters", help="adapters.safetensors of a training run; needs --reference")
    p.add_argument("--reference", help="subject image whose CLIP embedding e conditions the adapters")
    p.add_argument("--zero-uncond-e", action="store_true", help="e = 0 in the unconditional CFG branch")
    p.add_argument("--clip-model", help=f"default: {encoders.CLIP_ID} ('tiny' with --model tiny)")
    return p.parse_args(argv)


def check_output(out: str, overwrite: bool = False) -> Path:
    """Fail before any model loads if the mp4 cannot be written (a write probe: root ignores permissions)
    or would replace a file without --overwrite."""
    path = Path(out)
    if path.suffix.lower() != ".mp4" or path.is_dir():
        raise ValueError(f"--out {out} must be an .mp4 file path")
    if path.exists() and not overwrite:
        raise ValueError(f"--out {out} exists: pass --overwrite to replace it, or another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as err:
        raise ValueError(f"cannot write to the folder of --out {out}: {err.strerror or err}") from None
    return path


def read_image(path: str, height: int, width: int) -> Tensor:
    """One image -> uint8 (1, height, width, 3), upright, resized and centre-cropped as data.load_images does
    for a folder of subject images, so e sees the same crop as in training."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference image not found: {path}")
    return data.resize_crop(data.read_image(path), height, width)[None]  # (1, H, W, 3)


def sample_latents(transformer, schedule, text, neg_text, frames, height, width, **kw) -> Tensor:
    """diffusion.sample for videos of frames x height x width -> latents (B, F, C, height/8, width/8).
    kw go to diffusion.sample: steps, guidance, sampler, dynamic_cfg, cfg_by_index, generator, cond, ..."""
    cfg = transformer.config
    f = (frames - 1) // TEMPORAL + 1
    pad = -f % cfg.patch_t  # CogVideoX 1.5 patchifies time in pairs: pad in front, drop after (as diffusers)
    shape = (text.shape[0], f + pad, cfg.in_channels, height // SPATIAL, width // SPATIAL)
    return diffusion.sample(transformer, schedule, text, neg_text, shape, **kw)[:, pad:]


def decode_video(autoencoder, latents: Tensor) -> Tensor:
    """latents (B, F, C, H, W) -> video (B, 3, T, 8H, 8W), float32, clamped to [-1, 1] like the pipeline's."""
    return autoencoder.decode(latents).float().clamp(-1, 1)


def run(args: argparse.Namespace) -> Path:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = name.startswith("cuda")
    if not (name.startswith("cpu") or cuda and torch.cuda.is_available()):
        raise ValueError(f"--device {name}: use cpu, or cuda (cuda:1, ...) where a CUDA GPU is visible")
    device, auto = torch.device(name), torch.bfloat16 if cuda else torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype, auto)
    if args.steps < 1 or args.frames < 1 or (args.frames - 1) % (2 * TEMPORAL) or args.fps < 1:
        raise ValueError(f"need --steps >= 1, --fps >= 1 and --frames 8k+1 (9, 17, ..., 49); got --steps "
                         f"{args.steps} --fps {args.fps} --frames {args.frames}")  # fmt: skip
    if any(s is not None and (s <= 0 or s % (2 * SPATIAL)) for s in (args.height, args.width)):
        raise ValueError(f"--height and --width must be multiples of 16, got {args.height} and {args.width}")
    if bool(args.adapters) != bool(args.reference):
        raise ValueError("--adapters and --reference go together: the adapters need e from a subject image")
    out = check_output(args.out, args.overwrite)
    schedule = diffusion.load_schedule(checkpoint.find_scheduler(args.model))

    # The transformer waits on the CPU (memory-mapped) until the encoders have left the GPU.
    transformer = model.load_transformer(args.model, dtype).eval()
    cfg = transformer.config
    height, width = args.height or cfg.default_size[0], args.width or cfg.default_size[1]  # 1.5: 768x1360
    cond = neg_cond = None
    if args.adapters:  # e: the CLIP embedding of the subject image (METHOD.md §6)
        e_dim = adapters.load_adapters(transformer, args.adapters).cfg.cond_dim  # checks the base's size
        image = read_image(args.reference, height, width).permute(0, 3, 1, 2)  # (1, 3, H, W) uint8
        clip_id = args.clip_model or ("tiny" if args.model == "tiny" else encoders.CLIP_ID)
        clip = encoders.load_image_encoder(clip_id, dtype, device)
        if clip.dim != e_dim:
            raise ValueError(f"{args.adapters} expects a {e_dim}-d image embedding, --clip-model "
                             f"{clip_id} gives {clip.dim}-d: pass the CLIP used in training")  # fmt: skip
        cond = clip.embed(image)  # (1, E) fp32
        neg_cond = torch.zeros_like(cond) if args.zero_uncond_e else None  # None: e in both branches
        del clip  # T5 reuses its GPU memory

    t5, n = encoders.load_text_encoder(args.model, dtype, device), cfg.max_text_seq_length
    text = t5.encode(args.prompt, n)  # (1, L, text_dim), in the encoder's dtype
    neg_text = t5.encode(args.negative_prompt, n) if args.guidance > 1 else None
    del t5  # off the GPU before the transformer goes on it (a no-op without CUDA)
    gc.collect()
    torch.cuda.empty_cache()

    transformer.to(device)
    if args.compile if args.compile is not None else cuda:
        transformer.compile()  # in place: state-dict keys keep their names
    ticks = [time.perf_counter()]  # after each step; the first step includes compilation
    tick = lambda *_: (torch.cuda.synchronize() if cuda else None, ticks.append(time.perf_counter()))
    opts = dict(steps=args.steps, guidance=args.guidance, sampler=args.sampler, cond=cond, neg_cond=neg_cond)
    opts |= dict(dynamic_cfg=args.dynamic_cfg or args.cfg_by_index, cfg_by_index=args.cfg_by_index)
    generator = torch.Generator().manual_seed(args.seed)  # CPU: the same noise on any device
    latents = sample_latents(transformer, schedule, text, neg_text, args.frames, height, width,
                             generator=generator, callback=tick, **opts)  # fmt: skip
    total, first = ticks[-1] - ticks[0], ticks[1] - ticks[0]
    print(f"denoised in {total:.1f} s; step 1 (which compiles, with --compile) took {first:.1f} s")
    del transformer  # and the transformer before the VAE decodes
    gc.collect()
    torch.cuda.empty_cache()

    autoencoder = vae.load_vae(args.model, dtype, device)
    autoencoder.tiling = vae.Tiling() if args.tile else None
    video = decode_video(autoencoder, latents)[0].transpose(0, 1)  # (3, T, H, W) -> (T, 3, H, W)
    data.write_video(out, data.to_uint8(video), fps=args.fps)
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"wrote {out}: {video.shape[0]} frames, {height}x{width}, seed {args.seed}")
    return out


def main(argv: list[str] | None = None) -> Path:
    """The CLI. A user's mistake (ValueError; OSError: a missing file or encoder weights, no hub) is one line
    on stderr and exit code 2."""
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as err:
        fail(str(err))


if __name__ == "__main__":
    main()
