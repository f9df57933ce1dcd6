"""onednn.Linear is nn.Linear: the same outputs and gradients, computed by oneDNN for fp32 on the CPU."""

import pytest
import torch

import onednn

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="not x86, or torch without oneDNN")


def pair(train_weight: bool, dtype=torch.float32) -> tuple[torch.nn.Linear, onednn.Linear]:
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 80).to(dtype).requires_grad_(train_weight)
    ours = onednn.Linear(48, 80).to(dtype).requires_grad_(train_weight)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run(m: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(grad)
    return y, x.grad


@pytest.mark.parametrize("train_weight", [False, True])
def test_matches_nn_linear_forward_and_backward(train_weight):
    ref, ours = pair(train_weight)
    x = torch.randn(2, 7, 96)[..., ::2].transpose(0, 1)  # (7, 2, 48), strided like a view of a bigger tensor
    grad = torch.randn(7, 2, 80)
    (y_ref, dx_ref), (y, dx) = run(ref, x, grad), run(ours, x, grad)
    assert type(y.grad_fn).__name__ == "OneDNNLinearFunctionBackward"  # the oneDNN path ran
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    if train_weight:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    else:
        assert ours.weight.grad is None and ours.bias.grad is None


def test_frozen_weight_saves_no_activation():
    """A frozen base keeps W for dx = dy·W and nothing per token, as autograd's own linear does."""
    _, ours = pair(train_weight=False)
    x = torch.randn(5, 48, requires_grad=True)
    saved = ours(x).grad_fn.saved_tensors
    assert [t for t in saved if t is not None and t.data_ptr() != ours.weight.data_ptr()] == []


def test_bf16_and_builds_without_onednn_take_f_linear(monkeypatch):
    _, ours = pair(train_weight=True, dtype=torch.bfloat16)
    assert type(ours(torch.randn(3, 48, dtype=torch.bfloat16)).grad_fn).__name__ == "AddmmBackward0"
    _, ours = pair(train_weight=True)
    monkeypatch.setattr(onednn, "AVAILABLE", False)
    assert type(ours(torch.randn(3, 48)).grad_fn).__name__ == "AddmmBackward0"


def test_compiles_in_one_graph():
    """torch.compile keeps the op opaque (inductor lowers mkldnn's linear for frozen inference weights
    only) and traces the layer without a graph break."""
    ref, ours = pair(train_weight=True)
    compiled = torch.compile(ours, fullgraph=True)
    x, grad = torch.randn(6, 48), torch.randn(6, 80)
    (y_ref, dx_ref), (y, dx) = run(ref, x, grad), run(compiled, x, grad)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
