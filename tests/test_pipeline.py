"""sample.py end to end against diffusers' CogVideoXPipeline (the oracle): same weights, same video.

diffusers builds a tiny transformer (random weights, every parameter perturbed so that norms and gates
matter), a tiny VAE and the 2B scheduler config (SNR shift 3: a schedule that ignored the file would fail),
and saves them as a checkpoint root. Ours loads that root with model.load_transformer, vae.load_vae and
sample.load_schedule, then runs sample.sample_latents + sample.decode_video exactly as sample.py does. Both
get the same T5 embeddings and the same seeded CPU generator; the pipeline runs without a tokenizer or text
encoder (reference/cogvideox.md §7) and returns (x * 0.5 + 0.5).clamp(0, 1): we compare in that space.
"""

import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXDPMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)

import checkpoint
import diffusion
import model
import sample
import vae

# fp32 on CPU. Measured max |diff| (any thread count): 1.4e-6 to 3.3e-6 with dynamic CFG, 4.0e-6 (DDIM) and
# 5.2e-6 (DPM) with static CFG 6, which scales the rounding of every step most; 2e-5 leaves ~4x on the worst.
TOL = 2e-5
FRAMES, HEIGHT, WIDTH, STEPS, SEED = 9, 32, 48, 4, 42  # latents (1, 3, 4, 4, 6): a 2 x 3 token grid per frame
TINY = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_embed_dim=32,
    time_embed_dim=32, num_layers=2, sample_height=8, sample_width=12, sample_frames=9,
    max_text_seq_length=16,
)  # fmt: skip
VARIANTS = {  # transformer configs: 5B-style RoPE, 2B-style sin-cos, 1.5-style temporal patches
    "rope": dict(TINY, use_rotary_positional_embeddings=True),
    "sincos": dict(TINY, use_rotary_positional_embeddings=False),
    "1.5": dict(TINY, use_rotary_positional_embeddings=True, patch_size_t=2, sample_width=16),
}
SCHEDULER = dict(  # CogVideoX-2B's shipped scheduler_config.json (reference/cogvideox.md §4.1)
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
    set_alpha_to_one=True, snr_shift_scale=3.0, steps_offset=0, timestep_spacing="trailing",
)  # fmt: skip
TINY_VAE = vae.CONFIGS["tiny"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (checkpoint root written by diffusers, its transformer, its VAE), built once per variant."""
    built = {}

    def get(variant: str):
        if variant not in built:
            built[variant] = build(VARIANTS[variant], tmp_path_factory.mktemp(f"ckpt-{variant}"))
        return built[variant]

    return get


def build(transformer_config: dict, root):
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel(**transformer_config).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    autoencoder = AutoencoderKLCogVideoX(
        block_out_channels=TINY_VAE.block_out_channels,
        latent_channels=TINY_VAE.latent_channels,
        layers_per_block=TINY_VAE.layers_per_block,
        norm_num_groups=TINY_VAE.norm_num_groups,
        scaling_factor=0.7,
    ).eval()
    with torch.no_grad():  # the VAE's norms init to weight 1, bias 0: perturb them (and the biases)
        for p in [p for p in autoencoder.parameters() if p.ndim == 1]:
            p.add_(torch.randn_like(p) * 0.1)
    transformer.save_pretrained(root / "transformer")
    autoencoder.save_pretrained(root / "vae")
    CogVideoXDDIMScheduler(**SCHEDULER).save_pretrained(root / "scheduler")
    return root, transformer, autoencoder


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins for the T5 embeddings of the prompt and the negative prompt, (1, 16, 32) each."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)


def reference_video(ckpt, sampler: str, dynamic: bool) -> torch.Tensor:
    root, transformer, autoencoder = ckpt
    cls = CogVideoXDPMScheduler if sampler == "dpm" else CogVideoXDDIMScheduler
    scheduler = cls.from_pretrained(root, subfolder="scheduler")
    pipe = CogVideoXPipeline(
        tokenizer=None, text_encoder=None, vae=autoencoder, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    text, neg = embeddings()
    return pipe(
        prompt_embeds=text, negative_prompt_embeds=neg, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
        num_inference_steps=STEPS, guidance_scale=6.0, use_dynamic_cfg=dynamic, max_sequence_length=16,
        generator=torch.Generator().manual_seed(SEED), output_type="pt",
    ).frames  # (1, T, 3, H, W) in [0, 1]  # fmt: skip


def our_video(ckpt, sampler: str, dynamic: bool) -> torch.Tensor:
    root = str(ckpt[0])
    transformer, autoencoder = model.load_transformer(root).eval(), vae.load_vae(root)
    text, neg = embeddings()
    schedule = diffusion.load_schedule(checkpoint.find_scheduler(root))
    latents = sample.sample_latents(
        transformer, schedule, text, neg, FRAMES, HEIGHT, WIDTH, steps=STEPS, guidance=6.0,
        sampler=sampler, dynamic_cfg=dynamic, generator=torch.Generator().manual_seed(SEED), progress=False,
    )  # fmt: skip
    video = sample.decode_video(autoencoder, latents)  # (1, 3, T, H, W) in [-1, 1]
    return (video * 0.5 + 0.5).transpose(1, 2)  # (1, T, 3, H, W) in [0, 1], the pipeline's layout


# every sampler and CFG mode on the 5B-style model; the other variants once (the loop is the same)
CASES = [("rope", s, d) for s in ("ddim", "dpm") for d in (False, True)]
CASES += [("sincos", "dpm", True), ("1.5", "dpm", True)]


@pytest.mark.parametrize(
    "variant,sampler,dynamic", CASES, ids=[f"{v}-{s}-{'dynamic' if d else 'static'}" for v, s, d in CASES]
)
def test_video_matches_diffusers_pipeline(checkpoints, variant, sampler, dynamic):
    ckpt = checkpoints(variant)
    want, got = reference_video(ckpt, sampler, dynamic), our_video(ckpt, sampler, dynamic)
    assert got.shape == want.shape == (1, FRAMES, 3, HEIGHT, WIDTH), (
        f"{tuple(got.shape)} vs {tuple(want.shape)}"
    )
    inside = ((want > 0) & (want < 1)).float().mean()
    assert inside > 0.5, (
        f"only {inside:.0%} of the reference pixels are unclamped: the comparison would be weak"
    )
    diff = (got - want).abs()
    assert diff.max() <= TOL, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g} (tol {TOL})"
