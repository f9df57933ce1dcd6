"""diffusion.py against diffusers' CogVideoX schedulers and a hand-run of CogVideoXPipeline's denoising loop.

Every parity check is bitwise (torch.equal), in fp32 and, where dtypes matter, bf16."""

import json
import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

import diffusion

# the shipped CogVideoX scheduler_config.json (2B); 5B is the same with snr_shift_scale 1.0
CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "snr_shift_scale": 3.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
SHAPE = (2, 3, 4, 4, 4)  # (B, F, C, H, W)


def config(shift: float) -> dict:
    return dict(CONFIG, snr_shift_scale=shift)


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"max abs diff {d.max().item():.3e}, mean {d.mean().item():.3e}"


def assert_same(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.dtype == ref.dtype and torch.equal(ours, ref), diff(ours, ref)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("cls", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_alphas_cumprod_match_diffusers(cls, shift):
    ours, ref = diffusion.load_schedule(config(shift)), cls(**config(shift))
    assert_same(ours.alphas_cumprod, ref.alphas_cumprod)


def test_default_schedule_ends_at_zero_terminal_snr():
    a = diffusion.Schedule(snr_shift_scale=1.0).alphas_cumprod
    assert a[-1].item() == 0.0 and abs(a[0].item() - 0.99915) < 1e-8, (a[0].item(), a[-1].item())


@pytest.mark.parametrize("steps", [50, 30])
@pytest.mark.parametrize("cls", [CogVideoXDDIMScheduler, CogVideoXDPMScheduler])
def test_trailing_timesteps_match_diffusers(cls, steps):
    ref = cls(**config(1.0))
    ref.set_timesteps(steps)
    assert_same(diffusion.Schedule().timesteps(steps), ref.timesteps)


def test_load_schedule_from_checkpoint_root(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(CONFIG))
    assert_same(diffusion.load_schedule(tmp_path).alphas_cumprod, diffusion.Schedule(3.0).alphas_cumprod)


def test_load_schedule_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.load_schedule(dict(CONFIG, prediction_type="epsilon"))


def test_prev_timesteps_follow_the_schedule_by_default():
    s = diffusion.Schedule()
    ts = s.timesteps(30)  # 999, 966, 932, ...: 1000 / 30 is not an integer
    assert s.prev_timesteps(ts) == ts[1:].tolist() + [-1]


def test_prev_timesteps_reference_mode_is_t_minus_stride():
    s = diffusion.Schedule()
    ts = s.timesteps(30)
    assert s.prev_timesteps(ts, reference_prev=True) == (ts - 33).tolist()


def test_ddim_with_true_velocity_lands_on_the_next_scheduled_timestep():
    # DDIM (eta = 0) is exact for the true v, so the state after a step must be x0 noised to the timestep the
    # model is called at next. With 30 steps this holds for our policy (the reference lands 1 step off).
    s, g = diffusion.Schedule(), torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(SHAPE, generator=g, dtype=torch.float64),
        torch.randn(SHAPE, generator=g, dtype=torch.float64),
    )
    ts = s.timesteps(30)
    noised = lambda t: s.add_noise(x0, eps, torch.full((SHAPE[0],), t))
    for t, t_prev in zip(ts.tolist(), s.prev_timesteps(ts)):
        v = s.velocity(x0, eps, torch.full((SHAPE[0],), t))
        x, _ = diffusion.ddim_step(s, v, noised(t), t, t_prev)
        want = noised(t_prev) if t_prev >= 0 else x0
        assert torch.allclose(x, want, atol=1e-10), f"t={t}: {diff(x, want)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_and_velocity_match_diffusers(dtype):
    ref, ours = CogVideoXDDIMScheduler(**config(1.0)), diffusion.Schedule()
    x0, eps, t = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype), torch.tensor([999, 19])
    assert_same(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t))
    assert_same(ours.velocity(x0, eps, t), ref.get_velocity(x0, eps, t))
    assert_same(ours.x0_from_v(x0, eps, t), ref.get_velocity(eps, x0, t))  # the scripts reuse get_velocity


def test_x0_from_v_inverts_add_noise_and_velocity():
    s, t = diffusion.Schedule(), torch.tensor([0, 500])
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    back = s.x0_from_v(s.add_noise(x0, eps, t), s.velocity(x0, eps, t), t)
    assert torch.allclose(back, x0, atol=1e-5), diff(back, x0)


def test_velocity_mse_equals_reference_weighted_x0_loss():
    # reference scripts: mean(1/(1-a) (x0_hat - x0)^2), x0_hat from the predicted v; ours: mean((v_hat - v)^2)
    s, t = diffusion.Schedule(), torch.tensor([3, 700])
    x0, eps, v_hat = (torch.randn(SHAPE, dtype=torch.float64) for _ in range(3))
    x_t = s.add_noise(x0, eps, t)
    w = (1 / (1 - s.alphas_cumprod[t])).reshape(-1, 1, 1, 1, 1)
    ref = (w * (s.x0_from_v(x_t, v_hat, t) - x0) ** 2).mean()
    ours = ((v_hat - s.velocity(x0, eps, t)) ** 2).mean()
    assert torch.allclose(ours, ref, rtol=1e-12), (ours.item(), ref.item())


@pytest.mark.parametrize("i", [0, 25, 49])  # first, middle, last (prev = -1)
def test_ddim_step_matches_diffusers(i):
    ref, ours = CogVideoXDDIMScheduler(**config(3.0)), diffusion.Schedule(3.0)
    ref.set_timesteps(50)
    t = int(ref.timesteps[i])
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    want = ref.step(v, t, x, return_dict=False)[0]
    assert_same(diffusion.ddim_step(ours, v, x, t, ours.prev_timesteps(ref.timesteps)[i])[0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 latents: noise drawn in bf16
@pytest.mark.parametrize("i", [0, 1, 25, 49])  # first (a = 0), first second-order, middle, last (prev = -1)
def test_dpm_step_matches_diffusers(i, dtype):
    ref, ours = CogVideoXDPMScheduler(**config(1.0)), diffusion.Schedule(1.0)
    ref.set_timesteps(50)
    ts = ref.timesteps
    x, v, old = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE), torch.randn(SHAPE)
    t_back, old = (int(ts[i - 1]), old) if i > 0 else (None, None)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    want = ref.step(v, old, int(ts[i]), t_back, x, generator=g_ref, return_dict=False)
    got = diffusion.dpm_step(ours, v, x, int(ts[i]), ours.prev_timesteps(ts)[i], t_back, old, g_ours)
    assert_same(got[0], want[0])


def test_dpm_second_order_step_draws_noise_twice():
    s, x, v = diffusion.Schedule(), torch.randn(SHAPE), torch.randn(SHAPE)
    g, g_twice = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    diffusion.dpm_step(s, v, x, 959, 939, 979, torch.randn(SHAPE), g)
    torch.randn(SHAPE, generator=g_twice), torch.randn(SHAPE, generator=g_twice)
    assert torch.equal(g.get_state(), g_twice.get_state())


def test_dpm_last_step_returns_x0_exactly():
    s, x, v = diffusion.Schedule(), torch.randn(SHAPE), torch.randn(SHAPE)
    x_prev, x0 = diffusion.dpm_step(s, v, x, 19, -1, 39, torch.randn(SHAPE), torch.Generator().manual_seed(0))
    assert torch.equal(x_prev, x0), diff(x_prev, x0)


def test_dynamic_cfg_timestep_value_schedule_matches_published_values():
    # guidance 4, 50 steps, as printed in diffusers issue #9641 / PR #13172 for the reference pipeline
    ts = diffusion.Schedule().timesteps(50)[:9].tolist()
    got = [diffusion.guidance_scale(4.0, 50, t, i, dynamic=True) for i, t in enumerate(ts)]
    want = [1.8610, 2.0290, 4.9829, 4.6136, 2.1921, 3.1813, 1.0251, 3.1136, 1.4120]
    assert all(abs(a - b) < 5e-5 for a, b in zip(got, want)), (got, want)


def test_dynamic_cfg_step_index_variant_decays_smoothly():
    ts = diffusion.Schedule().timesteps(50).tolist()
    got = [diffusion.guidance_scale(4.0, 50, t, i, dynamic=True, by_index=True) for i, t in enumerate(ts)]
    want = [1 + 4.0 * (1 - math.cos(math.pi * ((50 - i) / 50) ** 5)) / 2 for i in range(50)]
    assert got == want and abs(got[0] - 5.0) < 1e-12 and all(a >= b for a, b in zip(got, got[1:])), got[:5]


class StubModel:
    """A fixed random affine map of (latents, text, timestep, cond) -> v, standing in for the transformer."""

    def __init__(self, channels: int = SHAPE[2], text_dim: int = 8, cond_dim: int = 5):
        g = torch.Generator().manual_seed(123)
        self.w, self.u = (
            torch.randn(channels, channels, generator=g) * 0.4,
            torch.randn(text_dim, channels, generator=g),
        )
        self.k = torch.randn(cond_dim, channels, generator=g)
        self.calls = []

    def __call__(self, x, text, t, cond=None):
        self.calls.append((text, t, cond))
        out = (
            torch.einsum("bfchw,cd->bfdhw", x.float(), self.w) + (t.float() / 1000)[:, None, None, None, None]
        )
        out = out + (text.float().mean(1) @ self.u)[:, None, :, None, None]
        if cond is not None:
            out = out + (cond.float() @ self.k)[:, None, :, None, None]
        return out.to(x.dtype)


def reference_loop(sampler, steps, guidance, dynamic, dtype, text, neg, seed, cond=None):
    """CogVideoXPipeline.__call__'s denoising loop, written out around diffusers' schedulers."""
    cls = CogVideoXDPMScheduler if sampler == "dpm" else CogVideoXDDIMScheduler
    sched, model, g = cls(**config(1.0)), StubModel(), torch.Generator().manual_seed(seed)
    sched.set_timesteps(steps)
    latents = (
        randn_tensor(SHAPE, generator=g, device=torch.device("cpu"), dtype=dtype) * sched.init_noise_sigma
    )
    do_cfg = guidance > 1.0
    embeds = torch.cat([neg, text]) if do_cfg else text
    old = None
    for i, t in enumerate(sched.timesteps):
        x_in = torch.cat([latents] * 2) if do_cfg else latents
        v = model(x_in, embeds, t.expand(x_in.shape[0]), cond=cond).float()
        w = (
            1 + guidance * ((1 - math.cos(math.pi * ((steps - t.item()) / steps) ** 5.0)) / 2)
            if dynamic
            else guidance
        )
        if do_cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + w * (v_c - v_u)
        if sampler == "dpm":
            t_back = sched.timesteps[i - 1] if i > 0 else None
            latents, old = sched.step(v, old, t, t_back, latents, generator=g, return_dict=False)
        else:
            latents = sched.step(v, t, latents, generator=g, return_dict=False)[0]
        latents = latents.to(embeds.dtype)
    return latents


def texts(dtype):
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 6, 8, generator=g).to(dtype), torch.randn(2, 6, 8, generator=g).to(dtype)


def ours(text, neg, steps: int, seed: int, **kw):
    """diffusion.sample on the stub model and the plain schedule, seeded like reference_loop."""
    generator = torch.Generator().manual_seed(seed)
    return diffusion.sample(StubModel(), diffusion.Schedule(1.0), text, neg, SHAPE, steps=steps,
                            generator=generator, progress=False, **kw)  # fmt: skip


@pytest.mark.parametrize(
    "sampler,steps,dynamic,dtype,reference_prev",
    [
        ("ddim", 50, False, torch.float32, False),
        ("ddim", 50, True, torch.float32, False),
        ("dpm", 50, False, torch.float32, False),
        ("dpm", 50, True, torch.float32, False),
        ("dpm", 50, True, torch.bfloat16, False),
        ("ddim", 30, False, torch.float32, True),
        ("dpm", 30, True, torch.float32, True),
    ],
)
def test_sample_matches_reference_pipeline_loop(sampler, steps, dynamic, dtype, reference_prev):
    text, neg = texts(dtype)
    want = reference_loop(sampler, steps, 6.0, dynamic, dtype, text, neg, seed=42)
    got = ours(text, neg, steps, 42, sampler=sampler, dynamic_cfg=dynamic, reference_prev=reference_prev)
    assert_same(got, want)


def test_sample_without_cfg_matches_reference_loop():
    text, _ = texts(torch.float32)
    want = reference_loop("dpm", 10, 1.0, False, torch.float32, text, None, seed=3)
    got = ours(text, None, 10, 3, guidance=1.0)
    assert_same(got, want)


def test_sample_30_steps_default_policy_differs_from_reference():
    text, neg = texts(torch.float32)
    want = reference_loop("ddim", 30, 6.0, False, torch.float32, text, neg, seed=0)
    got = ours(text, neg, 30, 0, sampler="ddim")
    assert not torch.allclose(got, want, atol=1e-4), diff(got, want)


@pytest.mark.parametrize("zero_uncond", [False, True])
def test_sample_passes_cond_to_each_cfg_half(zero_uncond):
    text, neg = texts(torch.float32)
    e = torch.randn(2, 5)
    model = StubModel()
    neg_cond = torch.zeros_like(e) if zero_uncond else None
    diffusion.sample(
        model,
        diffusion.Schedule(),
        text,
        neg,
        SHAPE,
        steps=2,
        cond=e,
        neg_cond=neg_cond,
        generator=torch.Generator().manual_seed(0),
        progress=False,
    )
    want = torch.cat([torch.zeros_like(e) if zero_uncond else e, e])
    assert all(torch.equal(c, want) for _, _, c in model.calls), diff(model.calls[0][2], want)


def test_sample_calls_callback_every_step_with_the_timestep():
    text, neg = texts(torch.float32)
    seen = []
    diffusion.sample(
        StubModel(),
        diffusion.Schedule(),
        text,
        neg,
        SHAPE,
        steps=5,
        progress=False,
        callback=lambda i, t, x: seen.append((i, t, tuple(x.shape))),
    )
    assert seen == [(i, t, SHAPE) for i, t in enumerate(diffusion.Schedule().timesteps(5).tolist())], seen
