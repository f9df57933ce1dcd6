"""Dual-aware adapters and the StageBlender controller on the tiny CogVideoX (adapters.py, controller.py).

Each test asserts one property of the method: the adapted model starts as the base model, the gradient
mask keeps the frozen family bitwise unchanged under AdamW (and zeroing instead of masking leaks), e acts
only through the motion adapters, the group mapping, save/load, and the official parameter counts.
"""

from dataclasses import replace

import pytest
import torch

import adapters
import model as M
from controller import ControllerConfig, StageBlender, group_of

E_DIM = 32  # the tiny CLIP's projection_dim
CFG = adapters.AdapterConfig(cond_dim=E_DIM, groups=2)


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.float() - b.float()).abs()
    return f"max abs diff {d.max().item():.3e}, mean {d.mean().item():.3e}"


def batch(frames: int = 3, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """latents (2, F, 4, 8, 8), text (2, 16, 32), timesteps (2,), e (2, E), a regression target."""
    g = torch.Generator().manual_seed(seed)
    lat, text = torch.randn(2, frames, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    e, target = torch.randn(2, E_DIM, generator=g), torch.randn(lat.shape, generator=g)
    return lat, text, torch.tensor([100, 900]), e, target


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def changed(before, params) -> list[bool]:
    return [not torch.equal(b, p) for b, p in zip(before, params)]


def train(net, ext, opt, phase: str, steps: int, grads: str = "mask") -> None:
    """AdamW steps in one phase; grads: 'mask' (set None), 'keep' (no mask), 'zero' (grad.zero_())."""
    lat, text, t, e, target = batch(frames=3 if phase == "motion" else 1)
    inactive = ext.family_params("motion" if phase == "identity" else "identity")
    for _ in range(steps):
        loss = (net(lat, text, t, e if phase == "motion" else None) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        adapters.mask_gradients(ext, phase, enabled=grads == "mask")
        for p in inactive if grads == "zero" else []:
            if p.grad is not None:
                p.grad.zero_()
        opt.step()


def perturb(modules, which: str) -> None:
    """Give every `which` weight (up or down or cond) of these adapters random values."""
    with torch.no_grad():
        for m in modules:
            for kind in adapters.KINDS:
                getattr(m[kind], which).weight.normal_(std=0.5)


@pytest.fixture
def tiny():
    net = M.load_transformer("tiny")
    return net, adapters.attach(net, CFG)


@pytest.mark.parametrize("with_e", [False, True])
def test_attached_at_init_equals_base(with_e):
    net = M.load_transformer("tiny")
    lat, text, t, e, _ = batch()
    with torch.no_grad():
        base = net(lat, text, t)
        adapters.attach(net, CFG)
        out = net(lat, text, t, e if with_e else None)
    assert torch.equal(out, base), diff(out, base)


def test_branch_is_the_blend_of_eq_1_to_3(tiny):
    """s·[ω Δ_mo + (1 − ω) Δ_id], Δ = W_up·GELU_erf(W_down·x (+ W_cond e)), written out by hand."""
    _, ext = tiny
    perturb(ext.identity, "up")
    perturb(ext.motion, "up")
    h, e, omega = torch.randn(2, 5, 32), torch.randn(2, E_DIM), torch.tensor([[0.2, 0.7], [0.9, 0.4]])
    gelu = lambda z: 0.5 * z * (1 + torch.erf(z / 2**0.5))  # exact GELU, not tanh
    lin = lambda m, z: z @ m.weight.T + m.bias
    mo, id_ = ext.motion[1]["ff"], ext.identity[1]["ff"]  # block 1 of 2 reads group 1
    d_mo = lin(mo.up, gelu(lin(mo.down, h + lin(mo.cond, e)[:, None])))
    d_id = lin(id_.up, gelu(lin(id_.down, h)))
    w = omega[:, 1, None, None]
    want = 0.2 * (w * d_mo + (1 - w) * d_id)
    got = ext.hook(1, adapters.Blend(omega=omega, e=e))("ff", h)
    assert torch.allclose(got, want, atol=1e-6), diff(got, want)


def test_compiled_blocks_share_graphs_past_dynamos_recompile_limit():
    """train.py compiles each block. With 10 blocks (more than torch._dynamo's limit of 8 graphs per function)
    all blocks must share a few graphs: block 0 (its text input needs no grad) and the rest, per phase. Block
    indices reaching the compiled code made one graph per block, and blocks past the 8th ran eager."""
    from torch._dynamo.utils import counters

    net = M.CogVideoXTransformer(replace(M.get_config("tiny"), num_layers=10))
    adapters.attach(net, CFG)
    net.grad_checkpointing = True  # as train.py runs it
    torch._dynamo.reset()
    counters.clear()
    try:
        for block in net.blocks:
            block.compile(backend="eager")  # dynamo's guards decide the graphs; Inductor is not needed
        for phase in ("identity", "motion"):
            lat, text, t, e, _ = batch(frames=1 if phase == "identity" else 3)
            net(lat, text, t, e if phase == "motion" else None).square().mean().backward()
        frames, graphs = dict(counters["frames"]), counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert frames["ok"] == frames["total"] and graphs <= 4, (frames, graphs)


def test_controller_starts_at_one_half():
    net = M.load_transformer("tiny")
    ext = adapters.attach(net, adapters.AdapterConfig(cond_dim=E_DIM))  # n = 7 (softmax would give 1/7)
    lat, text, t, e, _ = batch()
    with torch.no_grad():
        net(lat, text, t, e)
    assert torch.equal(ext.last_omega, torch.full((2, 7), 0.5)), ext.last_omega


def test_controller_is_eq_7_to_12():
    """ω = σ(W4 ReLU(W3 ReLU(MLP(f) + gate·c))), f = LN(c)(1 + scale) + shift, c = W maxpool(tokens)."""
    ctrl = StageBlender(32, 16, ControllerConfig(num_groups=3))
    torch.nn.init.normal_(ctrl.head[-1].weight)  # undo the zero init, so ω is not constant
    tokens, temb = torch.randn(2, 11, 32), torch.randn(2, 16)
    lin = lambda m, z: z @ m.weight.T + m.bias
    c = lin(ctrl.proj, tokens.max(dim=1).values)
    shift, scale, gate = lin(ctrl.modulation, torch.nn.functional.silu(temb)).chunk(3, dim=-1)
    f = (
        torch.nn.functional.layer_norm(c, (512,), ctrl.norm.weight, ctrl.norm.bias, 1e-5) * (1 + scale)
        + shift
    )
    f = lin(ctrl.mlp[2], torch.nn.functional.gelu(lin(ctrl.mlp[0], f), approximate="tanh")) + gate * c
    want = torch.sigmoid(lin(ctrl.head[3], lin(ctrl.head[1], f.relu()).relu()))
    got = ctrl(tokens, temb)
    assert got.shape == (2, 3) and torch.allclose(got, want, atol=1e-6), diff(got, want)


def test_controller_learns_timestep_dependence(tiny):
    """Synthetic objective through the model: ω → 1 at t = 100 and ω → 0 at t = 900, same latent/prompt."""
    net, ext = tiny
    opt = torch.optim.AdamW(ext.family_params("controller"), lr=1e-3)  # the official lr
    lat, text, _, e, _ = batch()
    lat, text, t = lat[:1].expand(2, -1, -1, -1, -1), text[:1].expand(2, -1, -1), torch.tensor([100, 900])
    begin, seen = ext.begin, []
    ext.begin = lambda *args: seen.append(begin(*args)) or seen[-1]  # keep ω with its graph
    for _ in range(20):
        net(lat, text, t, e[:1])
        loss = (seen[-1].omega - torch.tensor([[1.0], [0.0]])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        net(lat, text, t, e[:1])
    w = ext.last_omega
    assert (w[0] - w[1]).min() > 0.01, f"ω(t=100)={w[0].tolist()} vs ω(t=900)={w[1].tolist()}"


@pytest.mark.parametrize("first,second", [("motion", "identity"), ("identity", "motion")])
def test_mask_keeps_frozen_family_bitwise(tiny, first, second):
    net, ext = tiny
    opt = torch.optim.AdamW(ext.parameters(), lr=1e-2, weight_decay=0.1)
    train(net, ext, opt, first, steps=2)  # the `first` family now has weights and AdamW moments
    frozen, active = ext.family_params(first), ext.family_params(second) + ext.family_params("controller")
    before_frozen, before_active = snapshot(frozen), snapshot(active)
    train(net, ext, opt, second, steps=3)
    assert not any(changed(before_frozen, frozen)), (
        f"{sum(changed(before_frozen, frozen))} frozen tensors moved"
    )
    assert all(changed(before_active, active)), (
        f"{changed(before_active, active).count(False)} active unchanged"
    )


@pytest.mark.parametrize("grads", ["keep", "zero"])
def test_without_none_grads_the_frozen_family_leaks(tiny, grads):
    """--no-grad-mask, or grad.zero_() instead of None: momentum and weight decay move the motion adapters."""
    net, ext = tiny
    opt = torch.optim.AdamW(ext.parameters(), lr=1e-2, weight_decay=0.1)
    train(net, ext, opt, "motion", steps=2)
    ups = [ext.motion[i][k].up.weight for i in range(len(ext.motion)) for k in adapters.KINDS]
    before = snapshot(ups)
    train(net, ext, opt, "identity", steps=3, grads=grads)
    assert all(changed(before, ups)), f"motion W_up unchanged under grads={grads!r}: {changed(before, ups)}"


def test_groups_42_blocks_7_groups_are_contiguous_sixes():
    groups = [group_of(i, 42, 7) for i in range(42)]
    assert groups == [g for g in range(7) for _ in range(6)], groups


@pytest.mark.parametrize("n", [1, 2, 5, 42])
def test_groups_cover_every_block_in_order(n):
    groups = [group_of(i, 42, n) for i in range(42)]
    assert sorted(set(groups)) == list(range(n)) and groups == sorted(groups), groups


def test_adapters_use_group_of(tiny):
    _, ext = tiny
    assert ext.groups == [group_of(i, 2, CFG.groups) for i in range(2)] == [0, 1], ext.groups


def test_e_has_no_effect_while_motion_w_up_is_zero(tiny):
    net, ext = tiny
    perturb(ext.identity, "up")  # identity adapters active, motion W_up still zero
    lat, text, t, e, _ = batch()
    with torch.no_grad():
        a, b, c = net(lat, text, t, e), net(lat, text, t, -3 * e), net(lat, text, t, None)
    assert torch.equal(a, b) and torch.equal(a, c), f"{diff(a, b)}; {diff(a, c)}"


def test_e_changes_the_output_through_motion_adapters(tiny):
    net, ext = tiny
    perturb(ext.motion, "up")
    lat, text, t, e, _ = batch()
    with torch.no_grad():
        a, b = net(lat, text, t, e), net(lat, text, t, -3 * e)
    assert (a - b).abs().max() > 1e-4, diff(a, b)


def test_no_controller_is_a_fixed_half():
    net = M.load_transformer("tiny")
    ext = adapters.attach(net, adapters.AdapterConfig(cond_dim=E_DIM, controller=False))
    lat, text, t, e, _ = batch()
    with torch.no_grad():
        net(lat, text, t, e)
    assert ext.controller is None and ext.family_params("controller") == []
    assert torch.equal(ext.last_omega, torch.full((2, 7), 0.5)), ext.last_omega


def test_only_adapters_train_and_the_base_keeps_its_dtype():
    net = M.load_transformer("tiny", dtype=torch.bfloat16)
    ext = adapters.attach(net, CFG)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    base = [p for n, p in net.named_parameters() if not n.startswith("ext.")]
    assert trainable == {id(p) for p in ext.parameters()}, f"{len(trainable)} trainable tensors"
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base)
    assert all(p.dtype == torch.float32 for p in ext.parameters())
    lat, text, t, e, _ = batch()
    out = net(lat.bfloat16(), text.bfloat16(), t, e)
    assert out.dtype == torch.bfloat16, out.dtype  # deltas come back in the base dtype


def test_l2_penalty_is_lambda_times_squared_norm_of_active_family(tiny):
    _, ext = tiny
    want = 0.5 * sum(p.pow(2).sum() for p in ext.family_params("motion"))
    got = adapters.l2_penalty(ext, "motion", 0.5)
    assert torch.allclose(got, want) and adapters.l2_penalty(ext, "motion", 0.0) == 0, (got, want)


def test_save_load_round_trip_is_bitwise(tiny, tmp_path):
    net, ext = tiny
    with torch.no_grad():
        [p.normal_() for p in ext.parameters()]
    adapters.save_adapters(ext, str(tmp_path / "adapters.safetensors"))
    loaded = adapters.load_adapters(M.load_transformer("tiny"), str(tmp_path / "adapters.safetensors"))
    saved, back = ext.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    assert loaded.cfg == CFG and loaded.base["name"] == "tiny", (loaded.cfg, loaded.base)


def test_load_into_attached_adapters_keeps_the_parameter_objects(tiny, tmp_path):
    net, ext = tiny
    adapters.save_adapters(ext, str(tmp_path / "a.safetensors"))
    ids = [id(p) for p in ext.parameters()]
    assert adapters.load_adapters(net, str(tmp_path / "a.safetensors")) is ext
    assert ids == [id(p) for p in ext.parameters()]  # an optimizer holding them stays valid (resume)


def test_load_into_a_different_model_names_the_mismatch(tmp_path):
    other = adapters.DualAdapters(num_layers=3, dim=32, time_dim=32, cfg=CFG, base_name="three-blocks")
    adapters.save_adapters(other, str(tmp_path / "a.safetensors"))
    with pytest.raises(
        ValueError, match="trained for 3 blocks of width 32 .* this model has 2 blocks of width 32"
    ):
        adapters.load_adapters(M.load_transformer("tiny"), str(tmp_path / "a.safetensors"))


def test_load_with_a_different_config_names_the_field(tiny, tmp_path):
    _, ext = tiny
    adapters.save_adapters(ext, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="groups=2 in the file, 5 here"):
        cfg = adapters.AdapterConfig(cond_dim=E_DIM, groups=5)
        adapters.load_adapters(M.load_transformer("tiny"), str(tmp_path / "a.safetensors"), cfg)


def test_load_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapters file"):
        adapters.load_adapters(M.load_transformer("tiny"), str(tmp_path / "nope.safetensors"))


def test_parameter_counts_match_official_cogvideox_5b():
    with torch.device("meta"):
        net = M.CogVideoXTransformer(M.get_config("cogvideox-5b"))
    ext = adapters.attach(net)  # defaults: width 64, e 1024, n = 7 groups, controller on
    counts = adapters.count_parameters(ext)
    one = sum(p.numel() for p in ext.identity[0]["attn"].parameters())
    cond = sum(p.numel() for p in ext.motion[0]["attn"].cond.parameters())
    assert (one, cond) == (396_352, 3_148_800), (one, cond)
    want = {"identity": 33_293_568, "motion": 297_792_768, "controller": 4_528_647, "total": 335_614_983}
    assert counts == want, counts
