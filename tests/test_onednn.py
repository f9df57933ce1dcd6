"""onednn.Linear is nn.Linear: the same outputs and gradients, from oneDNN for big fp32 matmuls on the CPU."""

import pytest
import torch
import torch.utils.flop_counter

import onednn

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="not x86, or torch without oneDNN")
K, N = 256, 256  # with 512 rows, M·K·N = 2^25: the smallest matmul Linear sends to oneDNN


def pair(train_weight: bool, dtype=torch.float32, k=K, n=N) -> tuple[torch.nn.Linear, onednn.Linear]:
    torch.manual_seed(0)
    ref = torch.nn.Linear(k, n).to(dtype).requires_grad_(train_weight)
    ours = onednn.Linear(k, n).to(dtype).requires_grad_(train_weight)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(m: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(grad)
    return y, x.grad


def assert_same_grads(ours: torch.nn.Linear, ref: torch.nn.Linear) -> None:
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_nn_linear_forward_and_backward(train_weight):
    ref, ours = pair(train_weight)
    x = torch.randn(2, 256, 2 * K)[..., ::2].transpose(0, 1)  # (256, 2, K), strided: a view of a bigger one
    grad = torch.randn(256, 2, N)
    (y_ref, dx_ref), (y, dx) = run(ref, x, grad), run(ours, x, grad)
    assert type(y.grad_fn).__name__ == "OneDNNLinearFunctionBackward"  # the oneDNN path ran
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    if train_weight:
        assert_same_grads(ours, ref)
    else:
        assert ours.weight.grad is None and ours.bias.grad is None


def test_function_takes_a_1d_input_and_no_bias():
    torch.manual_seed(0)
    x, w = torch.randn(7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    y = onednn.OneDNNLinearFunction.apply(x, w, None)
    torch.testing.assert_close(y, w @ x.detach(), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, x.detach().expand(5, 7), rtol=1e-5, atol=1e-5)


def test_frozen_weight_saves_no_activation():
    """A frozen base keeps W for dx = dy·W and nothing per token, as autograd's own linear does."""
    _, ours = pair(train_weight=False)
    x = torch.randn(512, K, requires_grad=True)
    saved = ours(x).grad_fn.saved_tensors
    assert [t for t in saved if t is not None and t.data_ptr() != ours.weight.data_ptr()] == []


def test_small_bf16_autocast_and_builds_without_onednn_take_f_linear(monkeypatch):
    path = lambda y: type(y.grad_fn).__name__  # noqa: E731
    _, ours = pair(train_weight=True)
    assert path(ours(torch.randn(511, K))) == "AddmmBackward0", "below 2^25 the call costs more than it saves"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(torch.randn(512, K)).dtype == torch.bfloat16
    _, ours = pair(train_weight=True, dtype=torch.bfloat16)
    assert path(ours(torch.randn(512, K, dtype=torch.bfloat16))) == "AddmmBackward0"
    _, ours = pair(train_weight=True)
    monkeypatch.setattr(onednn, "AVAILABLE", False)
    assert path(ours(torch.randn(512, K))) == "AddmmBackward0"


@pytest.mark.parametrize("train_weight", [False, True])
def test_compiles_in_one_graph(train_weight):
    """torch.compile keeps the op opaque (inductor lowers mkldnn's linear for frozen inference weights
    only) and traces the layer without a graph break."""
    ref, ours = pair(train_weight)
    compiled = torch.compile(ours, fullgraph=True)
    x, grad = torch.randn(512, K), torch.randn(512, N)
    (y_ref, dx_ref), (y, dx) = run(ref, x, grad), run(compiled, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    if train_weight:
        assert_same_grads(ours, ref)


def test_flop_counter_counts_the_op_as_a_matmul():
    _, ours = pair(train_weight=False)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        ours(torch.randn(512, K))
    assert counter.get_total_flops() == 2 * 512 * K * N
