"""Real-shaped runs for a GPU: a cogvideox-5b DualReal training step, and 50-step sampling against diffusers'
CogVideoXPipeline (the reference: imported by the benchmarks and tests/, never by the runtime).

    python bench_gpu.py [train|sample|all] [--json out.json]   # CUDA: 5B at 49x480x720, bf16
    python bench_gpu.py --device cpu --model tiny --frames 5 --height 32 --width 48 --steps 2   # a smoke run

Weights are random (the time and memory of a step do not depend on their values), built on the device. No
T5, CLIP or VAE runs: like train.py after precomputing, both parts get random latents and embeddings of the
real shapes.
- train: train.py's motion step (adapters and StageBlender attached, gradient checkpointing, each block
  compiled, the gradient mask, clipping, AdamW), timed after a first step that compiles; its peak memory
  (torch.cuda.max_memory_allocated) against costs.py's estimate, and model TFLOP/s and MFU as train.py logs.
- sample: diffusion.sample (sample.py's loop: DPM-Solver++, CFG 6, the whole model compiled) against the
  pipeline with the same weights, embeddings and generator seed, output_type="latent" (no VAE decode), in
  --rounds rotating rounds; ours also eager; the final latents are compared (bf16 rounding alone: 0.07 std).
"""

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import statistics
import time
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import CogVideoXDPMScheduler
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

import adapters
import checkpoint
import costs
import diffusion
import model

# CogVideoX-5B's scheduler_config.json (as diffusion.load_schedule(None) assumes)
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
    set_alpha_to_one=True, snr_shift_scale=1.0, steps_offset=0, timestep_spacing="trailing",
)  # fmt: skip
CLIP_DIM = 1024  # e: the CLIP ViT-H/14 image embedding the motion adapters get
ROW = "{:<34}{:>12}{:>12}{:>8}  {}"  # name, ours, diffusers, ratio ours / diffusers, notes


def timed(fn, device: torch.device) -> float:
    """Seconds of fn(), waiting for the device before and after (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def gib(device: torch.device, peak: bool = True) -> float | None:
    """GiB allocated by tensors on a CUDA device: the peak since the last reset, or now; None on the CPU."""
    if device.type != "cuda":
        return None
    return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device) / 2**30


def latent_shape(cfg, batch: int, frames: int, height: int, width: int) -> tuple[int, ...]:
    """(B, F, C, H, W) of the VAE latents of `frames` frames of height x width (4x in time, 8x in space)."""
    return batch, (frames - 1) // 4 + 1, cfg.in_channels, height // 8, width // 8


def train_step(cfg, frames, height, width, device, dtype, compile: bool, steps: int, batch: int = 1) -> dict:
    """Time `steps` DualReal motion steps after a first one (compile and warm-up), as train.py runs them."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"  # as train.py: TF32 on CUDA
    with torch.device(device):
        net = model.CogVideoXTransformer(cfg).to(dtype)  # random init in fp32, then the frozen base's dtype
    ext = adapters.attach(net, adapters.AdapterConfig(cond_dim=CLIP_DIM))  # fp32, freezes the base
    net.grad_checkpointing = True
    for block in net.blocks if compile else []:
        block.compile()  # in place, per block, as train.py does
    opt = torch.optim.AdamW(ext.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-4)
    schedule, gen = diffusion.load_schedule(None), torch.Generator().manual_seed(0)
    shape = latent_shape(cfg, batch, frames, height, width)
    z = torch.randn(shape, generator=gen).to(device)  # cached, scaled VAE latents
    text = torch.randn(batch, cfg.max_text_seq_length, cfg.text_embed_dim, generator=gen).to(device, dtype)
    e = torch.randn(batch, CLIP_DIM, generator=gen).to(device)
    losses = []

    def step() -> None:
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        noise = torch.randn(shape, generator=gen).to(device)
        pred = net(schedule.add_noise(z, noise, t).to(dtype), text, t, cond=e)
        loss = F.mse_loss(pred.float(), schedule.velocity(z, noise, t).float())
        losses.append(loss.item())  # train.py's one host sync per step, its NaN guard
        loss.backward()
        adapters.mask_gradients(ext, "motion")
        torch.nn.utils.clip_grad_norm_(ext.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # after the fp32 -> bf16 cast of the random init
    first = timed(step, device)
    seconds = statistics.median(timed(step, device) for _ in range(steps))
    n = adapters.count_parameters(ext)["total"]
    flops = costs.estimate_flops(cfg, frames, height, width, batch, None, False, 64)
    mem = costs.estimate_training_memory(cfg, frames, height, width, n, batch, dtype.itemsize)
    peak = costs.peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tflops = flops["train_step"] / seconds / 1e12  # model FLOPs (recomputation not counted), as train.py
    return dict(first_s=first, step_s=seconds, tflops=tflops, mfu=tflops / peak if peak else None,
                peak_gib=gib(device), estimate_gib=mem.total / 2**30, trainable=n, losses=losses)  # fmt: skip


def sampling(cfg, frames, height, width, device, dtype, compile: bool, steps: int, rounds: int) -> dict:
    """Seconds of `steps`-step CFG sampling: ours (compiled if `compile`, and eager) and diffusers' pipeline,
    the same weights, embeddings and seed; each side's peak memory above the weights; the latents' gap."""
    torch.manual_seed(0)
    with torch.device(device):
        ref = diffusers.CogVideoXTransformer3DModel(**dataclasses.asdict(cfg))
    ref = ref.to(dtype).eval().requires_grad_(False)
    with torch.device("meta"):
        ours = model.CogVideoXTransformer(cfg)
    # diffusers' own tensors, but for q/k/v, which are concatenated (a copy: 2.2 GiB at 5B)
    state = model.convert_checkpoint(ref.state_dict(), cfg)
    checkpoint.assign_strict(ours, state, "diffusers", device, dtype)
    sides = {"diffusers": ref, "ours": ours.requires_grad_(False)}
    if compile:  # the same module compiled whole, as sample.py's in-place compile does; it shares the weights
        sides["compiled"] = torch.compile(ours)
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref,
                             scheduler=CogVideoXDPMScheduler(**SCHEDULER))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    text, neg = (torch.randn(1, cfg.max_text_seq_length, cfg.text_embed_dim, generator=gen) for _ in range(2))
    text, neg = text.to(device, dtype), neg.to(device, dtype)
    shape = latent_shape(cfg, 1, frames, height, width)
    schedule, out = diffusion.load_schedule(None), {}

    def run(side: str, n: int) -> None:
        seed = torch.Generator().manual_seed(0)  # the initial noise and the SDE noise, on the CPU
        if side == "diffusers":
            out[side] = pipe(
                prompt_embeds=text, negative_prompt_embeds=neg, height=height, width=width, num_frames=frames,
                num_inference_steps=n, guidance_scale=6.0, generator=seed,
                max_sequence_length=cfg.max_text_seq_length, output_type="latent",
            ).frames  # (1, F, C, H, W) latents: no VAE decode  # fmt: skip
        else:
            with torch.no_grad():
                out[side] = diffusion.sample(sides[side], schedule, text, neg, shape, n, 6.0, "dpm",
                                             generator=seed, progress=False)  # fmt: skip

    res = dict(compile_s=timed(lambda: run("compiled", 1), device)) if compile else {}
    print(f"  compiled in {res['compile_s']:.1f} s" if compile else "  eager only", flush=True)
    for side in sides:
        run(side, 2)  # warm-up: the first call of each side (kernel selection, caches)
    names, times, peak = list(sides), {side: [] for side in sides}, {}  # names[0]: diffusers
    for r in range(rounds):
        for side in names[r % len(names) :] + names[: r % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            base = gib(device, peak=False)
            times[side].append(timed(functools.partial(run, side, steps), device))
            peak[side] = None if base is None else gib(device) - base
            print(f"  round {r + 1}, {side}: {times[side][-1]:.2f} s", flush=True)  # kept if a later run dies
    ref_out = out["diffusers"].float()
    res["gap"] = {s: ((out[s].float() - ref_out).abs().max() / ref_out.std()).item() for s in names[1:]}
    res["ratio"] = {s: statistics.median(a / b for a, b in zip(times[s], times["diffusers"])) for s in names}
    res["seconds"] = {s: statistics.median(v) for s, v in times.items()}
    return res | dict(peak_gib_over_weights=peak, weights_gib=gib(device, peak=False))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "train", "sample"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="cogvideox-5b", choices=["cogvideox-5b", "tiny"], help="config")
    p.add_argument("--layers", type=int, help="blocks (default: the config's; 42 for 5B)")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=720)
    p.add_argument("--steps", type=int, default=50, help="sampling steps; timed training steps: 5")
    p.add_argument("--rounds", type=int, default=1, help="alternating sampling rounds per side")
    p.add_argument("--no-compile", action="store_true", help="eager only (default: compile, as on CUDA)")
    p.add_argument("--json", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    if (args.frames - 1) % 4 or args.height % 16 or args.width % 16:
        p.error("--frames must be 4k+1 and --height, --width multiples of 16")
    if min(args.layers or 1, args.steps, args.rounds) < 1:
        p.error("--layers, --steps and --rounds must be >= 1")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        p.error(f"--json {args.json}: its folder does not exist")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu for a smoke run)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = model.get_config(args.model)
    cfg.num_layers = args.layers or cfg.num_layers
    size, compile = (args.frames, args.height, args.width), not args.no_compile
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (f"{name}, torch {torch.__version__}, diffusers {diffusers.__version__}, {args.model} with "
              f"{cfg.num_layers} blocks, {'x'.join(map(str, size))}, {dtype}, "
              f"{datetime.datetime.now():%Y-%m-%d %H:%M}")  # fmt: skip
    print(header, flush=True)
    diffusers.utils.logging.set_verbosity_error()  # not its advice on casting a random-weight model
    results = dict(machine=header)
    dump = lambda: Path(args.json).write_text(json.dumps(results, indent=1)) if args.json else None
    if args.what in ("all", "train"):
        r = results["train"] = train_step(cfg, *size, device, dtype, compile, steps=5)
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
        peak = f"{r['peak_gib']:.2f} GiB" if r["peak_gib"] is not None else "CUDA only"
        first = f"the first, {'compiling' if compile else 'warm-up'}: {r['first_s']:.1f} s"
        print(f"train step: {r['step_s']:.3f} s ({first}), {r['tflops']:.1f} model TFLOP/s{mfu}; "
              f"peak memory {peak}, costs.py {r['estimate_gib']:.2f} GiB", flush=True)  # fmt: skip
        dump()  # written now: a sampling run that dies later keeps these numbers
        gc.collect()  # blocks compiled in place sit in reference cycles: free their weights before sampling
    if args.what in ("all", "sample"):
        r = results["sample"] = sampling(cfg, *size, device, dtype, compile, args.steps, args.rounds)
        print(ROW.format(f"sampling, {args.steps} steps, CFG 6", "ours", "diffusers", "ratio", ""))
        peak, secs, base = r["peak_gib_over_weights"], r["seconds"], r["weights_gib"]  # None on the CPU
        for side in r["gap"]:
            mem = f"; peak over weights {peak[side]:.2f} / {peak['diffusers']:.2f} GiB" if base else ""
            cells = f"{secs[side]:.2f} s", f"{secs['diffusers']:.2f} s", f"{r['ratio'][side]:.3f}"
            print(ROW.format(f"  {side}", *cells, f"max |gap| / std {r['gap'][side]:.1e}{mem}"))
        if compile:
            print(f"  compiling (one step, both CFG halves): {r['compile_s']:.1f} s")
    dump()
    return results


if __name__ == "__main__":
    main()
