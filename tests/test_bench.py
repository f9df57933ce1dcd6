"""bench.py's profiler measure: the share of a step's wall time spent in matmul and attention kernels."""

import torch
import torch.nn.functional as F

import adapters
import bench
import costs
import model


def test_kernel_share_tells_matmuls_from_other_work():
    a, q, x = torch.randn(256, 256), torch.randn(1, 4, 256, 64), torch.randn(1 << 20)
    work = dict(matmuls=lambda: [a @ a for _ in range(20)], attention=lambda: [F.scaled_dot_product_attention(
        q, q, q) for _ in range(10)], elementwise=lambda: [(x * 2).exp() for _ in range(20)])  # fmt: skip
    for step in work.values():  # warm-up: first calls and the profiler's own start-up
        bench.kernel_share(step, steps=1)
    share = {name: bench.kernel_share(step) for name, step in work.items()}
    assert share["matmuls"] > 0.6 and share["attention"] > 0.6 and share["elementwise"] < 0.05, share


def test_memory_model_matches_a_measured_training_step():
    """costs.py's estimate of what a DualReal step adds to memory (gradients, AdamW moments, checkpoints,
    activations, attention workspace) against the measured peak RSS of that step in a fresh interpreter:
    8 mid-size blocks, bf16 base, checkpointing, 2,432 tokens (measured here: 154 MiB, estimated 160 MiB)."""
    cfg = model.TransformerConfig(**dict(bench.MID, num_layers=8))
    n = adapters.count_parameters(adapters.attach(model.CogVideoXTransformer(cfg), bench.ADAPTERS))["total"]
    estimate = costs.estimate_training_memory(cfg, 97, 128, 192, n, base_bytes=2).step / 2**20
    measured = bench.peak_memory(kind="train", side="ours", threads=2)["op_mib"]
    assert 0.85 < estimate / measured < 1.15, (estimate, measured)
