"""What a CogVideoX forward pass and a DualReal training step cost: FLOPs and memory, counted by hand.

train.py prints these at startup (and MFU while it runs); bench.py compares them with measurements. The counts
are analytic, from the shapes alone, so they hold for a 5B model on a machine that cannot run it.

Conventions: one multiply-add = 2 FLOPs. Only matmuls are counted (linear layers and the two attention
products); norms, activations, RoPE and softmax are a few % and are left out. Shapes: B batch, N video
tokens, L text tokens, S = L + N, D hidden size, E time-embedding size.
"""

from dataclasses import dataclass

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, for MFU.
PEAK_TFLOPS = {"A100": 312.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "RTX 4090": 165.2}


def peak_tflops(device_name: str) -> float | None:
    """The bf16 peak of a GPU from its torch.cuda.get_device_name() (PCIe before SXM), or None."""
    for name, tflops in PEAK_TFLOPS.items():
        if name.replace(" ", "").lower() in device_name.replace(" ", "").lower():
            return tflops
    return None


def token_counts(cfg, frames: int, height: int, width: int, text_len: int | None = None) -> tuple[int, int]:
    """(video tokens N, text tokens L) for `frames` pixel frames (4k+1) of height × width pixels.

    The VAE compresses 4× in time (4k+1 -> k+1 frames) and 8× in space; the DiT patchifies p×p (×pt in time).
    """
    latent_frames = (frames - 1) // 4 + 1
    grid = -(-latent_frames // cfg.patch_t) * (height // 8 // cfg.patch_size) * (width // 8 // cfg.patch_size)
    return grid, cfg.max_text_seq_length if text_len is None else text_len


def estimate_flops(cfg, frames: int, height: int, width: int, batch: int = 1, text_len: int | None = None,
                   grad_checkpointing: bool = True, adapter_width: int = 0) -> dict[str, float]:  # fmt: skip
    """Matmul FLOPs of one forward pass and of one training step of the transformer.

    Per block, for S tokens: fused q/k/v 2·S·D·3D, out proj 2·S·D·D, FFN 2·S·D·4D·2 → 24·S·D² linear;
    attention q·kᵀ and softmax·v → 4·S²·D. DualReal adds four bottlenecks of width r per block (2·S·D·r·2
    each). The embeddings add patch, text and output projections.

    Training step (frozen base, trainable adapters): the backward of a frozen linear needs only the input
    gradient (1× its forward), the attention backward costs 2× its forward, the adapters' backward 2×.
    Checkpointing recomputes every block's forward once more during the backward.
    """
    n, text = token_counts(cfg, frames, height, width, text_len)
    s, d, p2 = n + text, cfg.inner_dim, cfg.in_channels * cfg.patch_t * cfg.patch_size**2
    per_block_linear = 24 * s * d * d + 2 * 6 * d * cfg.time_embed_dim * 2  # + the two AdaLN projections
    per_block_attn = 4 * s * s * d
    per_block_adapter = 4 * (2 * s * d * adapter_width * 2)
    e = cfg.time_embed_dim  # time MLP (D -> E -> E) and the final AdaLN (E -> 2D) run once per sample
    embed = (
        2 * n * p2 * d + 2 * text * cfg.text_embed_dim * d + 2 * n * d * p2 + 2 * (d * e + e * e + e * 2 * d)
    )
    layers = cfg.num_layers
    linear = batch * (layers * per_block_linear + embed)
    attention = batch * layers * per_block_attn
    adapters = batch * layers * per_block_adapter
    forward = linear + attention + adapters
    backward = linear + 2 * attention + 2 * adapters
    recompute = (
        batch * layers * (per_block_linear + per_block_attn + per_block_adapter) if grad_checkpointing else 0
    )
    return dict(linear=linear, attention=attention, adapters=adapters, forward=forward,
                train_step=forward + backward + recompute, tokens=s)  # fmt: skip


@dataclass
class MemoryEstimate:
    """Bytes of one training step on the GPU, by what holds them."""

    frozen_weights: float  # the base transformer in its dtype
    trainable_states: float  # fp32 adapter/controller parameters + gradients + AdamW's two moments
    checkpoints: float  # block inputs saved for the backward (video + text streams), one per block
    block_activations: float  # one block's activations live during its recompute and backward
    attention_workspace: float  # fused SDPA: q, k, v, output and log-sum-exp, never the S×S matrix

    @property
    def total(self) -> float:
        return sum(vars(self).values())

    @property
    def step(self) -> float:
        """What a step adds to the weights and trainable values: gradients, AdamW moments, activations."""
        return self.total - self.frozen_weights - self.trainable_states / 4

    def table(self) -> str:
        rows = [f"  {k.replace('_', ' '):<22}{v / 2**30:8.2f} GiB" for k, v in vars(self).items()]
        return "\n".join(rows + [f"  {'total':<22}{self.total / 2**30:8.2f} GiB"])


def estimate_training_memory(cfg, frames: int, height: int, width: int, trainable_params: int,
                             batch: int = 1, base_bytes: int = 2, grad_checkpointing: bool = True,
                             adapter_width: int = 64, shards: int = 1) -> MemoryEstimate:  # fmt: skip
    """Analytic peak memory of a training step with cached latents and embeddings (T5, VAE, CLIP off the GPU).

    What autograd keeps for one block of the frozen base, per token, in units of D (bf16): the two LayerNorm
    inputs (2), the q/k/v output the q/k norms read (3), SDPA's rotated q, k and its output (3) and the FFN
    hidden GELU reads (4): 12·D, as a frozen Linear keeps only its weight. Backward adds that hidden's
    gradient (4·D). DualReal's adapters keep, in fp32, per sub-layer: h's fp32 copy (both adapters' input)
    and Δ_mo − Δ_id for ω's gradient (2·D), and each bottleneck's GELU input and output (2·2·r). Both counts
    are checked with saved-tensor hooks (tests/test_costs.py). Checkpointed, one block at a time holds this.
    `shards` > 1: FSDP2 over that many GPUs, each holding its share of the weights and trainable states
    (plus the one block being gathered, which is not counted).
    """
    n, text = token_counts(cfg, frames, height, width)
    s, d = n + text, cfg.inner_dim
    frozen = sum(_param_counts(cfg)) * base_bytes / shards
    trainable = trainable_params * 4 * 4 / shards  # fp32 value, gradient, exp_avg, exp_avg_sq
    kept = batch * s * (12 * d * base_bytes + (4 * d + 8 * adapter_width) * 4)  # one block's saved tensors
    block, saved = kept + batch * s * 4 * d * base_bytes, batch * s * d * base_bytes * cfg.num_layers
    if not grad_checkpointing:  # every block keeps its saved tensors; no block inputs to recompute from
        saved, block = cfg.num_layers * kept, block - kept
    workspace = batch * s * (4 * d * base_bytes + cfg.num_attention_heads * 4)
    return MemoryEstimate(frozen, trainable, saved, block, workspace)


def memory_routes(cfg, mem: MemoryEstimate, trainable_params: int, batch: int) -> dict:
    """Bytes of the step `mem` (at `batch`) under each route to less memory. 8-bit AdamW: two 1-byte moments,
    10 B a parameter, not 16. Offload: all but 2 blocks' checkpoints wait on the CPU. FSDP2 over 2 GPUs: the
    weights and trainable states sharded. Micro-batches of 1 (train.py --micro-batch 1): what grows with the
    batch (checkpoints, block activations, attention workspace) shrinks by 1 / batch; same update."""
    offload, adam8 = mem.checkpoints * (1 - 2 / cfg.num_layers), 6 * trainable_params
    per_batch = mem.checkpoints + mem.block_activations + mem.attention_workspace
    return {
        "8-bit AdamW moments": mem.total - adam8,
        "block checkpoints offloaded to the CPU": mem.total - offload,
        "FSDP2 over 2 GPUs": mem.total - (mem.frozen_weights + mem.trainable_states) / 2,
        "offload + 8-bit AdamW": mem.total - offload - adam8,
        f"{batch} accumulated micro-batches of 1": mem.total - per_batch * (1 - 1 / batch),
    }


def report(cfg, frames: int, height: int, width: int, trainable_params: int) -> tuple[dict, list[str]]:
    """FLOPs with and without DualReal's adapters; training memory at motion batch 1 and the official 3, with
    the routes under 24 GiB: the numbers (for JSON) and the lines bench.py prints."""
    gib, res, lines = 2**30, {}, []
    fits = lambda b: f"{b / gib:5.1f} GiB: " + (f"fits, {24 - b / gib:.1f} GiB left" if b <= 24 * gib else
                                                "does not fit") + " in 24 GiB"  # fmt: skip
    for name, r in (("base", 0), ("with DualReal adapters", 64)):
        f = res[f"flops_adapters{r}"] = estimate_flops(cfg, frames, height, width, adapter_width=r)
        lines.append(f"  {name:<23} forward {f['forward'] / 1e12:6.1f} TFLOP, training step with recompute "
                     f"{f['train_step'] / 1e12:7.1f} TFLOP ({f['tokens']:,} tokens)")  # fmt: skip
    for batch in (1, 3):
        m = estimate_training_memory(cfg, frames, height, width, trainable_params, batch=batch)
        res[f"memory_batch{batch}"] = dict(vars(m), total=m.total)
        head = f"  training memory, batch {batch}: bf16 base, checkpointing, AdamW on {trainable_params:,}"
        lines += [head, m.table(), f"  -> {fits(m.total)}"]
    routes = res["memory_batch3_routes"] = memory_routes(cfg, m, trainable_params, batch=3)
    return res, lines + ["  batch 3, other routes:"] + [f"    {k:<47}{fits(v)}" for k, v in routes.items()]


def _param_counts(cfg) -> tuple[int, int]:
    """(per-block × layers, embeddings + output) parameter counts of the transformer, by hand."""
    d, e = cfg.inner_dim, cfg.time_embed_dim
    p2 = cfg.in_channels * cfg.patch_t * cfg.patch_size**2
    block = 2 * (e * 6 * d + 6 * d + 2 * d) + 4 * (d * d + d) + 4 * cfg.attention_head_dim
    block += d * 4 * d + 4 * d + 4 * d * d + d
    rest = p2 * d + d + cfg.text_embed_dim * d + d + d * e + e + e * e + e + 2 * d + e * 2 * d + 2 * d + 2 * d
    return cfg.num_layers * block, rest + d * p2 + p2


def describe(model, counts: dict, flops: dict, mem: MemoryEstimate, batch: int) -> str:
    """The run summary train.py prints: parameters, tokens per sample and the memory estimate."""
    base = sum(p.numel() for p in model.parameters()) - counts["total"]
    return (f"parameters: base {base:,} (frozen); trainable {counts['total']:,} = identity "
            f"{counts['identity']:,} + motion {counts['motion']:,} + controller {counts['controller']:,}\n"
            f"tokens per sample: identity {flops['identity']['tokens']:,}, motion "
            f"{flops['motion']['tokens']:,}\n"
            f"estimated peak memory of a motion step, {batch} clip(s) per forward:\n"
            f"{mem.table()}")  # fmt: skip
