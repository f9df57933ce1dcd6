"""The CogVideoX 3D causal VAE: video (B, 3, T, H, W) <-> latents (B, F, C, H/8, W/8), T = 4(F - 1) + 1.

CogVideoX (arXiv:2408.06072, Sec. 2.1) compresses video 8x in space and 4x in time with 3D convolutions that
are causal in time (frame t sees frames <= t), so frame 0 is encoded like an image and each later group of 4
frames becomes one latent frame. The encoder predicts a Gaussian posterior N(mean, exp(logvar)); the
transformer trains on a sample of it times `scaling_factor` (0.7 for 5B and 1.5, 1.15258426 for 2B).

Long clips run in frame chunks that share a *conv cache* (each causal conv's last input frames). GroupNorm
statistics are per chunk, so chunking changes the numbers: by default we chunk like diffusers (encode 9, 8,
8, ... frames; decode 3, 2, 2, ... latents); `vae.chunked = False` runs whole clips, as SAT's encoder did.
`vae.tiling = Tiling()` runs overlapping spatial tiles and cross-fades them (diffusers' `enable_tiling`).

Reference: diffusers `AutoencoderKLCogVideoX` (0.42.1); tests/test_vae.py gives both the same random weights
and compares posterior, samples, decode and tiled decode / encode (fp32, bitwise equal).

Shape legend: B batch, C channels, T video frames, F latent frames, H W height and width (h w = H/8 W/8).
Inside the networks tensors are (B, C, T, H, W); latents in and out are (B, F, C, h, w), as in model.py.
"""

from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import checkpoint

ENCODE_FRAMES = 8  # diffusers encodes 8 frames per chunk; the remainder (the first frame) joins chunk 0
DECODE_LATENTS = 2  # and decodes 2 latent frames per chunk, the remainder again in chunk 0
CONV_MAX_NUMEL = 2**30  # longer conv inputs are split along time (whole clips at 480x720; 32-bit indexing)


@dataclass
class VAEConfig:
    """Fields and defaults of diffusers' `AutoencoderKLCogVideoX` config.json (missing fields take these)."""

    in_channels: int = 3  # RGB in
    out_channels: int = 3  # RGB out
    latent_channels: int = 16  # C of the latents the transformer sees
    # encoder block widths; the decoder uses them reversed
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    layers_per_block: int = 3  # resnets per encoder block (decoder blocks hold one more)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every width
    norm_eps: float = 1e-6  # GroupNorm epsilon, everywhere in the VAE
    temporal_compression_ratio: int = 4  # video frames per latent frame after the first
    scaling_factor: float = 1.15258426  # latents = posterior sample * this (diffusers' default = 2B's value)
    invert_scale_latents: bool = False  # 1.5 only; changes I2V image latents, which this repo does not use

    @property
    def spatial_ratio(self) -> int:  # every block but the last halves H and W: 2^(4 - 1) = 8
        return 2 ** (len(self.block_out_channels) - 1)


CONFIGS = {  # the real VAEs differ only in scaling_factor (and 1.5's invert flag)
    "cogvideox-2b": VAEConfig(scaling_factor=1.15258426),
    "cogvideox-5b": VAEConfig(scaling_factor=0.7),
    "cogvideox1.5-5b": VAEConfig(scaling_factor=0.7, invert_scale_latents=True),
    # 4 blocks keep the real 8x / 4x compression; everything else is shrunk to run in milliseconds on CPU
    "tiny": VAEConfig(
        latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4
    ),
}


@dataclass
class Tiling:
    """Spatial tiling (diffusers' defaults): bounds memory at high resolution, changes numbers near seams."""

    sample_height: int = 240  # tile size in pixels; the latent tile is this / 8
    sample_width: int = 360
    overlap_height: float = 1 / 6  # fraction of a tile shared with the neighbour below
    overlap_width: float = 1 / 5  # ... and with the neighbour to the right


class CausalConv3d(nn.Module):
    """Conv3d, causal in time, "same" size in space (zero padding inside the conv). Time is left-padded with
    kt - 1 frames: copies of frame 0 at a clip's start, else the previous chunk's last frames from `cache`."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3):
        super().__init__()
        self.pad = kernel - 1
        self.conv = nn.Conv3d(c_in, c_out, kernel, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        if self.pad == 0:  # 1x1x1 convs see one frame: nothing to pad or remember
            return self.conv(x)
        first = x[:, :, :1].expand(-1, -1, self.pad, -1, -1)  # frame 0 replicated (a view, no copy)
        past = first if cache is None else cache.get(self, first)
        x = torch.cat([past, x], dim=2)  # (B, C, kt - 1 + T, H, W)
        if cache is not None:
            cache[self] = x[:, :, -self.pad :].clone()  # clone: do not keep the whole chunk alive
        t_out = x.shape[2] - self.pad
        pieces = min(x.numel() // CONV_MAX_NUMEL + 1, t_out)  # at least one output frame each
        if pieces == 1:
            return self.conv(x)
        edges = [t_out * i // pieces for i in range(pieces + 1)]  # exact: frames [a, b) read [a, b + kt - 1)
        return torch.cat([self.conv(x[:, :, a : b + self.pad]) for a, b in zip(edges, edges[1:])], dim=2)


class SpatialNorm(nn.Module):
    """Decoder norm conditioned on the latent zq (MoVQ's spatial norm): GN(f) * conv_y(zq) + conv_b(zq).
    zq is resized to f's (T, H, W) by nearest neighbour. Causal layout: when f has an odd frame count > 1,
    latent frame 0 maps to video frame 0 alone, so the first frame and the rest are resized separately."""

    def __init__(self, channels: int, zq_channels: int, cfg: VAEConfig):
        super().__init__()
        self.norm_layer = nn.GroupNorm(cfg.norm_num_groups, channels, eps=cfg.norm_eps)
        self.conv_y = CausalConv3d(zq_channels, channels, kernel=1)
        self.conv_b = CausalConv3d(zq_channels, channels, kernel=1)

    def forward(self, f: Tensor, zq: Tensor) -> Tensor:
        t, h, w = f.shape[-3:]
        if t > 1 and t % 2 == 1:
            first = F.interpolate(zq[:, :, :1], size=(1, h, w))
            zq = torch.cat([first, F.interpolate(zq[:, :, 1:], size=(t - 1, h, w))], dim=2)
        else:
            zq = F.interpolate(zq, size=(t, h, w))
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResBlock(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a skip (a 1x1x1 conv when the width changes). The encoder
    normalizes with GroupNorm, the decoder (zq_channels > 0) with SpatialNorm. Dropout is 0, so left out."""

    def __init__(self, c_in: int, c_out: int, cfg: VAEConfig, zq_channels: int = 0):
        super().__init__()
        norm = partial(nn.GroupNorm, cfg.norm_num_groups, eps=cfg.norm_eps)
        if zq_channels:
            norm = partial(SpatialNorm, zq_channels=zq_channels, cfg=cfg)
        self.norm1, self.conv1 = norm(c_in), CausalConv3d(c_in, c_out)
        self.norm2, self.conv2 = norm(c_out), CausalConv3d(c_out, c_out)
        self.conv_shortcut = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor, cache: dict | None = None, zq: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x) if zq is None else self.norm1(x, zq)), cache)
        h = self.conv2(F.silu(self.norm2(h) if zq is None else self.norm2(h, zq)), cache)
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class Resample(nn.Module):
    """Halve (down) or double (up) H and W with a per-frame 3x3 Conv2d; with `compress_time`, T as well.
    Time keeps the causal layout 1 + 4k: an odd count keeps frame 0 single (down 9 -> 5, up 5 -> 9), an even
    count pairs every frame (8 <-> 4), one frame stays one. Down averages frame pairs, zero-pads right and
    bottom (so H -> H / 2 exactly) and convolves with stride 2; up repeats pixels and frames (nearest)."""

    def __init__(self, channels: int, compress_time: bool, up: bool):
        super().__init__()
        self.compress_time, self.up = compress_time, up
        self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=(1, 2, 2))  # nearest is separable: space here, time below
        if self.compress_time and x.shape[2] > 1:
            keep = x.shape[2] % 2
            rest = x[:, :, keep:]  # up: repeat each frame; down: average pairs
            rest = rest.repeat_interleave(2, 2) if self.up else rest.unflatten(2, (-1, 2)).mean(3)
            x = torch.cat([x[:, :, :keep], rest], dim=2)
        if not self.up:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, T, H + 1, W + 1)
        b = x.shape[0]
        x = self.conv(rearrange(x, "b c t h w -> (b t) c h w"))  # per frame
        return rearrange(x, "(b t) c h w -> b c t h w", b=b)


class Encoder(nn.Module):
    """conv_in, 4 down blocks (resnets, then a Resample but in the last), 2 mid resnets, GN, SiLU, conv_out.
    Output (B, 2C, F, H/8, W/8): the posterior mean and log-variance stacked along channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0])
        self.down_blocks, c_in = nn.ModuleList(), widths[0]
        for i, c in enumerate(widths):  # time is halved in the first log2(4) = 2 blocks
            resnets = [ResBlock(c_in if j == 0 else c, c, cfg) for j in range(cfg.layers_per_block)]
            down = [Resample(c, 2**i < cfg.temporal_compression_ratio, up=False)] if i < n - 1 else []
            block = {"resnets": nn.ModuleList(resnets), "downsamplers": nn.ModuleList(down)}
            self.down_blocks.append(nn.ModuleDict(block))  # names as in the checkpoint
            c_in = c
        mid = [ResBlock(c_in, c_in, cfg) for _ in range(2)]
        self.mid_block = nn.ModuleDict({"resnets": nn.ModuleList(mid)})
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, c_in, eps=cfg.norm_eps)
        self.conv_out = CausalConv3d(c_in, 2 * cfg.latent_channels)

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        h = self.conv_in(x, cache)  # (B, 128, T, H, W)
        for block in self.down_blocks:
            for resnet in block["resnets"]:
                h = resnet(h, cache)
            for down in block["downsamplers"]:
                h = down(h)
        for resnet in self.mid_block["resnets"]:
            h = resnet(h, cache)  # (B, 512, F, H/8, W/8)
        return self.conv_out(F.silu(self.norm_out(h)), cache)  # (B, 2C, F, H/8, W/8)


class Decoder(nn.Module):
    """conv_in, 2 mid resnets, 4 up blocks (one resnet more than down blocks, then a Resample but in the
    last), norm, SiLU, conv_out. Every norm is a SpatialNorm on the decoder's input z (B, C, F, h, w)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths, n, zc = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.latent_channels
        self.conv_in = CausalConv3d(zc, widths[0])
        mid = [ResBlock(widths[0], widths[0], cfg, zc) for _ in range(2)]
        self.mid_block = nn.ModuleDict({"resnets": nn.ModuleList(mid)})
        self.up_blocks, c_in = nn.ModuleList(), widths[0]
        for i, c in enumerate(widths):
            resnets = [ResBlock(c_in if j == 0 else c, c, cfg, zc) for j in range(cfg.layers_per_block + 1)]
            up = [Resample(c, 2**i < cfg.temporal_compression_ratio, up=True)] if i < n - 1 else []
            block = {"resnets": nn.ModuleList(resnets), "upsamplers": nn.ModuleList(up)}
            self.up_blocks.append(nn.ModuleDict(block))
            c_in = c
        self.norm_out = SpatialNorm(c_in, zc, cfg)
        self.conv_out = CausalConv3d(c_in, cfg.out_channels)

    def forward(self, z: Tensor, cache: dict | None = None) -> Tensor:
        h = self.conv_in(z, cache)  # (B, 512, F, h, w)
        for resnet in self.mid_block["resnets"]:
            h = resnet(h, cache, z)
        for block in self.up_blocks:
            for resnet in block["resnets"]:
                h = resnet(h, cache, z)
            for up in block["upsamplers"]:
                h = up(h)
        return self.conv_out(F.silu(self.norm_out(h, z)), cache)  # (B, 3, T, H, W)


def _blend(prev: Tensor, tile: Tensor, extent: int, dim: int) -> None:
    """Cross-fade, in place, the first `extent` rows (dim 3) or columns (dim 4) of tile from prev's last."""
    extent = min(prev.shape[dim], tile.shape[dim], extent)
    # tile's weight y / extent and prev's 1 - y / extent, each computed in float64, then used in fp32 (as
    # diffusers' Python floats are); the two products round to the tile's dtype before they are summed
    w = torch.arange(extent, dtype=torch.float64, device=tile.device) / extent  # (extent,)
    v, w = (1 - w).float(), w.float()
    if dim == 3:
        v, w = v[:, None], w[:, None]  # (extent, 1): rows
    head, tail = tile.narrow(dim, 0, extent), prev.narrow(dim, prev.shape[dim] - extent, extent)
    head.copy_((tail * v).to(tile.dtype) + (head * w).to(tile.dtype))


def _tiled(fn, x: Tensor, tile_in: tuple[int, int], tile_out: tuple[int, int], tiling: Tiling) -> Tensor:
    """fn over overlapping (H, W) tiles of x, one every tile_in * (1 - overlap). Of each output tile the
    first tile_out * overlap rows/columns fade in from the tile above / left; up to the next tile is kept."""
    overlap = (tiling.overlap_height, tiling.overlap_width)
    step = [int(t * (1 - o)) for t, o in zip(tile_in, overlap)]
    blend = [int(t * o) for t, o in zip(tile_out, overlap)]
    keep = [t - b for t, b in zip(tile_out, blend)]
    rows: list[list[Tensor]] = []
    for i in range(0, x.shape[3], step[0]):
        row: list[Tensor] = []
        for j in range(0, x.shape[4], step[1]):
            tile = fn(x[:, :, :, i : i + tile_in[0], j : j + tile_in[1]])
            if rows:
                _blend(rows[-1][len(row)], tile, blend[0], dim=3)
            if row:
                _blend(row[-1], tile, blend[1], dim=4)
            row.append(tile)
        rows.append(row)
    return torch.cat([torch.cat([t[:, :, :, : keep[0], : keep[1]] for t in row], 4) for row in rows], 3)


def sample_posterior(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mean + exp(logvar / 2) * eps, all (B, F, C, H, W), unscaled. eps is drawn on the generator's device
    in (B, C, F, H, W) order: a CPU seed gives one sample on any machine, the same as diffusers' sample()."""
    device = generator.device if generator is not None else mean.device
    eps = torch.randn(mean.transpose(1, 2).shape, generator=generator, device=device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps.to(mean.device).transpose(1, 2)


class CogVideoXVAE(nn.Module):
    """The VAE; inference API (no autograd): `encode`, `encode_posterior`, `decode`. Switches: `chunked`
    (True: diffusers' frame chunks; False: whole clips, as SAT encoded the DiT's data), `tiling`."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.chunked = True
        self.tiling: Tiling | None = None

    def _run(self, x: Tensor, decode: bool) -> Tensor:
        """Encoder or decoder over x (B, C, T, H, W): per spatial tile when tiling is on and x is larger than
        one tile; per frame chunk, with one conv cache per tile, when chunked."""
        net, chunk = (self.decoder, DECODE_LATENTS) if decode else (self.encoder, ENCODE_FRAMES)

        def clip(v: Tensor) -> Tensor:
            if not self.chunked:
                return net(v)
            n, cache = v.shape[2], {}
            edges = [0, *range(n - chunk * (max(n // chunk, 1) - 1), n + 1, chunk)]  # 49 frames: 9, 8, 8, ...
            return torch.cat([net(v[:, :, a:b], cache) for a, b in zip(edges, edges[1:])], dim=2)

        t, s = self.tiling, self.config.spatial_ratio
        if t is None:
            return clip(x)
        tiles = [(t.sample_height, t.sample_width), (t.sample_height // s, t.sample_width // s)]
        tile_in, tile_out = tiles[::-1] if decode else tiles  # (H, W) in pixels and in latents
        if x.shape[3] <= tile_in[0] and x.shape[4] <= tile_in[1]:
            return clip(x)
        return _tiled(clip, x, tile_in, tile_out, t)

    @torch.no_grad()
    def encode_posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video (B, 3, T, H, W) -> posterior mean, logvar (clamped to [-30, 20]), each (B, F, C, h, w)."""
        x = self._check(video, "video", "(B, 3, T, H, W)", 1, self.config.in_channels)
        (t, h, w), r, s = x.shape[2:], self.config.temporal_compression_ratio, self.config.spatial_ratio
        if (t - 1) % r:
            raise ValueError(f"video has {t} frames; the VAE needs {r}k+1 frames (1, 5, 9, ..., 49): trim it")
        if h % s or w % s:
            raise ValueError(f"video size {h}x{w} is not divisible by {s}; resize or crop it")
        moments = self._run(x, decode=False)  # (B, 2C, F, h, w)
        mean, logvar = rearrange(moments, "b (two c) f h w -> two b f c h w", two=2)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def encode(self, video: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """video (B, 3, T, H, W) in [-1, 1], T = 4k + 1 -> latents (B, F, C, H/8, W/8) * scaling_factor.
        sample=True draws from the posterior (as CogVideoX training does); False returns its mean (mode)."""
        mean, logvar = self.encode_posterior(video)
        z = sample_posterior(mean, logvar, generator) if sample else mean
        return z * self.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents (B, F, C, h, w), scaled -> video (B, 3, 4(F - 1) + 1, 8h, 8w), nominally in [-1, 1].
        Not clamped (nor is diffusers'): clamp when converting to pixels."""
        z = self._check(latents, "latents", "(B, F, C, H, W)", 2, self.config.latent_channels)
        return self._run(rearrange(z / self.config.scaling_factor, "b f c h w -> b c f h w"), decode=True)

    def _check(self, x: Tensor, name: str, layout: str, dim: int, channels: int) -> Tensor:
        """Shape, dtype and channel checks with one-line errors; returns x on the VAE's device and dtype."""
        if not isinstance(x, Tensor) or x.ndim != 5:
            raise ValueError(f"{name} must be a {layout} tensor, got shape {tuple(getattr(x, 'shape', ()))}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {x.dtype} (video: frames / 127.5 - 1)")
        if x.shape[dim] != channels:
            raise ValueError(f"{name} has {x.shape[dim]} channels (dim {dim}), expected {channels}: {layout}")
        weight = self.decoder.conv_out.conv.weight
        return x.to(weight.device, weight.dtype)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a CogVideoX VAE: "tiny" (seeded random), a checkpoint root holding vae/, the vae/ folder, or a hub
    id. Strict, memory-mapped loading through checkpoint.py. Returned frozen, in eval mode."""
    if str(path) == "tiny":
        with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
            torch.manual_seed(0)
            vae = CogVideoXVAE(replace(CONFIGS["tiny"]))  # a copy: the registry stays untouched
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    folder = checkpoint.find_component(str(path), "vae")
    raw = checkpoint.read_config(folder)  # missing fields keep VAEConfig's defaults
    known = {f.name for f in fields(VAEConfig)}
    config = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in known})
    with torch.device("meta"):  # no memory, no init: every tensor comes from the checkpoint
        vae = CogVideoXVAE(config)
    checkpoint.assign_strict(vae, checkpoint.read_safetensors(folder), folder, device, dtype)
    return vae.eval().requires_grad_(False)
