"""Train DualReal: identity and motion adapters plus the StageBlender on a frozen CogVideoX, jointly.

    python train.py --subject DIR --motion CLIP.mp4 [--model tiny]      # one GPU (tiny: CPU, a minute)
    torchrun --standalone --nproc_per_node=N train.py ...               # DDP

Each step (paper eq. 4-6, METHOD.md §3):
1. Draw the phase Z: motion with probability --motion-ratio, else identity. Every rank draws the same one.
2. Take its cached data: subject images as 1-frame videos (e = None), or the clip with e = a frame's CLIP.
3. Noise the latents at t ~ U{0..999} and regress the velocity (MSE).
4. Backward (in slices with --micro-batch), then the inactive family's gradients -> None: AdamW leaves it be.
5. Clip the gradient norm to 1.0 and take an AdamW step (linear warmup, then cosine to 0).
VAE latents, T5 and CLIP embeddings are computed once and cached; the encoders then leave the GPU.
"""

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import checkpoint
import costs
import data
import diffusion
import encoders
import model as dit
import parallel
import vae as vae_lib

# What --resume may change; any other difference means a different run.
RESUMABLE = {"steps", "save_every", "val_every", "val_steps", "log_every", "resume", "overwrite", "compile",
             "cache_dir", "micro_batch"}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train DualReal adapters on a frozen CogVideoX (see README).")
    p.error = lambda message: (print(f"error: {message}", file=sys.stderr), sys.exit(2))  # one line, no usage
    add = p.add_argument
    add("--subject", required=True, help="folder of 3-10 subject photos (.jpg/.png/.webp)")
    add("--motion", required=True, help="the motion clip (.mp4/.mov/...)")
    add("--subject-prompt", default="a photo of a sks subject", help='e.g. "a sks dog"')
    add("--motion-prompt", default="a video of the motion", help='e.g. "a ball bouncing on the floor"')
    add("--val-prompt", default=None, help="validation prompt (default: the two prompts joined)")
    add("--model", default="THUDM/CogVideoX-5b", help="hub id, checkpoint folder, or tiny (CPU)")
    add("--clip-model", default=None, help=f"image encoder for e (default {encoders.CLIP_ID}; tiny for tiny)")
    add("--output-dir", default="runs/dualreal")
    add("--cache-dir", default=str(Path.home() / ".cache" / "dualreal"), help="cached latents and embeddings")
    add("--steps", type=int, default=1000)
    add("--lr", type=float, default=1e-3)
    add("--warmup", type=int, default=200)
    add("--weight-decay", type=float, default=1e-4)
    add("--motion-ratio", type=float, default=0.5, help="P(motion step); 0.2: stochastic switching")
    add("--subject-batch", type=int, default=1)
    add("--motion-batch", type=int, default=3)
    add("--micro-batch", type=int, default=None, help="accumulate gradients over slices this size")
    add("--seed", type=int, default=42)
    add("--frames", type=int, default=49, help="clip frames, 8k+1 (an odd number of latent frames)")
    add("--fps", type=float, default=8.0, help="sample the clip by timestamp at this rate")
    add("--native-frames", action="store_true", help="official behaviour: consecutive native-rate frames")
    add("--height", type=int, default=None, help="default: the model's (480; tiny 64)")
    add("--width", type=int, default=None, help="default: the model's (720; tiny 96)")
    add("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="frozen base; auto: bf16 on CUDA")
    add("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    add("--overwrite", action="store_true", help="start over in an --output-dir that holds a run")
    add("--save-every", type=int, default=250)
    add("--val-every", type=int, default=500, help="validation video every N steps (0: none)")
    add("--val-steps", type=int, default=50)
    add("--log-every", type=int, default=10)
    add("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on with CUDA")
    add("--fsdp", action="store_true", help="under torchrun: shard base and adapters (FSDP2), not DDP")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    add("--adapter-width", type=int, default=64)
    add("--adapter-scale", type=float, default=0.2)
    add("--groups", type=int, default=7, help="ablation: controller weight groups n (1 = w/o weight groups)")
    add("--no-controller", action="store_true", help="ablation: fixed blend ω = 0.5 (w/o StageBlender)")
    add("--no-grad-mask", action="store_true", help="ablation: both families update every step")
    add("--schedule", choices=["joint", "isolated"], default="joint", help="ablation: isolated = identity "
        "steps, then motion steps, each without the other family (DreamVideo-style)")  # fmt: skip
    add("--l2", type=float, default=0.0, help="λ of an L2 term on the active family")
    return p.parse_args(argv)


def setup(args, rank: int):
    """Fill the defaults and check everything a user can get wrong, before anything is written."""
    args.clip_model = args.clip_model or ("tiny" if args.model == "tiny" else encoders.CLIP_ID)
    args.val_prompt = args.val_prompt or f"{args.subject_prompt}, {args.motion_prompt}"
    src = None if args.model == "tiny" else checkpoint.find_component(args.model, "transformer")  # no weights
    cfg = dit.get_config("tiny") if src is None else dit.config_from_json(checkpoint.read_config(src), src)
    if cfg.patch_size_t:  # 1.5 patchifies time in pairs: an identity step's 1-frame video has 1 latent frame
        raise ValueError(f"{args.model} is a CogVideoX 1.5 model: training takes CogVideoX 2B or 5B")
    args.height, args.width = args.height or cfg.default_size[0], args.width or cfg.default_size[1]
    if args.fsdp and ("RANK" not in os.environ or args.l2):  # the L2 term reads weights outside a forward
        raise ValueError("--fsdp shards the model over torchrun's processes: use torchrun, and no --l2")
    if not 0.0 <= args.motion_ratio <= 1.0:
        raise ValueError(f"--motion-ratio must be in [0, 1], got {args.motion_ratio}")
    low = dict(steps=1, subject_batch=1, motion_batch=1, micro_batch=1, groups=1, adapter_width=1, frames=1)
    low |= dict(val_steps=1, log_every=1, save_every=1, val_every=0, warmup=0, lr=0, weight_decay=0, l2=0)
    for flag in [f for f, v in low.items() if getattr(args, f) is not None and getattr(args, f) < v]:
        raise ValueError(f"--{flag.replace('_', '-')} must be >= {low[flag]}, got {getattr(args, flag)}")
    if (args.frames - 1) % 8 or args.height % 16 or args.width % 16 or min(args.height, args.width) < 16:
        raise ValueError(f"need 8k+1 --frames and --height, --width in 16, 32, ...; got {args.frames} "
                         f"frames of {args.height}x{args.width}")  # fmt: skip
    if (config := Path(args.output_dir) / "config.json").is_file() and not args.overwrite:
        if not args.resume:
            raise ValueError(f"{args.output_dir} already holds a run: --resume it or --overwrite it")
        old = json.loads(config.read_text())["args"]
        diff = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in vars(args).items() if old.get(k, v) != v]
        diff = [d for d in diff if d.split()[0] not in RESUMABLE]
        if diff:
            raise ValueError(f"--resume: {args.output_dir} holds a different run ({'; '.join(diff)})")
    images = data.load_images(args.subject, args.height, args.width)  # (N, H, W, 3) uint8
    native = args.native_frames
    clip, info = data.load_clip(args.motion, args.frames, args.fps, args.height, args.width, native=native)
    if rank == 0:
        print(f"subject: {len(images)} images from {args.subject}\nmotion: {info.describe()}")
    return cfg, images, clip


def precompute(args, cfg, images, clip, device, dtype) -> dict[str, torch.Tensor]:
    """VAE posteriors, T5 and CLIP embeddings, cached by content and model id; encoders visit the GPU once."""
    prompts = [args.subject_prompt, args.motion_prompt, args.val_prompt, ""]

    def compute():
        vae = vae_lib.load_vae(args.model, dtype, device)
        subject = vae.encode_posterior(data.to_float(images)[:, :, None])  # -> (N, 1, C, h, w)
        motion = vae.encode_posterior(data.to_float(clip).transpose(0, 1)[None])  # -> (1, F, C, h, w)
        scale = torch.tensor(vae.config.scaling_factor)
        del vae
        text = encoders.load_text_encoder(args.model, dtype, device).encode(prompts, cfg.max_text_seq_length)
        image_encoder = encoders.load_image_encoder(args.clip_model, dtype, device)
        e_clip = image_encoder.embed(data.reference_frames(clip).permute(0, 3, 1, 2))  # (4, E): motion phase
        e_subject = image_encoder.embed(images.permute(0, 3, 1, 2))  # (N, E): the reference at inference
        del image_encoder
        torch.cuda.empty_cache()  # a no-op without CUDA
        return dict(subject_mean=subject[0], subject_logvar=subject[1], clip_mean=motion[0], scale=scale,
                    clip_logvar=motion[1], text=text, e_clip=e_clip, e_subject=e_subject)  # fmt: skip

    sizes = [args.height, args.width, args.frames, args.fps, args.native_frames, str(dtype)]
    files, ids = [*data.image_files(args.subject), args.motion], f"{args.model}|{args.clip_model}"
    key = data.cache_key(files, ids, json.dumps([prompts, sizes]))
    return data.load_or_compute(args.cache_dir, key, compute)


def lr_at(step: int, args) -> float:
    """Linear warmup from 0, then a cosine from lr down to 0 at --steps (official: cosine, one cycle)."""
    if step < args.warmup:
        return args.lr * step / args.warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))


def phase_at(step: int, rng: random.Random, args) -> str:
    """Z of eq. 4. joint: Bernoulli, the RNG seeded alike on every rank; isolated: identity, then motion."""
    if args.schedule == "isolated":
        return "identity" if step < round(args.steps * (1 - args.motion_ratio)) else "motion"
    return "motion" if rng.random() < args.motion_ratio else "identity"


def batch_for(phase: str, cache: dict, args, gen: torch.Generator):
    """(clean latents z (B, F, C, h, w), text (B, L, D), e (B, E) or None), drawn with the CPU generator."""
    if phase == "identity":
        idx = torch.randint(len(cache["subject_mean"]), (args.subject_batch,), generator=gen)
        mean, logvar, e = cache["subject_mean"][idx], cache["subject_logvar"][idx], None
        text = cache["text"][0]  # the subject prompt
    else:
        n = args.motion_batch
        mean, logvar = cache["clip_mean"].expand(n, -1, -1, -1, -1), cache["clip_logvar"]
        text = cache["text"][1]  # the motion prompt
        e = cache["e_clip"][torch.randint(len(cache["e_clip"]), (n,), generator=gen)]  # a frame per sample
    z = vae_lib.sample_posterior(mean, logvar.expand_as(mean), gen) * cache["scale"]  # fresh posterior draw
    return z.float(), text.expand(len(z), -1, -1), e  # fp32: a bf16 z would round sqrt(1 - a_t) to 0 at t < 2


def save_checkpoint(out: Path, step: int, model, opt, rng: random.Random, ema: dict) -> None:
    """checkpoints/step_N.pt, atomically (temp file, then rename); older ones go; adapters.safetensors too.
    Every rank calls it (FSDP2 gathers the shards); rank 0 writes."""
    weights, optim = parallel.trainable_state(model, opt)  # {"ext.<name>": tensor}, on rank 0 only
    if not weights:
        return
    (folder := out / "checkpoints").mkdir(exist_ok=True)
    path = folder / f"step_{step:07d}.pt"
    state = dict(step=step, adapters=weights, optimizer=optim, phase_rng=rng.getstate(), ema=ema)
    data.atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in set(folder.glob("step_*.pt")) - {path}:
        old.unlink()
    named = {k.removeprefix("ext."): v for k, v in weights.items()}  # the adapters' own names
    data.atomic_write(out / "adapters.safetensors", lambda tmp: adapters.save_adapters(model.ext, tmp, named))


def validate(step: int, model, vae, cache, schedule, args, latent_shape, device) -> None:
    """A video of --val-prompt with the sampling machinery (DPM, CFG 6), e = the first subject image.
    Under FSDP2 every rank samples (each forward all-gathers), and rank 0 (which holds the VAE) writes it."""
    dtype, gen = next(model.parameters()).dtype, torch.Generator().manual_seed(args.seed)
    model.ext.fixed_omega = 0.5  # without the controller, both families at inference (isolated trained 0, 1)
    text, e = cache["text"].to(device, dtype), cache["e_subject"][:1].to(device)
    latents = diffusion.sample(model, schedule, text[2:3], text[3:4], (1, *latent_shape), args.val_steps,
                               generator=gen, cond=e, progress=False)  # fmt: skip
    if vae is None:
        return
    vae.tiling = vae_lib.Tiling()  # 240x360 tiles: a 480x720 decode fits beside the training state on 24 GB
    video = vae.to(device).decode(latents)[0].transpose(0, 1)  # (T, 3, H, W)
    vae.to("cpu")
    data.write_video(Path(args.output_dir) / "samples" / f"step_{step:07d}.mp4", data.to_uint8(video))


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = parallel.init()  # under torchrun: a process group (gloo on CPU, nccl on CUDA)
    args.world_size = world  # in config.json: --resume on another world size would draw other batches
    cuda = torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"  # TF32: the official --allow_tf32
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and cuda) else torch.float32
    args.compile = cuda if args.compile is None else args.compile
    try:  # a user's mistake (flags, files, encoder weights): one line on stderr, exit code 2, nothing written
        cfg, images, clip = setup(args, rank)
        cache = precompute(args, cfg, images, clip, device, dtype) if rank == 0 else None
        parallel.barrier()  # rank 0 has filled the cache, and every rank has checked --output-dir
        cache = cache or precompute(args, cfg, images, clip, device, dtype)  # the others read it
    except (ValueError, OSError) as err:  # OSError: also transformers' missing weights, an unreachable hub
        print(f"error: {' '.join(str(err).splitlines())}", file=sys.stderr)  # one line, whatever the message
        sys.exit(2)
    train(args, cfg, cache, rank, world, device, dtype)
    parallel.finish()


def train(args, cfg, cache, rank, world, device, dtype) -> None:
    out, master = Path(args.output_dir), rank == 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
        old = [*out.glob("checkpoints/step_*.pt"), *out.glob("samples/*.mp4"), out / "adapters.safetensors"]
        for path in old if args.overwrite else []:  # --overwrite: nothing of the old run outlives its start
            path.unlink(missing_ok=True)
        cmd = ["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"]
        git = shutil.which("git") and subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        versions = dict(torch=torch.__version__, transformers=__import__("transformers").__version__, git=git)
        config = json.dumps(dict(args=vars(args), versions=versions), indent=2)  # all arguments and versions
        data.atomic_write(out / "config.json", lambda tmp: tmp.write_text(config))
    schedule = diffusion.load_schedule(checkpoint.find_scheduler(args.model))

    on = "cpu" if args.fsdp and world > 1 else device  # FSDP2: fully_shard moves each group to the GPU
    model = dit.load_transformer(args.model, dtype, on)
    model.grad_checkpointing = args.grad_checkpointing
    isolated = args.schedule == "isolated"  # DreamVideo-style: no controller, the other family switched off
    acfg = adapters.AdapterConfig(args.adapter_width, cache["e_clip"].shape[1], args.adapter_scale,
                                  args.groups, controller=not (args.no_controller or isolated))  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # the same adapter init on every rank and in every run
        ext = adapters.attach(model, acfg)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)  # variants: README
    for block in model.blocks if args.compile else []:
        block.compile()  # in place, per block: saved keys carry no _orig_mod. prefix
    net = parallel.wrap(model, args.fsdp)  # DDP, FSDP2 (sharded in place) or the model itself
    opt = torch.optim.AdamW(ext.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    rng, start, ema = random.Random(args.seed), 0, {}  # phase sequence (identical on every rank); EMA losses
    ckpts = sorted((out / "checkpoints").glob("step_*.pt")) if args.resume else []
    if ckpts:
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
        parallel.load_trainable_state(model, opt, state["adapters"], state["optimizer"])
        rng.setstate(state["phase_rng"])
        start, ema = state["step"], state.get("ema", {})  # lr schedule, phases, loss EMAs go on from here
        if master:
            print(f"resumed from {ckpts[-1]} at step {start}")

    vae = vae_lib.load_vae(args.model, dtype, "cpu") if args.val_every and master else None
    latent_shape = (cache["clip_mean"].shape[1], cfg.in_channels, args.height // 8, args.width // 8)
    kw = dict(adapter_width=args.adapter_width, grad_checkpointing=args.grad_checkpointing)
    kw["shards"] = world if args.fsdp else 1  # FSDP2: each rank holds 1/world of the weights and states
    h, w, r = args.height, args.width, args.adapter_width  # model FLOPs for MFU: recomputation not counted
    sizes = dict(identity=(1, args.subject_batch), motion=(args.frames, args.motion_batch))
    flops = {k: costs.estimate_flops(cfg, f, h, w, b, None, False, r) for k, (f, b) in sizes.items()}
    peak = costs.peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if master:
        n = adapters.count_parameters(ext)
        micro = min(args.micro_batch or args.motion_batch, args.motion_batch)  # clips in one forward
        mem = costs.estimate_training_memory(cfg, args.frames, h, w, n["total"], micro, dtype.itemsize, **kw)
        summary = costs.describe(model, n, flops, mem, micro)
        print(f"device {device} x{world}, base {dtype}, compile {args.compile}\n{summary}")

    seen, window = set(), [0, 0.0, 0.0]  # phases already run; [steps, s, FLOPs] since the last log
    if master:  # a fresh run starts its log; a resumed one drops what was logged after its checkpoint
        old = (out / "log.jsonl").read_text().splitlines() if start and (out / "log.jsonl").exists() else []
        (out / "log.jsonl").write_text("".join(f"{r}\n" for r in old if json.loads(r)["step"] <= start))
    log = (out / "log.jsonl").open("a", buffering=1) if master else None  # line-buffered: flushed per record
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not master, desc="train")
    t_prev = time.perf_counter()
    for step in bar:
        phase = phase_at(step, rng, args)
        seed = np.random.SeedSequence([args.seed, rank, step]).generate_state(1)[0]  # resumable, per rank
        gen = torch.Generator().manual_seed(int(seed))  # this rank's data, posterior and noise draws
        ext.fixed_omega = (1.0 if phase == "motion" else 0.0) if isolated else 0.5
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        z, text, e = batch_for(phase, cache, args, gen)
        t, noise = torch.randint(0, 1000, (len(z),), generator=gen), torch.randn(z.shape, generator=gen)
        n, micro, value = len(z), args.micro_batch or len(z), 0.0
        for i in range(0, n, micro):  # slices of the batch; each backward adds its share of the gradient
            zi, ni, ti, ci = (x[i : i + micro].to(device) for x in (z, noise, t, text))
            ei = None if e is None else e[i : i + micro].to(device)
            with parallel.accumulating(net, last=i + micro >= n):  # DDP: one all-reduce per step
                pred = net(schedule.add_noise(zi, ni, ti).to(dtype), ci.to(dtype), ti, cond=ei)
                loss = F.mse_loss(pred.float(), schedule.velocity(zi, ni, ti).float()) * (len(zi) / n)
                loss = loss + (adapters.l2_penalty(ext, phase, args.l2) if i == 0 else 0.0)
                value += loss.item()  # one host sync per slice: a NaN must stop the run before the weights
                if not math.isfinite(value):
                    print(f"error: loss is {value} at step {step} ({phase}); stopped, last checkpoint kept")
                    sys.exit(1)
                loss.backward()
        adapters.mask_gradients(ext, phase, enabled=not args.no_grad_mask)
        torch.nn.utils.clip_grad_norm_(ext.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

        now, done = time.perf_counter(), step + 1
        if phase in seen:
            window = [window[0] + 1, window[1] + now - t_prev, window[2] + flops[phase]["train_step"]]
        elif master:  # a phase's first step includes torch.compile and warm-up: reported on its own
            tqdm.write(f"first {phase} step (compile and warm-up included): {now - t_prev:.2f} s")
        seen.add(phase)
        ema[phase] = value if phase not in ema else 0.9 * ema[phase] + 0.1 * value
        bar.set_postfix({"phase": phase, **{f"{k} loss": f"{v:.4f}" for k, v in ema.items()}})
        if master and (done % args.log_every == 0 or done == args.steps):
            rec = dict(step=done, phase=phase, loss=value, ema=dict(ema), lr=lr_at(step, args),
                       omega=ext.last_omega.mean(0).tolist())  # fmt: skip
            if window[0]:
                rec |= dict(step_time=window[1] / window[0], tflops_per_s=window[2] / window[1] / 1e12)
                rec["mfu"] = rec["tflops_per_s"] / peak if peak else None
            if device.type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            log.write(json.dumps(rec) + "\n")
            window = [0, 0.0, 0.0]
        if done % args.save_every == 0 or done == args.steps:
            save_checkpoint(out, done, model, opt, rng, ema)
        if args.val_every and (done % args.val_every == 0 or done == args.steps):
            if master or args.fsdp:
                validate(done, model, vae, cache, schedule, args, latent_shape, device)
            parallel.barrier()
        t_prev = time.perf_counter()  # saving and validating are not training time


if __name__ == "__main__":
    main()
