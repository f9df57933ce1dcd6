"""The CogVideoX diffusion transformer, written from scratch.

CogVideoX (Yang et al., "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer", 2024) is a
DiT over [text; video] tokens. A frozen T5 embeds the prompt and a 3D VAE compresses the video. Each block
runs full joint self-attention and a feed-forward net over both token streams. "Expert" AdaLN modulates the
two streams separately: one LayerNorm, two sets of (shift, scale, gate) from the timestep embedding.

Variants: 2B adds 3D sin-cos absolute positions to the video tokens. 5B and 1.5-5B apply 3D RoPE to q and k
of the video tokens, after the per-head q/k LayerNorm. 1.5 also patchifies time (patch_size_t = 2).

Reference: diffusers' `CogVideoXTransformer3DModel`; tests/test_model.py matches it to 1e-5 in fp32. Unlike
diffusers, the model computes its own positions from the input shape: callers never pass RoPE tables.

Shapes: B batch, F latent frames, C latent channels, H/W latent height/width, L text tokens, N video tokens,
S = L + N, D hidden size, nh heads, hd head dim, E time-embedding size.
"""

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint as grad_checkpoint

import checkpoint
from onednn import Linear  # nn.Linear, with fp32 CPU matmuls on oneDNN


@dataclass
class TransformerConfig:
    """Names follow diffusers' config.json; defaults are 2B's, and a field a config.json omits keeps them."""

    num_attention_heads: int = 30  # nh: 30 (2B), 48 (5B)
    attention_head_dim: int = 64  # hd
    in_channels: int = 16  # latent channels from the VAE
    out_channels: int = 16
    text_embed_dim: int = 4096  # T5-XXL d_model
    time_embed_dim: int = 512  # E: width of the timestep embedding that drives every AdaLN
    num_layers: int = 30  # 30 (2B), 42 (5B)
    patch_size: int = 2  # spatial patch p
    patch_size_t: int | None = None  # temporal patch (1.5: 2); None = 1
    sample_height: int = 60  # trained latent size: the 1.0 RoPE base grid (1.5: max grid 300/p)
    sample_width: int = 90
    max_text_seq_length: int = 226  # T5 tokens per prompt
    use_rotary_positional_embeddings: bool = False  # 3D RoPE (5B, 1.5) instead of 3D sin-cos (2B)
    spatial_interpolation_scale: float = 1.875  # sin-cos positions: h, w coordinates are divided by this
    temporal_interpolation_scale: float = 1.0
    norm_eps: float = 1e-5  # block and final LayerNorms (the q/k norms use 1e-6)

    @property
    def inner_dim(self) -> int:  # D
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_t(self) -> int:
        return self.patch_size_t or 1

    @property
    def default_size(self) -> tuple[int, int]:  # (H, W) pixels, 8x the latents; 1.5: its trained size
        return (768, 1360) if self.patch_size_t else (self.sample_height * 8, self.sample_width * 8)


CONFIGS = {
    "cogvideox-2b": TransformerConfig(),
    "cogvideox-5b": TransformerConfig(
        num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True),
    "cogvideox1.5-5b": TransformerConfig(
        num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True, patch_size_t=2,
        sample_height=300, sample_width=300),
    # Small enough for a CPU forward in milliseconds; shaped like 5B (RoPE needs hd % 16 == 0).
    "tiny": TransformerConfig(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_embed_dim=32,
        time_embed_dim=32, num_layers=2, sample_height=8, sample_width=12, max_text_seq_length=16,
        use_rotary_positional_embeddings=True),
}  # fmt: skip


def get_config(name: str) -> TransformerConfig:
    if name not in CONFIGS:
        raise ValueError(f"unknown model config '{name}'; known configs: {', '.join(CONFIGS)}")
    return replace(CONFIGS[name])


# ----------------------------------------------------------------------------- positions


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim) fp32: [cos | sin] of t·10000^(-k/(dim/2)), the transformer sinusoid, cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def on_grid(shape: tuple[int, int, int], *tables: tuple[torch.Tensor, int]) -> torch.Tensor:
    """Broadcast per-axis tables (table (n, d), axis 0 = t, 1 = h, 2 = w) onto the (f, gh, gw) token grid and
    concatenate them -> (f·gh·gw, Σd), tokens in (t, h, w) row-major order like the patchified video."""
    parts = [tab.reshape([-1 if a == axis else 1 for a in range(3)] + [tab.shape[-1]]).expand(*shape, -1)
             for tab, axis in tables]  # fmt: skip
    return torch.cat(parts, dim=-1).flatten(0, 2)


def rope_positions(cfg: TransformerConfig, f: int, gh: int, gw: int, device) -> list[torch.Tensor]:
    """Per-axis RoPE positions (t, h, w) of a token grid, placed as the reference pipelines place them.

    1.5: integers. 1.0: the grid is fitted, aspect kept and centred, into the training grid (30×45 tokens),
    so 480×720 gives exactly 0..29 × 0..44 and other sizes fractional h/w positions (CogVideoXPipeline).
    """
    pos = [torch.arange(n, dtype=torch.float32, device=device) for n in (f, gh, gw)]
    if cfg.patch_size_t is None:
        base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
        tall = gh / gw > base_h / base_w  # taller than the base grid: fit the height, else the width
        rh, rw = (base_h, round(base_h / gh * gw)) if tall else (round(base_w / gw * gh), base_w)
        top, left = round((base_h - rh) / 2), round((base_w - rw) / 2)
        pos[1] = torch.linspace(top, (top + rh) * (gh - 1) / gh, gh, device=device)
        pos[2] = torch.linspace(left, (left + rw) * (gw - 1) / gw, gw, device=device)
    return pos


def rope_table(cfg: TransformerConfig, f: int, gh: int, gw: int, n_text: int, device) -> torch.Tensor:
    """(S, hd/2) complex fp32 cos θ + i·sin θ: interleaved-pair 3D RoPE over the whole [text; video] sequence.

    head_dim splits [t | h | w] = [hd/4 | 3hd/8 | 3hd/8]; axis frequencies 10000^(-2k/d_axis) give one angle θ
    per adjacent pair of dims. Text rows are the identity (θ = 0): one op covers the whole sequence.
    """
    hd, angles = cfg.attention_head_dim, []
    for pos, d in zip(rope_positions(cfg, f, gh, gw, device), (hd // 4, hd // 8 * 3, hd // 8 * 3)):
        freqs = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
        angles.append(torch.outer(pos, freqs))  # (n, d/2)
    grid = on_grid((f, gh, gw), *zip(angles, range(3)))  # (N, hd/2)
    theta = torch.cat([torch.zeros(n_text, hd // 2, device=device), grid])  # (S, hd/2)
    return torch.complex(theta.cos(), theta.sin())


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x (B, nh, S, hd), rope (S, hd/2) complex cos + i·sin: each adjacent pair (x0, x1) as x0 + i·x1 times
    the table is (x0 cos − x1 sin, x1 cos + x0 sin), in fp32; one pass instead of five real-valued ones."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, nh, S, hd/2) complex
    return torch.view_as_real(pairs * rope).flatten(-2).to(x.dtype)  # (B, nh, S, hd)


def sincos_positions(cfg: TransformerConfig, f: int, gh: int, gw: int, device) -> torch.Tensor:
    """(N, D) 2B's 3D sin-cos positions [t (D/4) | w (3D/8) | h (3D/8)] (w before h, as in the reference).

    Each block is [sin | cos] of p·10000^(-k/(d/2)) in float64, p = index / interpolation scale."""

    def sincos(n: int, scale: float, d: int) -> torch.Tensor:  # (n, d)
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64, device=device) / (d / 2))
        angles = torch.outer(torch.arange(n, dtype=torch.float64, device=device) / scale, omega)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    d, s = cfg.inner_dim, cfg.spatial_interpolation_scale
    t = sincos(f, cfg.temporal_interpolation_scale, d // 4)
    return on_grid((f, gh, gw), (t, 0), (sincos(gw, s, d // 8 * 3), 2), (sincos(gh, s, d // 8 * 3), 1))


# ----------------------------------------------------------------------------- blocks


@dataclass
class Modulation:
    """One stream's AdaLN parameters, each (B, 1, D): x -> LN(x)·(1 + scale) + shift, sub-layer out · gate."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor

    def __call__(self, normed: torch.Tensor) -> torch.Tensor:
        return normed * (1 + self.scale) + self.shift


class ExpertAdaLN(nn.Module):
    """CogVideoX's expert AdaLN: one LayerNorm, separate (shift, scale, gate) for video and text."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.mod = nn.Linear(cfg.time_embed_dim, 6 * cfg.inner_dim)
        self.norm = nn.LayerNorm(cfg.inner_dim, eps=cfg.norm_eps)

    def forward(self, temb: torch.Tensor) -> tuple[Modulation, Modulation]:
        # W·silu(temb)ᵀ, not F.linear: with B rows, CPU BLAS repacks all of W first, ~3.5× slower when cold
        mod = torch.addmm(self.mod.bias[:, None], self.mod.weight, F.silu(temb).T)  # (6D, B)
        chunks = mod.T.contiguous()[:, None].chunk(6, dim=-1)  # 6 × (B, 1, D); strided, ops run 5× slower
        return Modulation(*chunks[:3]), Modulation(*chunks[3:])  # video, text


class Attention(nn.Module):
    """Joint self-attention over [text; video], per-head q/k LayerNorm (eps 1e-6), then RoPE.

    One fused q/k/v projection (D -> 3D): the checkpoint's to_q/to_k/to_v are concatenated at load."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
        self.qkv = Linear(cfg.inner_dim, 3 * cfg.inner_dim)
        self.norm_q, self.norm_k = nn.LayerNorm(hd, eps=1e-6), nn.LayerNorm(hd, eps=1e-6)
        self.proj = Linear(cfg.inner_dim, cfg.inner_dim)

    def forward(self, h: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(h), "b s (three nh hd) -> three b nh s hd", three=3, nh=self.heads)
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:  # 5B / 1.5: rotate video tokens; text rows of the table are the identity
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, S, hd), no mask: pad tokens attend too
        return self.proj(rearrange(out, "b nh s hd -> b s (nh hd)"))


class Block(nn.Module):
    """AdaLN -> joint attention -> gated residual; AdaLN -> FFN (4D, tanh-GELU) -> gated residual.

    `branch(kind, h)`, if given, returns a term added to the sub-layer output before the gate, from the
    sub-layer's normalised, modulated [text; video] input h: the hook DualReal's adapters use."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm1 = ExpertAdaLN(cfg)
        self.attn = Attention(cfg)
        self.norm2 = ExpertAdaLN(cfg)
        self.fc1 = Linear(cfg.inner_dim, 4 * cfg.inner_dim)
        self.fc2 = Linear(4 * cfg.inner_dim, cfg.inner_dim)

    def forward(self, x, e, temb, rope, branch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) video, e (B, L, D) text, temb (B, E) -> updated (x, e)."""
        n_text = e.shape[1]
        vid, txt = self.norm1(temb)
        h = torch.cat([txt(self.norm1.norm(e)), vid(self.norm1.norm(x))], dim=1)  # (B, S, D), text first
        out = self.attn(h, rope)
        if branch is not None:
            out = out + branch("attn", h)
        x, e = x + vid.gate * out[:, n_text:], e + txt.gate * out[:, :n_text]  # gated residuals

        vid, txt = self.norm2(temb)
        h = torch.cat([txt(self.norm2.norm(e)), vid(self.norm2.norm(x))], dim=1)  # (B, S, D)
        out = self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
        if branch is not None:
            out = out + branch("ff", h)
        x, e = x + vid.gate * out[:, n_text:], e + txt.gate * out[:, :n_text]  # gated residuals
        return x, e


# ----------------------------------------------------------------------------- model


class CogVideoXTransformer(nn.Module):
    """`model(latents, text, timestep, cond=None) -> velocity`, the v-prediction of CogVideoX.

    Extension point: `model.ext` is None (the base model, bitwise) or an nn.Module with
      ext.begin(tokens (B, S, D), temb (B, E), cond) -> ctx   once per forward, on the block-0 input
      ext.hook(i, ctx) -> branch(kind, h (B, S, D)) -> delta   block i's, kind in ("attn", "ff")
    DualReal's adapters and StageBlender controller (adapters.py) plug in here.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config, self.name = cfg, "random"
        d, patch_dim = cfg.inner_dim, cfg.in_channels * cfg.patch_t * cfg.patch_size**2
        self.patch_embed = Linear(patch_dim, d)  # a Conv2d(k=p, s=p) written as a Linear on patches
        self.text_proj = Linear(cfg.text_embed_dim, d)
        self.time_fc1 = nn.Linear(d, cfg.time_embed_dim)  # the timestep sinusoid is D wide, not E
        self.time_fc2 = nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm_final = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.norm_out_mod = nn.Linear(cfg.time_embed_dim, 2 * d)  # final AdaLN: (shift, scale), no gate
        self.norm_out = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.proj_out = Linear(d, cfg.out_channels * cfg.patch_t * cfg.patch_size**2)
        self.ext: nn.Module | None = None
        self.grad_checkpointing = False

    def forward(self, latents, text, timestep, cond=None) -> torch.Tensor:
        """latents (B, F, C, H, W), text (B, L, text_dim), timestep (B,) -> velocity (B, F, C, H, W)."""
        cfg, p, pt = self.config, self.config.patch_size, self.config.patch_t
        b, f, c, hh, ww = self._check(latents, text, timestep)
        gf, gh, gw = f // pt, hh // p, ww // p  # token grid

        # Time: sinusoid (fp32) -> MLP -> temb (B, E), shared by every AdaLN.
        t = timestep_sinusoid(timestep.reshape(-1).expand(b), cfg.inner_dim)  # (B, D)
        temb = self.time_fc2(F.silu(self.time_fc1(t.to(self.time_fc1.weight.dtype))))

        # Patchify: features ordered (c, pt, ph, pw) like the checkpoint's conv / linear weight.
        patches = rearrange(latents, "b (f pt) c (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=p, pw=p)
        x = self.patch_embed(patches)  # (B, N, D)
        e = self.text_proj(text)  # (B, L, D)
        if cfg.use_rotary_positional_embeddings:  # 5B, 1.5: rotate q, k in every block
            rope = rope_table(cfg, gf, gh, gw, e.shape[1], x.device)  # (S, hd/2) complex
        else:  # 2B: add absolute positions to the video tokens once
            x, rope = x + sincos_positions(cfg, gf, gh, gw, latents.device).to(x.dtype), None

        ctx = self.ext.begin(torch.cat([e, x], dim=1), temb, cond) if self.ext is not None else None
        for i, block in enumerate(self.blocks):
            branch = self.ext.hook(i, ctx) if self.ext is not None else None  # built outside the block
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, e = grad_checkpoint(block, x, e, temb, rope, branch, use_reentrant=False)
            else:
                x, e = block(x, e, temb, rope, branch)

        x = self.norm_final(x)
        shift, scale = self.norm_out_mod(F.silu(temb))[:, None].chunk(2, dim=-1)  # shift first
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # (B, N, C·pt·p·p)
        return rearrange(
            x, "b (f h w) (c pt ph pw) -> b (f pt) c (h ph) (w pw)", f=gf, h=gh, pt=pt, ph=p, pw=p
        )

    def _check(self, latents, text, timestep) -> torch.Size:
        c, p, pt = self.config.in_channels, self.config.patch_size, self.config.patch_t
        shape = latents.shape
        if latents.dim() != 5 or shape[2] != c or shape[1] % pt or shape[3] % p or shape[4] % p:
            raise ValueError(f"latents must be (B, F, {c}, H, W) with F divisible by {pt} and H, W divisible "
                             f"by {p}; got {tuple(shape)}")  # fmt: skip
        if text.dim() != 3 or text.shape[0] != shape[0] or text.shape[2] != (d := self.config.text_embed_dim):
            raise ValueError(f"text must be ({shape[0]}, L, {d}), got {tuple(text.shape)}")
        if timestep.numel() not in (1, shape[0]):
            raise ValueError(f"timestep must be a scalar or ({shape[0]},), got {tuple(timestep.shape)}")
        return shape


# ----------------------------------------------------------------------------- loading

# Ours -> the diffusers module (.weight, .bias follow; {} = block index; a list is concatenated on dim 0).
KEYS = {
    "patch_embed": "patch_embed.proj",  # 1.0: a Conv2d weight (D, C, p, p), flattened to (D, C·p·p)
    "text_proj": "patch_embed.text_proj",
    "time_fc1": "time_embedding.linear_1",
    "time_fc2": "time_embedding.linear_2",
    "blocks.{}.norm1.mod": "transformer_blocks.{}.norm1.linear",
    "blocks.{}.norm1.norm": "transformer_blocks.{}.norm1.norm",
    "blocks.{}.attn.qkv": ["transformer_blocks.{}.attn1.to_" + c for c in "qkv"],  # to_q, to_k, to_v
    "blocks.{}.attn.norm_q": "transformer_blocks.{}.attn1.norm_q",
    "blocks.{}.attn.norm_k": "transformer_blocks.{}.attn1.norm_k",
    "blocks.{}.attn.proj": "transformer_blocks.{}.attn1.to_out.0",
    "blocks.{}.norm2.mod": "transformer_blocks.{}.norm2.linear",
    "blocks.{}.norm2.norm": "transformer_blocks.{}.norm2.norm",
    "blocks.{}.fc1": "transformer_blocks.{}.ff.net.0.proj",
    "blocks.{}.fc2": "transformer_blocks.{}.ff.net.2",
    "norm_final": "norm_final",
    "norm_out_mod": "norm_out.linear",
    "norm_out": "norm_out.norm",
    "proj_out": "proj_out",
}  # fmt: skip


def checkpoint_keys(cfg: TransformerConfig) -> dict[str, list[str]]:
    """Every parameter name of ours -> the checkpoint keys that fill it, for all blocks of `cfg`."""
    table = {}
    for ours, theirs in KEYS.items():
        theirs = theirs if isinstance(theirs, list) else [theirs]
        for i in range(cfg.num_layers) if "{}" in ours else [0]:
            for leaf in ("weight", "bias"):
                table[f"{ours.format(i)}.{leaf}"] = [f"{t.format(i)}.{leaf}" for t in theirs]
    return table


def convert_checkpoint(ckpt: dict[str, torch.Tensor], cfg: TransformerConfig, source="checkpoint") -> dict:
    """diffusers tensors -> our state dict through KEYS. Unused checkpoint keys are an error."""
    table = checkpoint_keys(cfg)
    used = {k for keys in table.values() for k in keys}
    unused, state = sorted(set(ckpt) - used), {}
    if unused:
        raise ValueError(f"{source} has keys this model does not use: {', '.join(unused[:6])}")
    for ours, theirs in table.items():
        if all(k in ckpt for k in theirs):  # a missing one is reported by checkpoint.assign_strict
            state[ours] = torch.cat([ckpt[k] for k in theirs]) if len(theirs) > 1 else ckpt[theirs[0]]
    if "patch_embed.weight" in state:  # 1.0 stores a Conv2d weight (D, C, p, p): flatten to (D, C·p·p)
        state["patch_embed.weight"] = state["patch_embed.weight"].flatten(1)
    return state


def config_from_json(raw: dict, source: str) -> TransformerConfig:
    """A diffusers transformer config.json -> TransformerConfig. Missing fields keep the defaults."""
    names = {f.name for f in fields(TransformerConfig)}
    cfg = TransformerConfig(**{k: v for k, v in raw.items() if k in names})
    fixed = {"activation_fn": "gelu-approximate", "timestep_activation_fn": "silu", "flip_sin_to_cos": True,
             "freq_shift": 0, "attention_bias": True, "norm_elementwise_affine": True}  # fmt: skip
    for key, want in fixed.items():
        if raw.get(key, want) != want:
            raise ValueError(f"{source}: {key}={raw[key]!r} is not supported (we implement {want!r})")
    if raw.get("use_learned_positional_embeddings") or raw.get("ofs_embed_dim"):  # the I2V variants
        raise ValueError(f"{source}: image-to-video checkpoints are not supported; use a text-to-video one")
    return cfg


def load_transformer(path: str, dtype: torch.dtype = torch.float32, device="cpu") -> CogVideoXTransformer:
    """Load "tiny" (seeded random), or diffusers weights from a root folder, its transformer/, or a hub id.

    Built on the meta device; weights are memory-mapped, converted once and assigned (checkpoint.py)."""
    if path == "tiny":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CogVideoXTransformer(get_config("tiny"))
        model.name = "tiny"
        return model.to(device=device, dtype=dtype)
    folder = checkpoint.find_component(path, "transformer")
    cfg = config_from_json(checkpoint.read_config(folder), folder)
    with torch.device("meta"):
        model = CogVideoXTransformer(cfg)
    state = convert_checkpoint(checkpoint.read_safetensors(folder), cfg, folder)
    checkpoint.assign_strict(model, state, folder, device, dtype)
    model.name = path
    return model
