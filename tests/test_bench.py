"""bench.py's profiler measure (the share of a step's wall time spent in matmul and attention kernels) and its
memory-model check; bench_gpu.py's two parts, run small on the CPU."""

import gc
import json
import math

import pytest
import torch
import torch.nn.functional as F

import adapters
import bench
import bench_gpu
import costs
import model
import onednn


def test_kernel_share_tells_matmuls_from_other_work():
    a, q, x = torch.randn(256, 256), torch.randn(1, 4, 256, 64), torch.randn(1 << 20)
    linear, rows = onednn.Linear(256, 256), torch.randn(512, 256)  # fp32, 2^25: oneDNN's kernel counts too
    work = dict(matmuls=lambda: [a @ a for _ in range(20)], onednn=lambda: [linear(rows) for _ in range(10)],
                attention=lambda: [F.scaled_dot_product_attention(q, q, q) for _ in range(10)],
                elementwise=lambda: [(x * 2).exp() for _ in range(20)])  # fmt: skip
    for step in work.values():  # warm-up: first calls and the profiler's own start-up
        bench.kernel_share(step, steps=1)
    share = {name: bench.kernel_share(step) for name, step in work.items()}
    assert min(share["matmuls"], share["onednn"], share["attention"]) > 0.6, share
    assert share["elementwise"] < 0.05, share


def test_memory_model_matches_a_measured_training_step():
    """costs.py's estimate of what a DualReal step adds to memory (gradients, AdamW moments, checkpoints,
    activations, attention workspace) against the measured peak RSS of that step in a fresh interpreter:
    8 mid-size blocks, bf16 base, checkpointing, 2,432 tokens (measured here: 140 MiB, estimated 157 MiB)."""
    cfg = model.TransformerConfig(**dict(bench.MID, num_layers=8))
    n = adapters.count_parameters(adapters.attach(model.CogVideoXTransformer(cfg), bench.ADAPTERS))["total"]
    estimate = costs.estimate_training_memory(cfg, 97, 128, 192, n, base_bytes=2).step / 2**20
    measured = bench.peak_memory(kind="train", side="ours", threads=2)["op_mib"]
    assert 0.85 < estimate / measured < 1.15, (estimate, measured)


SMOKE = "--device cpu --model tiny --frames 5 --height 32 --width 48 --no-compile".split()


def test_bench_gpu_times_the_same_work_on_both_sides(tmp_path):
    """Its sampling ratio is only a speed comparison if both sides denoise the same latents: same weights,
    embeddings, noise and scheduler. The training step runs train.py's step and reports costs.py's FLOPs."""
    out = tmp_path / "gpu.json"
    bench_gpu.main([*SMOKE, "--steps", "4", "--json", str(out)])  # 4 divides 1000: the two schedules agree
    r = json.loads(out.read_text())
    assert r["sample"]["gap"]["ours"] < 1e-4, r["sample"]["gap"]  # measured 5e-6 (fp32)
    train = r["train"]
    assert len(train["losses"]) == 6 and all(map(math.isfinite, train["losses"])), train["losses"]
    flops = costs.estimate_flops(model.get_config("tiny"), 5, 32, 48, 1, None, False, 64)["train_step"]
    assert train["tflops"] * train["step_s"] * 1e12 == pytest.approx(flops)
    assert train["peak_gib"] is None and train["trainable"] > 0  # CUDA's allocator counts; the CPU has none


def test_bench_gpu_frees_the_training_model_before_sampling(monkeypatch):
    """block.compile() (in place, as train.py does) leaves every block in a reference cycle (block ->
    compiled call -> bound method -> block): without a collection the training model's weights (10.4 GiB at
    5B) stayed on the GPU while sampling measured its memory. Compiled with dynamo's eager backend here."""
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    smoke = [a for a in SMOKE if a != "--no-compile"]
    gc.disable()  # only the explicit collection may free it
    try:
        bench_gpu.main(["train", *smoke])
        alive = sum(type(o) is model.Block for o in gc.get_objects())  # the blocks hold the weights
    finally:
        gc.enable()
        torch._dynamo.reset()
    assert alive == 0, f"{alive} blocks of the training model still alive"


@pytest.mark.parametrize("bad", [["--frames", "6"], ["--height", "40"], ["--steps", "0"]])
def test_bench_gpu_rejects_bad_sizes(bad, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_gpu.main([*SMOKE, *bad])
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err
