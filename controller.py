"""StageBlender: the controller that decides, per denoising step and per group of blocks, how much of
the adapter budget goes to motion and how much to identity.

DualReal (arXiv 2505.02192) §3.3, eq. (7)–(12). The paper's equations leave the axes open, so the
architecture follows the official code (wenc-k/DualReal, model/dit.py:313-371) layer for layer:

    pooled = max over tokens of the block-0 input             eq. (7)   (B, D)
    c      = W · pooled                                        eq. (8)   (B, 512)
    f      = LayerNorm(c) · (1 + scale) + shift                eq. (9)   AdaLN from the timestep embedding
    f      = MLP(f) + gate · c                                 eq. (10)  the gate scales the skip, as official
    z      = Linear(ReLU(Linear(ReLU(f))))                     eq. (11)  (B, n), last layer zero-init
    ω      = sigmoid(z)                                        eq. (12)  the motion share of each group

The official code has no softmax: each of the n groups gets its own sigmoid (the paper writes a
softmax, which is ambiguous about its axis; we follow the code). The official sigmoid gives the identity
share, scaled to the 0.2 budget (α = 0.2·sigmoid, motion 0.2 − α); ours gives the motion share ω ∈ (0, 1) and
adapters.py applies the budget s, so that ω reads directly as "the fraction of the adapter output that is
motion". With the last layer zero-initialised the two are mirror images (ω = 1 − α/0.2) and train alike.
At initialization ω = 0.5 for every group.
The per-step numbering (7)…(12) above is our reading of the order of the paper's controller equations.

Block i of L uses group i·n // L (contiguous groups; for L = 42, n = 7 that is 6 blocks per group, as
the official code). n = 1 is the paper's "w/o weight groups" ablation; n = L gives one weight per block.

Tested in tests/test_adapters.py (init value, timestep dependence after training, group mapping,
parameter count against the official 4,528,647 for CogVideoX-5B).

Shapes: B batch, T = L_text + N tokens of the block-0 input, D model width, n groups.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ControllerConfig:
    hidden_dim: int = 512  # width of the projected feature c and of the AdaLN modulation (official 512)
    mlp_dim: int = 2048  # inner width of the tanh-GELU MLP (official 2048)
    head_dim: int = 128  # width of the small head before the n outputs (official 128)
    num_groups: int = 7  # n: one motion share per group of contiguous blocks (official 7)


def group_of(block_index: int, num_layers: int, num_groups: int) -> int:
    """The controller group that block `block_index` (0-based) of `num_layers` reads its ω from.

    Contiguous groups: i·n // L. For n ≤ L every group 0..n-1 gets at least one block, also when n does
    not divide L (group sizes then differ by one). For n > L each block gets its own group and the
    remaining groups are unused.
    """
    if not 0 <= block_index < num_layers:
        raise ValueError(f"block index {block_index} is outside 0..{num_layers - 1}")
    if num_groups < 1:
        raise ValueError(f"the number of controller groups must be at least 1, got {num_groups}")
    return block_index * num_groups // num_layers


class StageBlender(nn.Module):
    """Maps (block-0 tokens, timestep embedding) to ω ∈ (0, 1)^n, the motion share per group.

    It sees the timestep (through AdaLN), the prompt and the current noisy latent (through the pooled
    tokens), so the identity/motion balance can change along the denoising trajectory: paper §3.3.
    """

    def __init__(self, token_dim: int, time_dim: int, cfg: ControllerConfig | None = None):
        super().__init__()
        cfg = cfg or ControllerConfig()
        self.cfg = cfg
        hidden = cfg.hidden_dim
        self.proj = nn.Linear(token_dim, hidden)  # W in eq. (8): D -> 512, no activation
        self.modulation = nn.Linear(time_dim, 3 * hidden)  # eq. (9)-(10): shift, scale, gate from SiLU(temb)
        self.norm = nn.LayerNorm(hidden, eps=1e-5)  # affine, as official
        self.mlp = nn.Sequential(
            nn.Linear(hidden, cfg.mlp_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.mlp_dim, hidden)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Linear(hidden, cfg.head_dim), nn.ReLU(), nn.Linear(cfg.head_dim, cfg.num_groups)
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PyTorch's default init everywhere except the last Linear, which starts at zero.

        Zero logits give sigmoid(0) = 0.5: at step 0 identity and motion share the budget equally,
        exactly the fixed-weight (--no-controller) setting, and the same as the official code's 0.1/0.1.
        """
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """tokens (B, T, D) the block-0 input [text; video]; temb (B, time_dim). Returns ω (B, n) in fp32
        (the controller's own dtype), whatever the dtype of the inputs."""
        dtype = self.proj.weight.dtype
        # Max-pool in the base dtype (exact in any dtype), then cast only the (B, D) result.
        pooled = tokens.amax(dim=1).to(dtype)  # (B, T, D) -> (B, D)            eq. (7)
        c = self.proj(pooled)  # (B, 512)                                        eq. (8)
        shift, scale, gate = self.modulation(F.silu(temb.to(dtype))).chunk(3, dim=-1)  # 3 x (B, 512)
        f = self.norm(c) * (1 + scale) + shift  # AdaLN                          eq. (9)
        f = self.mlp(f) + gate * c  # the gate scales the skip c, not the MLP     eq. (10)
        z = self.head(f)  # (B, n) logits, one per group                          eq. (11)
        return torch.sigmoid(z)  # independent sigmoids, no softmax             eq. (12)
