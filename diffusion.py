"""Diffusion for CogVideoX: the noise schedule, the v-prediction target, two samplers, and the CFG loop.

CogVideoX predicts v (Salimans & Ho 2022) on a 1000-step DDPM schedule; a_t is alpha-bar ("alphas_cumprod"):
  x_t = sa x0 + sb eps,   v = sa eps - sb x0,   x0 = sa x_t - sb v,   with sa = sqrt(a_t), sb = sqrt(1-a_t).
The schedule: scaled-linear betas in float64, an SNR shift a <- a / (s + (1 - s) a) (SNR / s; s = 3 for 2B, 1
for 5B), then zero-terminal-SNR rescaling (Lin et al. 2023, a_999 = 0). Sampling uses "trailing" timesteps
(999, 979, ..., 19 for 50 steps) and DDIM with eta = 0 (Song et al. 2021, eq. 12) or CogVideoX's stochastic
DPM-Solver++(2M) (Lu et al. 2022; SAT's VPSDEDPMPP2MSampler). Training: plain MSE on v (= the reference's
1/(1-a)-weighted x0 loss). Shapes: B batch, F latent frames, C channels, H, W latent size, L tokens, D width.

Reference (the tests' oracle): diffusers 0.42 CogVideoXDDIMScheduler / CogVideoXDPMScheduler and the loop of
CogVideoXPipeline, matched bit for bit (dtypes and random draws included) except for one documented choice:
the reference steps from t to t - 1000 // N, which leaves the schedule when N does not divide 1000 (N = 30:
it denoises 999 -> 966 -> 933, then calls the model at 932). We step to the next scheduled timestep (-1 after
the last: a = 1, clean), so the state and the timestep given to the model agree; `reference_prev=True` gives
the reference's behaviour. For N dividing 1000 (50, 25, 20, ...) the two are identical.
"""

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

BETA_START, BETA_END, T_TRAIN = 0.00085, 0.012, 1000  # every CogVideoX scheduler_config.json


class Schedule:
    """alpha-bar over the training timesteps (float64), and the maps between x0, noise, x_t and v."""

    def __init__(self, snr_shift_scale: float = 1.0, rescale_betas_zero_snr: bool = True):
        s, T = snr_shift_scale, T_TRAIN
        betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, T, dtype=torch.float64) ** 2  # "scaled_linear"
        a = torch.cumprod(1.0 - betas, dim=0)
        a = a / (s + (1 - s) * a)  # SNR shift: a / (1 - a) is divided by s
        # zero terminal SNR: shift sqrt(a) so its last value is 0, rescale so its first value is unchanged
        if rescale_betas_zero_snr:
            r = a.sqrt()
            r0, rT = r[0].clone(), r[-1].clone()
            a = ((r - rT) * (r0 / (r0 - rT))) ** 2
        self.alphas_cumprod = a  # (T,) float64
        self.num_train_timesteps = T

    def alpha(self, t: int) -> Tensor:
        """a_t as a 0-dim float64 tensor; a = 1 (no noise) for t < 0, the step after the last one."""
        t = int(t)
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)

    def timesteps(self, steps: int) -> Tensor:
        """ "Trailing" spacing, (N,) int64: round(arange(T, 0, -T/N)) - 1, [999, 979, ..., 19] for N = 50."""
        T = self.num_train_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and {T}, got {steps}")
        return torch.from_numpy(np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)

    def prev_timesteps(self, timesteps: Tensor, reference_prev: bool = False) -> list[int]:
        """Where each step lands: the next scheduled timestep (-1 after the last), or t - T//N (reference)."""
        if reference_prev:
            return [int(t) - self.num_train_timesteps // len(timesteps) for t in timesteps]
        return [int(t) for t in timesteps[1:]] + [-1]

    def _coef(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        # like the reference, a is cast to the sample's dtype BEFORE the square roots; (B,) -> (B, 1, ..., 1)
        a = self.alphas_cumprod.to(device=x.device, dtype=x.dtype)[t.to(x.device)]
        a = a.reshape(-1, *[1] * (x.ndim - 1))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with t (B,) integer timesteps."""
        sa, sb = self._coef(t, x0)
        return sa * x0 + sb * noise

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The training target v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
        sa, sb = self._coef(t, x0)
        return sa * noise - sb * x0

    def x0_from_v(self, x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
        """The clean sample a velocity implies: x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v."""
        sa, sb = self._coef(t, x_t)
        return sa * x_t - sb * v


def load_schedule(source: str | Path | dict | None = None, snr_shift_scale: float = 1.0) -> Schedule:
    """A Schedule from a diffusers `scheduler_config.json` (a dict, the file, its folder, or a checkpoint root
    holding `scheduler/`); with source None, the defaults and `snr_shift_scale` (3.0 for 2B, 1.0 for 5B).
    Fields missing from the config take the CogVideoX-5B values (the Schedule defaults)."""
    if source is None:
        return Schedule(snr_shift_scale)
    cfg = source
    if not isinstance(cfg, dict):
        root = Path(source)
        candidates = (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json", root)
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"{source}: no scheduler_config.json (give a checkpoint root or the file)"
            )
        cfg = json.loads(found[0].read_text())
    # settings this module does not implement would be silently wrong, so refuse them
    fixed = dict(beta_schedule="scaled_linear", prediction_type="v_prediction", timestep_spacing="trailing")
    fixed |= dict(beta_start=BETA_START, beta_end=BETA_END, num_train_timesteps=T_TRAIN)
    for key, want in (fixed | dict(set_alpha_to_one=True, trained_betas=None)).items():
        if cfg.get(key, want) != want:
            raise ValueError(f"scheduler config has {key}={cfg[key]!r}; only {want!r} is supported")
    return Schedule(cfg.get("snr_shift_scale", 1.0), cfg.get("rescale_betas_zero_snr", True))


def randn(shape: tuple, generator: torch.Generator | None, dtype: torch.dtype, device) -> Tensor:
    """N(0, I) drawn on the generator's device (a CPU generator by convention) and then moved to `device`,
    so one seed gives the same numbers on any machine. generator=None draws from torch's global CPU RNG."""
    where = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, dtype=dtype, device=where).to(device)


def ddim_step(schedule: Schedule, v: Tensor, x: Tensor, t: int, t_prev: int) -> tuple[Tensor, Tensor]:
    """Deterministic DDIM (eta = 0) from t to t_prev: x_prev = c_x x + c_0 x0. Returns (x_prev, x0)."""
    a, a_prev = schedule.alpha(t), schedule.alpha(t_prev)
    x0 = a.sqrt() * x - (1 - a).sqrt() * v
    c_x = ((1 - a_prev) / (1 - a)).sqrt()  # the noise direction keeps its share of x
    c_0 = a_prev.sqrt() - a.sqrt() * c_x
    return c_x * x + c_0 * x0, x0


def dpm_step(
    schedule: Schedule,
    v: Tensor,
    x: Tensor,
    t: int,
    t_prev: int,
    t_back: int | None,
    old_x0: Tensor | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """One step of the stochastic DPM-Solver++(2M) (SDE variant), from t to t_prev. Returns (x_prev, x0).

    With lambda = log sqrt(a / (1 - a)) and h = lambda_prev - lambda_t:
      x_prev = m1 x - m2 D + sigma eps,  m1 = sqrt((1-a_prev)/(1-a_t)) e^-h,  m2 = expm1(-2h) sqrt(a_prev),
      sigma = sqrt(1 - a_prev) sqrt(1 - e^-2h),  D = x0 (first order), or (1 + 1/2r) x0 - 1/2r old_x0 (second
      order, r = (lambda_t - lambda_back) / h, t_back the previous step's timestep).
    At t = 999 (a = 0) lambda = -inf: the IEEE infinities give m1 = 0 and r = inf, i.e. x = sqrt(a_prev) x0 +
    sqrt(1 - a_prev) eps, then D = x0. The first step (no old_x0) and the last (t_prev < 0, where 1/2r is
    infinite) are first order. Noise is drawn in x's dtype; like the reference, a second-order step draws
    twice and uses only the second draw, so the same generator gives the same video.
    """
    a, a_prev = schedule.alpha(t), schedule.alpha(t_prev)
    x0 = a.sqrt() * x - (1 - a).sqrt() * v
    lam = lambda a_: (a_ / (1 - a_)).sqrt().log()  # half the log-SNR
    h = lam(a_prev) - lam(a)
    m1 = ((1 - a_prev) / (1 - a)).sqrt() * (-h).exp()
    m2 = (-2 * h).expm1() * a_prev.sqrt()
    sigma = (1 - a_prev).sqrt() * (1 - (-2 * h).exp()).sqrt()
    x_prev = m1 * x - m2 * x0 + sigma * randn(x.shape, generator, x.dtype, x.device)
    if old_x0 is None or t_prev < 0:
        return x_prev, x0
    r = (lam(a) - lam(schedule.alpha(t_back))) / h
    d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0  # second-order extrapolation of x0
    return m1 * x - m2 * d + sigma * randn(x.shape, generator, x.dtype, x.device), x0


def guidance_scale(g: float, steps: int, t: int, i: int, dynamic: bool, by_index: bool = False) -> float:
    """The CFG weight at step i (timestep t). Dynamic CFG is w = 1 + g (1 - cos(pi ((N - u) / N)^5)) / 2.
    The reference (diffusers, and SAT's DynamicCFG) puts the timestep VALUE in u, which makes w oscillate
    between 1 and 1 + g (the CogVideoX authors call this wave intentional, THUDM/CogVideo#267); by_index=True
    puts the step index i in u, a smooth decay from 1 + g to 1 (diffusers PR #13172)."""
    if not dynamic:
        return g
    u = i if by_index else t
    return 1 + g * (1 - math.cos(math.pi * ((steps - u) / steps) ** 5.0)) / 2


def _pair(neg: Tensor | None, pos: Tensor | None, batch: int) -> Tensor | None:
    """The CFG batch [neg; pos], (2B, ...), each half expanded to the batch; None when both are None."""
    if neg is None or pos is None:
        if neg is not pos:
            raise ValueError("cond and neg_cond must both be tensors or both be None")
        return None
    return torch.cat([neg.expand(batch, *neg.shape[1:]), pos.expand(batch, *pos.shape[1:])])


@torch.no_grad()
def sample(
    model: Callable,
    schedule: Schedule,
    text: Tensor,
    neg_text: Tensor | None,
    shape: tuple,
    steps: int = 50,
    guidance: float = 6.0,
    sampler: str = "dpm",
    dynamic_cfg: bool = False,
    cfg_by_index: bool = False,
    reference_prev: bool = False,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    cond: Tensor | None = None,
    neg_cond: Tensor | None = None,
    model_kwargs: dict | None = None,
    callback: Callable | None = None,
    progress: bool = True,
) -> Tensor:
    """Denoise from pure noise to latents (B, F, C, H, W), as CogVideoXPipeline does.

    model(latents (B', F, C, H, W), text (B', L, D), timestep (B',) int64, cond=..., **model_kwargs) -> v.
    text, neg_text: T5 embeddings (B, L, D); their dtype and device are the latents' (bf16 for 5B: the state
    is re-cast to it after every step, as in the reference). Initial noise: randn(shape, generator,
    text.dtype), drawn on the CPU generator, unless `latents` is given. guidance > 1 runs CFG on the batch
    [neg; pos], v = v_u + w (v_c - v_u) on the fp32 model output; otherwise neg_text may be None. cond goes to
    the conditional half, neg_cond to the unconditional one (None: cond in both, as the DualReal code does).
    sampler: "dpm" (DPM-Solver++(2M) SDE) or "ddim". callback(i, t, latents) runs after every step.
    """
    if sampler not in ("dpm", "ddim"):
        raise ValueError(f"sampler must be 'dpm' or 'ddim', got {sampler!r}")
    dtype, device, batch = text.dtype, text.device, shape[0]
    x = randn(shape, generator, dtype, device) if latents is None else latents.to(device, dtype)
    use_cfg = guidance > 1.0
    if use_cfg and neg_text is None:
        raise ValueError(
            'guidance > 1 needs neg_text, the T5 embedding of the negative prompt ("" by default)'
        )
    if use_cfg:
        neg_cond = cond if neg_cond is None else neg_cond
        text_in, cond_in = _pair(neg_text, text, batch), _pair(neg_cond, cond, batch)
    else:
        text_in, cond_in = text, cond
    timesteps = schedule.timesteps(steps)
    prev = schedule.prev_timesteps(timesteps, reference_prev)
    old_x0 = None  # the previous step's x0, for the second-order DPM update
    for i in tqdm(range(steps), desc="sampling", disable=not progress):
        t = int(timesteps[i])
        x_in = torch.cat([x, x]) if use_cfg else x  # (2B or B, F, C, H, W)
        t_in = torch.full((x_in.shape[0],), t, dtype=torch.long, device=device)
        v = model(x_in, text_in, t_in, cond=cond_in, **(model_kwargs or {})).float()
        if use_cfg:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale(guidance, steps, t, i, dynamic_cfg, cfg_by_index) * (v_c - v_u)
        if sampler == "ddim":
            x, _ = ddim_step(schedule, v, x, t, prev[i])
        else:
            t_back = int(timesteps[i - 1]) if i > 0 else None
            x, old_x0 = dpm_step(schedule, v, x, t, prev[i], t_back, old_x0, generator)
        x = x.to(dtype)
        if callback is not None:
            callback(i, t, x)
    return x
