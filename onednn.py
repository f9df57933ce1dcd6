"""Linear layers whose fp32 CPU matmuls run on oneDNN instead of the MKL sgemm behind F.linear.

Why: on the AMD EPYC (Zen 4) CPU bench.py was measured on, oneDNN's fp32 GEMMs at the transformer's shapes
run at 200–215 GFLOP/s and MKL's at 155–195, and the same transformer step took 6–11% less time in four
alternating A/B runs (README, Performance). PyTorch already sends fp32 convolutions to oneDNN, not matmuls.

Only the GEMM library changes: the same function, the same parameters, fp32 throughout. CUDA, bf16,
non-x86 CPUs (unmeasured) and builds without oneDNN take F.linear. The matmul is wrapped in an op of our own
because torch.compile's inductor lowers mkldnn's linear for frozen inference weights only; an opaque op
compiles as an external kernel.
"""

import math
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

# Read once: torch.compile cannot trace the call. x86 only: oneDNN was measured faster on AMD Zen 4; Intel
# is unmeasured, and ARM (also unmeasured) keeps F.linear.
AVAILABLE = torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")

# Our own op, opaque to torch.compile: registered through torch.library.Library, whose calls cost ~2 µs more
# than the bare op (torch.library.custom_op with its autograd cost ~150 µs a forward + backward, 2% of
# bench.py's step). mkldnn's arguments after b: no fused post-op ("none"), no post-op scalars, no algorithm.
_lib = torch.library.Library("dualreal", "DEF")
_lib.define("onednn_linear(Tensor x, Tensor w, Tensor? b) -> Tensor")  # x (..., K), w (N, K) -> (..., N)
_lib.impl("onednn_linear", lambda x, w, b: torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), "CPU")
torch.library.register_fake(
    "dualreal::onednn_linear", lambda x, w, b: x.new_empty(*x.shape[:-1], w.shape[0]), lib=_lib
)
onednn_linear = torch.ops.dualreal.onednn_linear  # x·wᵀ + b, w of any strides


@register_flop_formula(onednn_linear)  # torch.utils.flop_counter.FlopCounterMode counts it as a matmul
def _flops(x_shape, w_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape) * w_shape[0]


class OneDNNLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b. Backward: dx = dy·W (oneDNN again, W read transposed in place), dW = dyᵀ·x, db = Σ dy.
    x is kept only when W trains: a frozen base model keeps W alone, as autograd's own linear does."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x if w.requires_grad else None, w)
        return onednn_linear(x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward is an error, never silently zero
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (M, N), M = all leading dims (none for a 1-D x)
        dx = onednn_linear(grad, w.t(), None) if ctx.needs_input_grad[0] else None
        dw = rows.T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        db = rows.sum(0) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys) with oneDNN for big fp32 matmuls on the CPU.

    Below M·K·N = 2^25 oneDNN's fixed cost per call (~13 µs) outweighs its speed. Forward + backward of a
    frozen layer, against nn.Linear: 2.6× the time at 0.26M, even at 34M, 0.77× at 218M (bench.py's proj).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fp32 = x.dtype == self.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        if AVAILABLE and x.is_cpu and fp32 and x.numel() * self.out_features >= 2**25:
            return OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
