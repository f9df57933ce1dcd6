"""Dual-aware adapters: identity and motion bottleneck adapters in every CogVideoX block, blended by
the StageBlender controller, plus the gradient mask of DualReal's joint training and save/load.

DualReal (arXiv 2505.02192) §3.2, eq. (1)–(6); official code wenc-k/DualReal model/dit.py:36-311,
train/train_adapter.py:1720-1731. How the paper maps to this file:

    eq. (1)  f_id = W_up GELU(W_down x)                      Bottleneck(x)            (identity: no W_cond)
    eq. (2)  f_mo = W'_up GELU(W'_down (x + W_cond e))        Bottleneck(x, e)         (motion: with W_cond)
    eq. (3)  out  = sublayer(x) + s·[ω_g f_mo + (1 − ω_g) f_id]  DualAdapters.branch  (ω from controller.py)
    eq. (4)  train one family per step, the other frozen      mask_gradients           (grad = None)
    eq. (5)  the diffusion loss on the active phase's data    train.py                 (velocity MSE)
    eq. (6)  + λ‖θ_active‖²                                    l2_penalty               (λ = 0 by default)

Placement follows the official code, not the paper's figure: in each block there are four adapters
(identity and motion, on the attention and on the feed-forward sub-layer). Each reads the same
normalized, AdaLN-modulated input h as its sub-layer, over text and video tokens alike, and its delta
is added to the sub-layer output before the AdaLN gate. That hook is model.py's extension point
(`model.ext`, `ext.begin`, `ext.hook`); this file implements it.

Our one deliberate departure from the official code, whose adapter returns x + Δ (adding 0.2·x to every
sub-layer at step 0): we add only Δ, so at init the adapted model is exactly the base model (tested).

Shapes: B batch, T = L + N tokens ([text; video], text first), D model width, d bottleneck width,
E image-embedding width (e), n controller groups.
"""

import functools
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from controller import ControllerConfig, StageBlender, group_of

FAMILIES = ("identity", "motion", "controller")  # parameter-name prefixes in DualAdapters
KINDS = ("attn", "ff")  # the two sub-layers of a block that carry adapters
FILE_FORMAT = "dualreal-adapters/1"  # written into the safetensors metadata
BASE_DIMS = ("num_layers", "inner_dim", "time_embed_dim")  # what a file must match to load into a model


@dataclass
class AdapterConfig:
    width: int = 64  # bottleneck d of every adapter (official 64)
    cond_dim: int = 1024  # E: the projected CLIP ViT-H/14 image embedding e fed to W_cond (official 1024)
    scale: float = 0.2  # s: total adapter budget per sub-layer (official 0.1 identity + 0.1 motion)
    groups: int = 7  # n: controller groups of contiguous blocks (official 7)
    controller: bool = True  # False = --no-controller: fixed ω = 0.5, no controller module


@dataclass
class Blend:
    """What begin() hands to every hook() of one forward pass."""

    omega: torch.Tensor  # (B, n) fp32: motion share per group
    e: torch.Tensor | None  # (B or 1, E) fp32 image embedding, None in the identity phase


class Bottleneck(nn.Module):
    """Δ(x) = W_up · GELU(W_down · x), eq. (1); with cond_dim, Δ(x, e) = W_up · GELU(W_down · (x + W_cond e)),
    eq. (2). Exact (erf) GELU, biases everywhere, W_up zero-init so that Δ = 0 at the start."""

    def __init__(self, dim: int, width: int, cond_dim: int | None = None):
        super().__init__()
        self.down = nn.Linear(dim, width)  # W_down: default PyTorch init, as official
        self.up = nn.Linear(width, dim)  # W_up: zero-init below
        self.cond = nn.Linear(cond_dim, dim) if cond_dim else None  # W_cond: motion adapters only
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, e: torch.Tensor | None = None) -> torch.Tensor:
        z = self.down(x)  # (B, T, D) -> (B, T, d)
        if self.cond is not None and e is not None:  # W_down(x + W_cond e) = W_down x + W_down W_cond e:
            z = z + F.linear(self.cond(e), self.down.weight)[:, None]  # backward keeps one x for 2 adapters
        return self.up(F.gelu(z))  # (B, T, d) -> (B, T, D)


class DualAdapters(nn.Module):
    """All adapters of a model and its controller; implements model.py's extension protocol.

    Parameters are named identity.{i}.{attn|ff}.*, motion.{i}.{attn|ff}.* and controller.*, so the
    family of a parameter is the first part of its name. They stay fp32 whatever the base dtype.
    """

    def __init__(self, num_layers: int, dim: int, time_dim: int, cfg: AdapterConfig, base_name: str = ""):
        super().__init__()
        self.cfg = cfg
        # The base model's essentials, saved with the weights; load_adapters checks BASE_DIMS.
        self.base = dict(name=base_name, num_layers=num_layers, inner_dim=dim, time_embed_dim=time_dim)
        pair = lambda cond_dim: nn.ModuleDict({k: Bottleneck(dim, cfg.width, cond_dim) for k in KINDS})
        self.identity = nn.ModuleList([pair(None) for _ in range(num_layers)])
        self.motion = nn.ModuleList([pair(cfg.cond_dim) for _ in range(num_layers)])
        ccfg = ControllerConfig(num_groups=cfg.groups)
        self.controller = StageBlender(dim, time_dim, ccfg) if cfg.controller else None
        self.groups = [group_of(i, num_layers, cfg.groups) for i in range(num_layers)]
        self.last_omega: torch.Tensor | None = None  # (B, n) of the latest forward, detached: for logs/plots
        self.fixed_omega = 0.5  # ω when there is no controller

    def begin(self, tokens: torch.Tensor, temb: torch.Tensor, cond: torch.Tensor | None) -> Blend:
        """Once per forward: run the controller (eq. 7-12) on the block-0 tokens (B, T, D) and the
        timestep embedding (B, time_dim). cond is e (B, E) in the motion phase and at inference, else None."""
        batch, dtype, e_dim = tokens.shape[0], self.identity[0]["attn"].up.weight.dtype, self.cfg.cond_dim
        if cond is not None and (cond.ndim != 2 or cond.shape[0] not in (1, batch) or cond.shape[1] != e_dim):
            raise ValueError(f"the image embedding e must be ({batch} or 1, {e_dim}), "
                             f"got {tuple(cond.shape)}")  # fmt: skip
        if self.controller is not None:
            omega = self.controller(tokens, temb)  # (B, n)
        else:  # --no-controller: a fixed share, 0.5 (--schedule isolated trains with 0, then 1)
            omega = torch.full((batch, self.cfg.groups), self.fixed_omega, dtype=dtype, device=tokens.device)
        self.last_omega = omega.detach()
        return Blend(omega=omega, e=None if cond is None else cond.to(dtype))

    def hook(self, i: int, ctx: Blend) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """Block i's branch(kind, h), its adapters and group share bound here, outside the block: a compiled
        block sees modules and tensors, never i (an int is guarded: a graph per block, eager past 8)."""
        w = ctx.omega[:, self.groups[i], None, None]  # (B, n) -> (B, 1, 1): this block's group
        return functools.partial(self.branch, self.identity[i], self.motion[i], w, ctx.e)

    def branch(self, identity: nn.ModuleDict, motion: nn.ModuleDict, w, e, kind: str, h: torch.Tensor):
        """eq. (3): the delta a block adds to its `kind` sub-layer output, before the AdaLN gate, from its
        adapters, its group's share w (B, 1, 1) and h (B, T, D) in the base dtype; fp32 inside."""
        x = h.to(identity[kind].up.weight.dtype)
        d_mo = motion[kind](x, e)  # (B, T, D), eq. (2)
        d_id = identity[kind](x)  # (B, T, D), eq. (1)
        return (self.cfg.scale * (d_id + w * (d_mo - d_id))).to(h.dtype)  # ω's gradient keeps one (B, T, D)

    def family_params(self, family: str) -> list[nn.Parameter]:
        """The parameters of one family: "identity", "motion" or "controller" (empty without controller)."""
        if family not in FAMILIES:
            raise ValueError(f"unknown adapter family {family!r}; expected one of {FAMILIES}")
        module = getattr(self, family)
        return [] if module is None else list(module.parameters())


def attach(model: nn.Module, cfg: AdapterConfig | None = None) -> DualAdapters:
    """Freeze the base model, build fresh adapters (fp32, drawn on the CPU, so a seed gives one init on any
    device; then moved to the model's device) and set model.ext.

    The base keeps its dtype and device; afterwards exactly the adapter and controller parameters
    require grad, so `[p for p in model.parameters() if p.requires_grad]` == list(ext.parameters()).
    Attach after casting the base (a later model.to(dtype) would also cast the adapters).
    """
    if getattr(model, "ext", None) is not None:
        raise ValueError("this model already has adapters attached; call adapters.detach(model) first")
    c, cfg = model.config, cfg or AdapterConfig()
    model.requires_grad_(False)  # before model.ext is set, so the adapters stay trainable
    device = next(model.parameters()).device  # the init is drawn on the CPU (meta: shapes only, no draws)
    with torch.device("meta" if device.type == "meta" else "cpu"):
        model.ext = DualAdapters(c.num_layers, c.inner_dim, c.time_embed_dim, cfg, str(model.name)).to(device)
    return model.ext


def detach(model: nn.Module) -> DualAdapters | None:
    """Remove the adapters (the model is then exactly the base model again) and return them."""
    ext, model.ext = model.ext, None
    return ext


def mask_gradients(ext: DualAdapters, phase: str, enabled: bool = True) -> None:
    """eq. (4): after backward, drop the gradients of the family that is not being trained.

    Identity phase -> motion adapters' .grad = None, and vice versa; the controller is always trained.
    A None gradient makes torch's AdamW skip the parameter entirely (no moment update, no weight decay),
    so the frozen family is bitwise unchanged. Zeroing instead (grad.zero_()) would still move it through
    momentum and weight decay: knowledge leakage. enabled=False is the --no-grad-mask ablation.
    """
    if phase not in ("identity", "motion"):
        raise ValueError(f"phase must be 'identity' or 'motion', got {phase!r}")
    if not enabled:
        return
    for p in ext.family_params("motion" if phase == "identity" else "identity"):
        p.grad = None


def l2_penalty(ext: DualAdapters, phase: str, weight: float) -> torch.Tensor:
    """eq. (6): λ‖M ⊙ θ‖², the squared L2 norm of the active phase's adapters (M masks the other family).
    The official code has no such term, so the default λ = 0 returns a zero tensor without any work."""
    if phase not in ("identity", "motion"):
        raise ValueError(f"phase must be 'identity' or 'motion', got {phase!r}")
    ps = ext.family_params(phase)
    return weight * sum(p.pow(2).sum() for p in ps) if weight else torch.zeros((), device=ps[0].device)


def count_parameters(ext: DualAdapters) -> dict[str, int]:
    """Trainable parameters per family. CogVideoX-5B defaults: identity 33,293,568, motion 297,792,768,
    controller 4,528,647 (official: 396,352 per adapter, 3,148,800 per W_cond, 4,528,647 controller)."""
    counts = {f: sum(p.numel() for p in ext.family_params(f)) for f in FAMILIES}
    counts["total"] = sum(counts.values())
    return counts


def save_adapters(ext: DualAdapters, path: str | os.PathLike, state: dict | None = None) -> None:
    """Write adapters + controller (ext.state_dict(), or `state` gathered from shards) to one .safetensors
    file (train.py writes it through data.atomic_write: whole or absent, even after a power loss).

    The header metadata (string values) holds the format tag, the AdapterConfig and the base model's
    essentials (name, num_layers, inner_dim, time_embed_dim) as JSON, so load_adapters can rebuild and check.
    """
    metadata = dict(format=FILE_FORMAT, adapter_config=json.dumps(asdict(ext.cfg)), base=json.dumps(ext.base))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in (state or ext.state_dict()).items()}
    save_file(tensors, path, metadata=metadata)


def read_metadata(path: str) -> tuple[AdapterConfig, dict]:
    """The AdapterConfig and base-model essentials stored in an adapters file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapters file {path}; pass the adapters.safetensors of a training run")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"cannot read {path} as safetensors (truncated? corrupt?): {err}") from None
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{path} is not a DualReal adapters file (no '{FILE_FORMAT}' tag in its header)")
    return AdapterConfig(**json.loads(meta["adapter_config"])), json.loads(meta["base"])


def load_adapters(model: nn.Module, path: str, cfg: AdapterConfig | None = None) -> DualAdapters:
    """Load an adapters file into `model` and return the adapters (model.ext).

    If the model already has adapters attached, their tensors are overwritten in place, so an optimizer
    holding them stays valid; otherwise adapters are attached first (freezing the base). Fails with one clear
    line when the file was trained for another model width/depth, or when `cfg` (or the attached adapters'
    config) differs from the file's.
    """
    file_cfg, base = read_metadata(path)
    b, c = base, model.config
    if [b[k] for k in BASE_DIMS] != [getattr(c, k) for k in BASE_DIMS]:
        raise ValueError(
            f"adapters in {path} were trained for {b['num_layers']} blocks of width {b['inner_dim']} (time"
            f" embedding {b['time_embed_dim']}, base {b['name']!r}), this model has {c.num_layers} blocks of"
            f" width {c.inner_dim} (time embedding {c.time_embed_dim}); load the base they were trained on"
        )
    ext = getattr(model, "ext", None)
    for want in [x for x in (cfg, None if ext is None else ext.cfg) if x is not None]:
        names = [f.name for f in fields(want) if getattr(file_cfg, f.name) != getattr(want, f.name)]
        if names:
            diff = "; ".join(f"{n}={getattr(file_cfg, n)!r} in the file, {getattr(want, n)!r} here"
                             for n in names)  # fmt: skip
            raise ValueError(f"adapter config mismatch for {path}: {diff}")
    ext = ext if ext is not None else attach(model, file_cfg)
    # strict: every key used, every parameter filled; copies into the existing fp32 parameters
    ext.load_state_dict(load_file(path, device=str(next(ext.parameters()).device)))
    return ext
