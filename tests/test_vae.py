"""vae.py against diffusers' AutoencoderKLCogVideoX (the oracle) with the same random weights.

The diffusers model is built with a fixed seed, saved with `save_pretrained`, and loaded by our `load_vae`.
Everything runs on CPU in fp32 on the tiny config; the key-coverage test builds the full-size VAE on meta.
"""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from safetensors.torch import load_file, save_file

import vae

TOL = 0.0  # bit for bit: the same ops in the same order
TINY = vae.CONFIGS["tiny"]
SCALE = 0.7  # the 5B value, written into the saved config.json (tiny's default is diffusers' 1.15258426)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours.float() - ref.float()).abs()
    assert diff.max() <= tol, f"{what}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g} (tol {tol})"


def video(frames: int, h: int = 16, w: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def latents(frames: int, h: int = 2, w: int = 3, seed: int = 0) -> torch.Tensor:  # (B, F, C, h, w)
    return torch.randn(1, frames, TINY.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint root holding vae/ (diffusers' folder layout), written by diffusers itself."""
    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(
        block_out_channels=TINY.block_out_channels,
        latent_channels=TINY.latent_channels,
        layers_per_block=TINY.layers_per_block,
        norm_num_groups=TINY.norm_num_groups,
        scaling_factor=SCALE,
    )
    with torch.no_grad():  # norms init to weight 1, bias 0, where a misused affine is invisible; biases too
        for p in [p for p in ref.parameters() if p.ndim == 1]:
            p.add_(torch.randn_like(p) * 0.1)
    root = tmp_path_factory.mktemp("ckpt")
    ref.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def ref(ckpt):
    return AutoencoderKLCogVideoX.from_pretrained(ckpt / "vae").eval()


@pytest.fixture
def ours(ckpt):
    return vae.load_vae(ckpt)  # function scope: tests may flip `chunked` / `tiling`


def ref_posterior(ref, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    return dist.mean.transpose(1, 2), dist.logvar.transpose(1, 2)  # (B, F, C, h, w) like ours


def ref_decode(ref, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref.decode(z.transpose(1, 2) / SCALE).sample


# ------------------------------------------------------------------------------------ parity (chunked path)


@pytest.mark.parametrize("frames", [1, 9, 17, 33])
def test_posterior_mean_matches_diffusers(ours, ref, frames):
    x = video(frames)
    assert_close(ours.encode_posterior(x)[0], ref_posterior(ref, x)[0], f"mean, {frames} frames")


@pytest.mark.parametrize("frames", [1, 9, 17, 33])
def test_posterior_logvar_matches_diffusers(ours, ref, frames):
    x = video(frames)
    assert_close(ours.encode_posterior(x)[1], ref_posterior(ref, x)[1], f"logvar, {frames} frames")


def test_logvar_is_clamped_to_minus30_20(ours):
    c = TINY.latent_channels
    with torch.no_grad():  # push logvar far out of range: up in 2 channels, down in the rest
        ours.encoder.conv_out.conv.bias[c : c + 2] += 1e4
        ours.encoder.conv_out.conv.bias[c + 2 :] -= 1e4
    logvar = ours.encode_posterior(video(5))[1]
    assert (logvar[:, :, :2] == 20).all() and (logvar[:, :, 2:] == -30).all(), (logvar.amax(), logvar.amin())


def test_sample_matches_diffusers_with_same_generator(ours, ref):
    x = video(9)
    with torch.no_grad():
        want = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(7)) * SCALE
    got = ours.encode(x, generator=torch.Generator().manual_seed(7))
    assert_close(got, want.transpose(1, 2), "scaled posterior sample")


@pytest.mark.parametrize("frames", [1, 3, 5, 9])
def test_decode_matches_diffusers(ours, ref, frames):
    z = latents(frames)
    assert_close(ours.decode(z), ref_decode(ref, z), f"decode, {frames} latent frames")


def test_encode_chunks_are_9_then_8s_and_decode_chunks_3_then_2s(ours):
    seen = {"enc": [], "dec": []}
    ours.encoder.register_forward_hook(lambda m, args, out: seen["enc"].append(args[0].shape[2]))
    ours.decoder.register_forward_hook(lambda m, args, out: seen["dec"].append(args[0].shape[2]))
    ours.encode_posterior(video(33, 16, 16))
    ours.decode(latents(7, 2, 2))
    assert seen == {"enc": [9, 8, 8, 8], "dec": [3, 2, 2]}, seen


# ------------------------------------------------------------------------------------------- whole clip


def test_whole_clip_encode_matches_diffusers_encoder(ours, ref):
    x = video(17)
    with torch.no_grad():
        moments, _ = ref.encoder(x)  # one call on the whole clip, no cache
    ours.chunked = False
    mean = ours.encode_posterior(x)[0]
    assert_close(mean, moments[:, : TINY.latent_channels].transpose(1, 2), "whole-clip posterior mean")


def test_whole_clip_decode_matches_diffusers_decoder(ours, ref):
    z = latents(5)
    with torch.no_grad():
        want, _ = ref.decoder(z.transpose(1, 2) / SCALE)
    ours.chunked = False
    assert_close(ours.decode(z), want, "whole-clip decode")


def test_whole_clip_differs_from_chunked(ours):
    """GroupNorm statistics are per chunk, so the switch must change the numbers."""
    x = video(17)
    chunked = ours.encode_posterior(x)[0]
    ours.chunked = False
    diff = (ours.encode_posterior(x)[0] - chunked).abs().max()
    assert diff > 1e-3, f"whole-clip and chunked encodes agree to {diff:.3g}: the flag does nothing"


def test_time_split_of_large_convs_is_exact(ours, monkeypatch):
    ours.chunked = False
    z = latents(5)
    want = ours.decode(z)
    # 3x3x3 convs in up_blocks 1-3 and conv_out now run in 3-17 time pieces (up to one per output frame);
    # those at latent size (2x3: conv_in, mid block, up_blocks.0) are too small to split and stay whole
    monkeypatch.setattr(vae, "CONV_MAX_NUMEL", 2000)
    assert_close(ours.decode(z), want, "decode with split convs", tol=1e-5)


# ---------------------------------------------------------------------------------------------- tiling

TILING = vae.Tiling(sample_height=48, sample_width=40)  # latent tiles 6x5, blends of 8 px / 1 latent


def test_tiled_decode_matches_diffusers(ours, ref):
    z = latents(3, 8, 8)  # 2x2 tiles
    ref.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)
    try:
        want = ref_decode(ref, z)
    finally:
        ref.disable_tiling()
    ours.tiling = TILING
    assert_close(ours.decode(z), want, "tiled decode")


def test_tiled_encode_matches_diffusers(ours, ref):
    x = video(9, 64, 64)
    ref.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)
    try:
        want = ref_posterior(ref, x)[0]
    finally:
        ref.disable_tiling()
    ours.tiling = TILING
    assert_close(ours.encode_posterior(x)[0], want, "tiled encode mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_decode_is_bitwise_with_blends_that_are_not_powers_of_two(ckpt, dtype):
    """72-px tiles blend over 12 px: weights y/12 are inexact in binary. diffusers multiplies by Python floats
    (1 - y/12 taken in double, then used in fp32); 1 - w in fp32, or w in bf16, was 2e-7 (fp32) and 0.016
    (bf16) off."""
    ref = AutoencoderKLCogVideoX.from_pretrained(ckpt / "vae", torch_dtype=dtype).eval()
    ours = vae.load_vae(ckpt, dtype)
    z = latents(3, 12, 12).to(dtype)  # 2x2 tiles of 9 latents, a step of 7
    ref.enable_tiling(tile_sample_min_height=72, tile_sample_min_width=72)
    ours.tiling = vae.Tiling(sample_height=72, sample_width=72)
    assert torch.equal(ours.decode(z), ref_decode(ref, z))


def test_tiling_changes_the_numbers(ours):
    z = latents(3, 8, 8)
    untiled = ours.decode(z)
    ours.tiling = TILING
    diff = (ours.decode(z) - untiled).abs().max()
    assert diff > 1e-3, f"tiled and untiled decodes agree to {diff:.3g}: no tiles were used"


def test_tiling_is_skipped_when_one_tile_covers_the_input(ours):
    z = latents(3)
    untiled = ours.decode(z)
    ours.tiling = vae.Tiling()  # 240x360 default: larger than 16x24
    assert torch.equal(ours.decode(z), untiled)


# -------------------------------------------------------------------------------------------- scaling


def test_encode_multiplies_by_scaling_factor_from_config(ours):
    assert ours.config.scaling_factor == SCALE
    x = video(9)
    mean, _ = ours.encode_posterior(x)
    assert_close(ours.encode(x, sample=False), mean * SCALE, "encode(sample=False) vs mean * scaling_factor")


def test_decode_divides_by_scaling_factor_from_config(ckpt, tmp_path, ours):
    folder = shutil.copytree(ckpt / "vae", tmp_path / "vae")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["scaling_factor"] = 1.15258426  # the 2B value
    (folder / "config.json").write_text(json.dumps(cfg))
    other = vae.load_vae(folder)
    assert other.config.scaling_factor == 1.15258426
    z = latents(3)
    want = ours.decode(z * SCALE)  # up to rounding: z * s / s is not z
    assert_close(other.decode(z * 1.15258426), want, "decode(z * s) / s is s-independent", tol=1e-5)


# ------------------------------------------------------------------------------------- loader and keys


def test_full_size_keys_and_shapes_match_diffusers():
    with torch.device("meta"):
        ref = AutoencoderKLCogVideoX()
        ours = vae.CogVideoXVAE(vae.CONFIGS["cogvideox-5b"])
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(got) == 436, len(got)
    only_ours, only_ref = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
    assert got == want, f"only ours: {only_ours[:5]}, only diffusers: {only_ref[:5]}"
    assert sum(p.numel() for p in ours.parameters()) == 215_583_907


def test_load_from_root_and_vae_folder_and_bf16(ckpt):
    a, b = vae.load_vae(ckpt), vae.load_vae(ckpt / "vae", dtype=torch.bfloat16)
    assert b.decoder.conv_out.conv.weight.dtype == torch.bfloat16
    assert all(torch.equal(p.bfloat16(), q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_tiny_is_seeded_and_has_real_compression():
    a, b = vae.load_vae("tiny"), vae.load_vae("tiny")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    z = a.encode(video(9, 16, 16), generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 3, 4, 2, 2), z.shape  # 8x space, 4x time, 4 channels
    assert a.decode(z).shape == (1, 3, 9, 16, 16)


@pytest.mark.parametrize(
    "x, message",
    [
        (video(8), "4k+1"),
        (video(9, 20, 24), "not divisible by 8"),
        (torch.zeros(1, 4, 9, 16, 16), "channels"),
        (torch.zeros(1, 3, 9, 16, 16, dtype=torch.uint8), "float"),
        (torch.zeros(3, 9, 16, 16), "(B, 3, T, H, W)"),
    ],
)
def test_bad_video_is_a_clear_error(ours, x, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        ours.encode(x)


@pytest.mark.parametrize(
    "z, message",
    [(torch.zeros(1, 3, 16, 2, 2), "channels"), (torch.zeros(1, 3, 4, 2, 2, dtype=torch.int64), "float")],
)
def test_bad_latents_are_a_clear_error(ours, z, message):
    with pytest.raises(ValueError, match=message):
        ours.decode(z)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        vae.load_vae(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        vae.load_vae(tmp_path)


def test_unknown_hub_id_offline_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="cannot download"):
        vae.load_vae("no-such-org/no-such-vae")


def _edited_copy(ckpt, tmp_path, edit) -> str:
    folder = shutil.copytree(ckpt / "vae", tmp_path / "vae")
    file = folder / "diffusion_pytorch_model.safetensors"
    state = dict(load_file(file))
    edit(state)
    save_file(state, file)
    return folder


def test_missing_key_is_named(ckpt, tmp_path):
    folder = _edited_copy(ckpt, tmp_path, lambda s: s.pop("decoder.conv_out.conv.bias"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.conv_out.conv.bias"):
        vae.load_vae(folder)


def test_wrong_shape_is_named(ckpt, tmp_path):
    def edit(s):
        s["encoder.conv_in.conv.bias"] = torch.zeros(7)

    expected = r"wrong shapes \(1\): encoder.conv_in.conv.bias: checkpoint \(7,\) vs model \(8,\)"
    with pytest.raises(ValueError, match=expected):
        vae.load_vae(_edited_copy(ckpt, tmp_path, edit))


def test_unexpected_key_is_named(ckpt, tmp_path):
    def edit(s):
        s["encoder.quant_conv.weight"] = torch.zeros(1)

    with pytest.raises(ValueError, match=r"unexpected keys \(1\): encoder.quant_conv.weight"):
        vae.load_vae(_edited_copy(ckpt, tmp_path, edit))


def test_truncated_safetensors_is_a_clear_error(ckpt, tmp_path):
    folder = shutil.copytree(ckpt / "vae", tmp_path / "vae")
    file = folder / "diffusion_pytorch_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        vae.load_vae(folder)


def test_bf16_encode_and_decode_run_on_the_cpu(ckpt):
    """train.py --dtype bf16 on a CPU encodes in bf16 (its time compression averages frame pairs without
    avg_pool3d, which the CPU lacks in bf16) and agrees with fp32 to bf16's precision."""
    full, half = vae.load_vae(ckpt), vae.load_vae(ckpt, dtype=torch.bfloat16)
    x = video(9)
    mean, mean16 = full.encode_posterior(x)[0], half.encode_posterior(x.bfloat16())[0]
    assert mean16.dtype == torch.bfloat16 and mean16.shape == mean.shape
    assert_close(mean16.float(), mean, "bf16 posterior mean", tol=0.05 * mean.abs().max().item())
    assert half.decode(mean16).shape == (1, 3, 9, 16, 24)
