"""bench.py's profiler measure: the share of a step's wall time spent in matmul and attention kernels."""

import torch
import torch.nn.functional as F

import bench


def test_kernel_share_tells_matmuls_from_other_work():
    a, q, x = torch.randn(256, 256), torch.randn(1, 4, 256, 64), torch.randn(1 << 20)
    work = dict(matmuls=lambda: [a @ a for _ in range(20)], attention=lambda: [F.scaled_dot_product_attention(
        q, q, q) for _ in range(10)], elementwise=lambda: [(x * 2).exp() for _ in range(20)])  # fmt: skip
    for step in work.values():  # warm-up: first calls and the profiler's own start-up
        bench.kernel_share(step, steps=1)
    share = {name: bench.kernel_share(step) for name, step in work.items()}
    assert share["matmuls"] > 0.6 and share["attention"] > 0.6 and share["elementwise"] < 0.05, share
