"""Benchmarks: speed and memory of model.py and vae.py against diffusers (the reference, imported here and in
tests/, never by the runtime); costs.py's memory model against a measured step, and its numbers for 5B.

    python bench.py [--json out.json]  # every row on the CPU as a table (about 4 min on 2 cores) [and JSON]
    python bench.py vae-memory         # our full-size VAE, frame-chunked vs whole-clip peak memory (slow)

Both sides get the same config, weights and inputs, fp32. A transformer step: out.square().mean().backward(),
frozen weights, gradient w.r.t. the latents (DualReal backprops through a frozen base into adapters).
diffusers gets RoPE tables from its pipeline outside the timed call; ours builds them in forward.
"""

import argparse
import datetime
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import torch
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

import adapters
import costs
import model
import vae

# Mid-size transformer, 5B-shaped (RoPE): 4 layers, 8 heads × 64 = D 512; 4 latent frames of 16×24 -> 384
# video tokens (13 frames of 128×192 pixels) and 32 text tokens. Keys are diffusers' config names.
MID = dict(num_attention_heads=8, attention_head_dim=64, in_channels=16, out_channels=16, text_embed_dim=512,
           time_embed_dim=512, num_layers=4, sample_height=16, sample_width=24, max_text_seq_length=32,
           use_rotary_positional_embeddings=True)  # fmt: skip
LATENT = (4, 16, 16, 24)  # (F, C, H, W)
# The VAE has the real widths (128, 256, 256, 512) and 3 resnets per block, at a small size: 17 frames of
# 32×48 pixels (5 latents of 4×6), so encode runs two frame chunks (9, 8 frames) and decode two (3, 2).
VAE_INPUT = (17, 32, 48)
ADAPTERS = adapters.AdapterConfig(cond_dim=64)  # DualReal's defaults (width 64, 7 groups), e of 64 dims
TRAINABLE = 335_614_983  # DualReal's adapters + controller on cogvideox-5b (tests/test_adapters.py)
ROW = "{:<40}{:>10}{:>11}{:>7}  {}"  # name, ours, diffusers, ratio ours / diffusers, notes


def transformer_steps(batch: int = 2, all_params: bool = False, compiled: bool = False) -> dict:
    """{side: step()}, a forward + backward of the mid transformer: ours and diffusers with the same weights,
    and with `compiled` also ours after module.compile() (in place, as train.py does)."""
    cfg, sides = model.TransformerConfig(**MID), ("ours", "compiled") if compiled else ("ours",)
    torch.manual_seed(0)
    models = {"diffusers": diffusers.CogVideoXTransformer3DModel(**MID)}
    for side in sides:  # the same weights, through the checkpoint key table
        models[side] = model.CogVideoXTransformer(cfg)
        models[side].load_state_dict(model.convert_checkpoint(models["diffusers"].state_dict(), cfg))
    if compiled:
        models["compiled"].compile()
    pipe = argparse.Namespace(transformer=models["diffusers"], vae_scale_factor_spatial=8)
    rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, 128, 192, 4, "cpu")
    kw = dict(image_rotary_emb=rope, return_dict=False)  # diffusers' forward arguments
    gen = torch.Generator().manual_seed(0)
    x, text = torch.randn(batch, *LATENT, generator=gen), torch.randn(batch, 32, 512, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)

    def step(side: str, m: torch.nn.Module) -> None:
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(not all_params)
        out = m(xi, text, t, **kw)[0] if side == "diffusers" else m(xi, text, t)
        out.square().mean().backward()

    return {side: functools.partial(step, side, m.requires_grad_(all_params)) for side, m in models.items()}


def vae_ops(op: str, size=VAE_INPUT, chunked: bool = True) -> dict:
    """{side: call()}: the full-width CogVideoX VAE (random weights, the same on both sides) encoding or
    decoding `size` (frames, height, width) of video; `chunked` = False runs ours on whole clips."""
    cfg = vae.CONFIGS["cogvideox-5b"]
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLCogVideoX(
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor).eval()  # fmt: skip
    ours = vae.CogVideoXVAE(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    ours.chunked = chunked
    frames, height, width = size
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, frames, height, width, generator=gen) * 2 - 1  # (B, 3, T, H, W)
    z = torch.randn(1, (frames - 1) // 4 + 1, 16, height // 8, width // 8, generator=gen)  # (B, F, C, h, w)
    unscaled = z.transpose(1, 2) / cfg.scaling_factor  # diffusers decodes (B, C, F, h, w), unscaled
    calls = {"encode": dict(ours=lambda: ours.encode_posterior(video), diffusers=lambda: ref.encode(video)),
             "decode": dict(ours=lambda: ours.decode(z), diffusers=lambda: ref.decode(unscaled))}  # fmt: skip
    return {side: torch.no_grad()(call) for side, call in calls[op].items()}


def train_step() -> dict:
    """{"ours": step()}: a DualReal training step (bf16 frozen base, fp32 adapters, checkpointing, AdamW) of
    the mid transformer with 8 blocks on 25 latent frames of 16×24 (97 frames of 128×192 pixels)."""
    m = model.CogVideoXTransformer(model.TransformerConfig(**dict(MID, num_layers=8))).to(torch.bfloat16)
    opt = torch.optim.AdamW(adapters.attach(m, ADAPTERS).parameters())  # attach freezes the base
    m.grad_checkpointing, gen = True, torch.Generator().manual_seed(0)
    z, text, e = (torch.randn(shape, generator=gen) for shape in ((1, 25, 16, 16, 24), (1, 32, 512), (1, 64)))

    def step() -> None:
        m(z.bfloat16(), text.bfloat16(), torch.tensor([500]), cond=e).float().square().mean().backward()
        opt.step()

    return {"ours": step}


def _child(spec: dict) -> None:
    """In a fresh interpreter: build a workload, call one side once, print its memory as a JSON line."""
    mib = lambda field: int(re.search(rf"{field}:\s*(\d+)", Path("/proc/self/status").read_text())[1]) / 1024
    torch.set_num_threads(spec.pop("threads"))
    build = {"transformer": transformer_steps, "vae": vae_ops, "train": train_step}[spec.pop("kind")]
    call = build(**{k: v for k, v in spec.items() if k != "side"})[spec["side"]]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before, start = mib("VmRSS"), time.perf_counter()
    call()
    seconds, peak = time.perf_counter() - start, mib("VmHWM")
    print(json.dumps(dict(before_mib=round(before), op_mib=round(peak - before), seconds=round(seconds, 1))))


def peak_memory(**spec) -> dict:
    """_child(spec) in a fresh interpreter: a peak is a lifetime maximum, so each measurement gets its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(spec)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # blocks >= 64 KiB: mmap, unmapped when freed
    run = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"memory run {spec} failed:\n{run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def compare(calls: dict, rounds: int, **memory_spec) -> dict:
    """Seconds per side (median of rotating rounds; a warm-up call each first), each side's median per-round
    ratio to diffusers, peak MiB of ours and diffusers, and `busy`: the CPU share other processes used."""
    # the machine's user + nice + system seconds (/proc/stat, USER_HZ = 100 ticks) minus this process's
    others = lambda: sum(map(int, Path("/proc/stat").read_text().split()[1:4])) / 100 - time.process_time()
    names, times = list(calls), {name: [] for name in calls}
    for call in calls.values():
        call()
    others0, wall = others(), time.perf_counter()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    busy = max(0.0, others() - others0) / ((time.perf_counter() - wall) * os.cpu_count())
    ratio = {s: statistics.median(a / b for a, b in zip(times[s], times["diffusers"])) for s in names}
    peak = {s: peak_memory(side=s, **memory_spec)["op_mib"] for s in ("ours", "diffusers")}
    seconds = {s: statistics.median(v) for s, v in times.items()}
    return dict(seconds=seconds, ratio=ratio, peak_mib=peak, busy=busy, times=times)


def kernel_share(step, steps: int = 3) -> float:
    """Share of the wall time of `steps` calls in matmul (MKL or oneDNN: onednn.py) and SDPA kernels."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - start
    names = r"aten::(b?mm|addmm|_scaled_dot_product\w+)|mkldnn::_linear_pointwise"
    return sum(e.self_cpu_time_total for e in prof.key_averages() if re.fullmatch(names, e.key)) / 1e6 / wall


def measure(rounds: int, threads: int, batch: int, all_params: bool) -> tuple[dict, list[str]]:
    """Every measured row, as results and printed lines: the transformer, eager and compiled, and the VAE."""

    def row(name: str, r: dict) -> str:  # seconds of ours and diffusers, their ratio, the peak memories
        cells = [f"{r['seconds'][s]:.3f} s" for s in ("ours", "diffusers")] + [f"{r['ratio']['ours']:.3f}"]
        return ROW.format(name, *cells, "peak {ours} / {diffusers} MiB".format(**r["peak_mib"]))

    steps = transformer_steps(batch, all_params, compiled=True)
    torch._inductor.config.force_disable_caches = True  # a cold compile, as a first run sees it
    start = time.perf_counter()
    steps["compiled"]()  # compiles the forward graph, then the backward graph
    first_call = time.perf_counter() - start
    r = compare(steps, 3 * rounds, kind="transformer", threads=threads, batch=batch, all_params=all_params)
    res = {"transformer": r, "compile_s": first_call - r["seconds"]["compiled"]}
    share = res["kernel_share"] = {s: kernel_share(steps[s]) for s in ("ours", "diffusers")}
    pct = [f"{share[s]:.1%}" for s in ("ours", "diffusers")] + [f"{share['ours'] * r['ratio']['ours']:.3f}"]
    flops = costs.estimate_flops(model.TransformerConfig(**MID), 13, 128, 192, batch, 32, False)  # no ckpt
    gflop = res["gflop_per_step"] = (flops["train_step"] + all_params * flops["linear"]) / 1e9  # + dW
    speed = [f"{gflop / r['seconds'][s]:.1f}" for s in ("ours", "diffusers")]
    c, seconds = r["ratio"]["compiled"], f"{r['seconds']['compiled']:.3f} s"
    note = f"{c / r['ratio']['ours']:.3f}x ours eager; compiling took {res['compile_s']:.0f} s, cold cache"
    lines = [ROW.format("measured, median over rounds", "ours", "diffusers", "ratio", ""),
             row(f"transformer B={batch}, grad {'all params' if all_params else 'latents'}", r),
             ROW.format("  achieved GFLOP/s", *speed, "", f"{gflop:.1f} GFLOP a step (costs.py)"),
             ROW.format("  ours, torch.compile", seconds, "", f"{c:.3f}", note),
             ROW.format("  time in matmul + SDPA kernels", *pct, "floor: ours in kernels only")]  # fmt: skip
    for op, size in (("encode", "17x32x48 pixels"), ("decode", "5x4x6 latents")):
        res[f"vae_{op}"] = compare(vae_ops(op), rounds, kind="vae", threads=threads, op=op)
        lines.append(row(f"VAE {op} {size}", res[f"vae_{op}"]))
    cfg = model.TransformerConfig(**dict(MID, num_layers=8))  # costs.py's memory model on train_step's step
    n = adapters.count_parameters(adapters.attach(model.CogVideoXTransformer(cfg), ADAPTERS))["total"]
    live = costs.estimate_training_memory(cfg, 97, 128, 192, n, base_bytes=2).step / 2**20
    mib = peak_memory(kind="train", side="ours", threads=threads)["op_mib"]  # peak minus weights, inputs
    res["memory_model"] = dict(measured_mib=mib, estimated_mib=live)
    cells = f"{mib} MiB", f"{live:.0f} MiB", f"{live / mib:.3f}", "measured, costs.py (8 blocks, bf16)"
    lines.append(ROW.format("DualReal train step's live memory", *cells))
    busy = max(res[k]["busy"] for k in ("transformer", "vae_encode", "vae_decode"))
    return res, lines + [f"other processes used up to {busy:.0%} of the CPU while timing"]


def vae_memory(frames: int, height: int, width: int, threads: int) -> list[dict]:
    """Peak memory (op_mib: what the call itself needs) of our full-size VAE, frame-chunked vs whole clip."""
    results = []
    for op, mode in [(op, mode) for op in ("decode", "encode") for mode in ("chunked", "whole")]:
        spec = dict(op=op, size=(frames, height, width), chunked=mode == "chunked")
        results.append(r := dict(peak_memory(kind="vae", side="ours", threads=threads, **spec), **spec))
        print(f"{op} {mode:7s} {frames}x{height}x{width}: weights + input {r['before_mib']:6d} MiB, "
              f"op {r['op_mib']:6d} MiB, {r['seconds']:6.1f} s", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("what", nargs="?", default="all", choices=["all", "vae-memory"])
    parser.add_argument("--json", help="also write every number to this JSON file")
    parser.add_argument("--rounds", type=int, default=7, help="timed VAE rounds (transformer: 3x)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=2, help="transformer batch size")
    parser.add_argument("--all-params", action="store_true", help="transformer gradients w.r.t. all weights")
    parser.add_argument("--size", type=int, nargs=3, default=[49, 96, 144], help="vae-memory: T=4k+1 H W=8k")
    args = parser.parse_args()
    t, h, w = args.size
    if min(args.rounds, args.threads, args.batch, t, h, w) < 1 or (t - 1) % 4 or h % 8 or w % 8:
        parser.error("--rounds, --threads, --batch must be >= 1; --size T H W needs T = 4k+1, H, W = 8k")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its folder does not exist")
    torch.set_num_threads(args.threads)
    cpu = (re.findall(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text()) or [os.uname().machine])[0]
    header = (f"{cpu}, {os.cpu_count()} cores, {args.threads} torch threads, torch {torch.__version__}, "
              f"diffusers {diffusers.__version__}, {datetime.datetime.now():%Y-%m-%d %H:%M}")  # fmt: skip
    print(header, flush=True)
    if args.what == "vae-memory":
        results = dict(vae_memory=vae_memory(t, h, w, args.threads))
    else:
        results, lines = measure(args.rounds, args.threads, args.batch, args.all_params)
        results["5b"], report = costs.report(model.get_config("cogvideox-5b"), 49, 480, 720, TRAINABLE)
        print("\n".join(lines + ["", "cogvideox-5b at 49x480x720, analytic (costs.py):", *report]))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results, machine=header), indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["_child"]:
        sys.exit(_child(json.loads(sys.argv[2])))
    main()
