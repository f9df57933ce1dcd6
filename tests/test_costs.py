"""costs.py: the analytic FLOP and memory counts, checked by hand and against torch's FLOP counter."""

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import adapters
import costs
import model


def one_block_tiny():
    cfg = model.get_config("tiny")
    cfg.num_layers = 1
    return cfg


def test_flops_hand_count_one_block():
    """tiny, 1 block, 9 frames of 64×64 -> 3 latents of 8×8 -> N = 48, L = 16, S = 64, D = 32."""
    s, d, e, n, p2 = 64, 32, 32, 48, 16
    linear_block = 2 * s * d * 3 * d + 2 * s * d * d + 2 * s * d * 4 * d * 2 + 2 * (2 * e * 6 * d)
    embed = 2 * n * p2 * d + 2 * 16 * 32 * d + 2 * n * d * p2 + 2 * (d * e + e * e + e * 2 * d)
    attention = 2 * s * s * d + 2 * s * s * d  # q·kᵀ and softmax·v over all heads
    flops = costs.estimate_flops(one_block_tiny(), 9, 64, 64, text_len=16)
    assert flops["linear"] == linear_block + embed == 1_736_704
    assert flops["attention"] == attention == 524_288
    assert flops["forward"] == 1_736_704 + 524_288
    # training: forward + checkpoint recompute of the block + backward (frozen linear 1×, attention 2×)
    assert flops["train_step"] == flops["forward"] + (linear_block + attention) + (1_736_704 + 2 * attention)


def test_flops_match_torch_flop_counter(monkeypatch):
    """The count equals torch's FlopCounterMode on a real forward (attention as explicit matmuls)."""

    def math_attention(q, k, v):  # the CPU SDPA kernel is invisible to the counter; count its matmuls
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", math_attention)
    cfg = model.get_config("tiny")
    m = model.CogVideoXTransformer(cfg)
    with FlopCounterMode(display=False) as counter:
        m(torch.randn(2, 3, 4, 8, 12), torch.randn(2, 16, 32), torch.tensor([5, 6]))
    want = costs.estimate_flops(cfg, 9, 64, 96, batch=2, text_len=16)["forward"]
    assert counter.get_total_flops() == want


def test_parameter_count_by_hand_matches_model():
    for name, count in [("cogvideox-2b", 1_693_783_872), ("cogvideox-5b", 5_570_283_072)]:
        assert sum(costs._param_counts(model.get_config(name))) == count


def test_5b_training_memory_breakdown():
    """49×480×720, bf16 base, checkpointing, batch 1, DualReal's 335.6M trainable parameters."""
    cfg = model.get_config("cogvideox-5b")
    mem = costs.estimate_training_memory(cfg, 49, 480, 720, trainable_params=335_600_000)
    assert abs(mem.frozen_weights - 5_570_283_072 * 2) < 1
    assert abs(mem.trainable_states - 335_600_000 * 16) < 1
    assert abs(mem.checkpoints - 17_776 * 3072 * 2 * 42) < 1  # one bf16 (S, D) block input per block
    without = costs.estimate_training_memory(cfg, 49, 480, 720, 335_600_000, grad_checkpointing=False)
    assert without.total > 3 * mem.total, "checkpointing must be what makes 5B trainable on one GPU"
    assert "total" in mem.table()


def saved_per_block(cfg, adapter_width: int | None) -> int:
    """Bytes autograd keeps for one block's backward (a 2-block minus a 1-block bf16 model; weights and other
    parameters not counted): the frozen base, or with DualReal's adapters (e of 16 dims) attached."""
    total = []
    for layers in (1, 2):
        torch.manual_seed(0)
        net = model.CogVideoXTransformer(replace(cfg, num_layers=layers)).to(torch.bfloat16)
        net.requires_grad_(False)
        if adapter_width:
            adapters.attach(net, adapters.AdapterConfig(width=adapter_width, cond_dim=16, groups=1))
        params, kept = {p.untyped_storage().data_ptr() for p in net.parameters()}, {}

        def keep(t: torch.Tensor, kept=kept) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(1, 2, 4, 8, 12, dtype=torch.bfloat16, requires_grad=True)  # 48 video + 16 text tokens
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            net(x, torch.randn(1, 16, 32, dtype=torch.bfloat16), torch.tensor([500]),
                cond=torch.randn(1, 16) if adapter_width else None)  # fmt: skip
        total.append(sum(n for ptr, n in kept.items() if ptr not in params))
    return total[1] - total[0]


def test_block_activations_are_what_autograd_keeps():
    """estimate_training_memory's per-block terms against the saved tensors of a real block: 12·D bf16 for
    the frozen base, and (4·D + 8·r) fp32 for the adapters. Before the adapters shared one fp32 copy of h
    and kept only Δ_mo − Δ_id for ω, they kept 8·D fp32 (twice the estimate); an unfrozen base keeps more."""
    cfg, s = replace(model.get_config("tiny"), num_attention_heads=8, attention_head_dim=64), 64
    base, with_adapters = saved_per_block(cfg, None), saved_per_block(cfg, 8)
    d = cfg.inner_dim
    assert abs(base / (s * 12 * d * 2) - 1) < 0.05, base / (s * d * 2)  # measured 12.35·D
    assert abs((with_adapters - base) / (s * (4 * d + 8 * 8) * 4) - 1) < 0.02, with_adapters - base
    mem = costs.estimate_training_memory(cfg, 5, 64, 96, 0, adapter_width=8)  # the same 64 tokens
    assert mem.block_activations == s * (12 * d * 2 + (4 * d + 8 * 8) * 4 + 4 * d * 2)


def test_peak_table_lookup():
    assert costs.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert costs.peak_tflops("NVIDIA H100 PCIe") == 756.0  # not the SXM part's 989
    assert costs.peak_tflops("NVIDIA GeForce RTX 4090") == 165.2
    assert costs.peak_tflops("Some CPU") is None


def test_memory_routes_of_the_official_batch():
    """Routes for motion batch 3: accumulating 3 micro-batches of 1 costs exactly the batch-1 step; FSDP2 over
    2 GPUs halves only the weights and trainable states; 8-bit AdamW saves 6 bytes a trainable parameter."""
    cfg, n = model.get_config("cogvideox-5b"), 335_614_983
    one, three = (costs.estimate_training_memory(cfg, 49, 480, 720, n, batch=b) for b in (1, 3))
    routes = costs.memory_routes(cfg, three, n, batch=3)
    assert abs(routes["3 accumulated micro-batches of 1"] - one.total) < 1e-3 * 2**30
    assert one.total < 24 * 2**30 < three.total
    sharded = (three.frozen_weights + three.trainable_states) / 2
    assert abs(three.total - routes["FSDP2 over 2 GPUs"] - sharded) < 1
    fsdp = costs.estimate_training_memory(cfg, 49, 480, 720, n, batch=3, shards=2)  # what train.py prints
    assert abs(fsdp.total - routes["FSDP2 over 2 GPUs"]) < 1 and fsdp.checkpoints == three.checkpoints
    assert abs(three.total - routes["8-bit AdamW moments"] - 6 * n) < 1


def test_report_prices_the_5b_run_at_its_own_size():
    """bench.py's 5B report at 49×480×720 (17,776 tokens), against the numbers the README quotes."""
    res, lines = costs.report(model.get_config("cogvideox-5b"), 49, 480, 720, 335_614_983)
    text = "\n".join(lines)
    assert "forward  332.2 TFLOP" in text and "forward  334.5 TFLOP" in text and "17,776 tokens" in text
    assert "22.5 GiB: fits" in text and "36.8 GiB: does not fit" in text
    assert round(res["memory_batch1"]["total"] / 2**30, 2) == 22.53
    one = costs.MemoryEstimate(10, 16, 1, 2, 3)  # a step adds all but the weights and the parameter values
    assert one.step == 32 - 10 - 16 / 4
