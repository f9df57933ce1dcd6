"""model.py against diffusers' CogVideoXTransformer3DModel: same weights, same inputs, same outputs."""

import inspect
import json
import os
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
from safetensors.torch import load_file, save_file

import model

TINY = dict(
    num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_embed_dim=32,
    time_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, max_text_seq_length=16,
)  # fmt: skip
VARIANTS = {
    "rope": dict(TINY, use_rotary_positional_embeddings=True),
    "sincos": dict(TINY, use_rotary_positional_embeddings=False),
    # 1.5 slices RoPE from a max grid of sample_size/p (150×150 for the real model): keep our grid inside it
    "1.5": dict(TINY, use_rotary_positional_embeddings=True, patch_size_t=2, sample_width=16),
}


def reference(kwargs: dict) -> CogVideoXTransformer3DModel:
    """A diffusers transformer with every parameter randomised (so norms and gates all matter)."""
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def reference_rope(ref, latent_f: int, latent_h: int, latent_w: int):
    """The RoPE tables diffusers' CogVideoXPipeline builds for this latent shape (None for sin-cos)."""
    if not ref.config.use_rotary_positional_embeddings:
        return None
    pipe = SimpleNamespace(transformer=ref, vae_scale_factor_spatial=8)  # only what the method reads
    h, w = latent_h * 8, latent_w * 8
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(pipe, h, w, latent_f, torch.device("cpu"))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(diffusers model, our model loaded from its sharded save_pretrained folder)."""
    ref = reference(VARIANTS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder / "transformer", max_shard_size="40KB")
    assert os.path.exists(folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    return ref, model.load_transformer(str(folder)).eval(), folder


@pytest.mark.parametrize("frames, n_text", [(1, 16), (4, 16), (4, 7)])
def test_matches_diffusers(pair, frames, n_text):
    """Also with text shorter than max_text_seq_length (16): RoPE skips the text rows actually given. For 2B,
    diffusers' sin-cos table needs all max_text_seq_length text rows (shorter text raises there; its pipeline
    always pads to the max), so that case runs 2B at full length again."""
    ref, ours, _ = pair
    if ref.config.patch_size_t and frames % 2:
        frames += 1
    if not ref.config.use_rotary_positional_embeddings:
        n_text = ref.config.max_text_seq_length
    latent_h, latent_w = 8, 12  # non-square grid: fractional RoPE positions for 1.0
    x = torch.randn(2, frames, 4, latent_h, latent_w)
    text = torch.randn(2, n_text, 32)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        rope = reference_rope(ref, frames, latent_h, latent_w)
        want = ref(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
        got = ours(x, text, t)
    diff = (got - want).abs()
    assert got.shape == want.shape == x.shape
    assert diff.max() <= 1e-5, f"max abs diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_matches_diffusers_through_onednn(tmp_path, monkeypatch):
    """The tiny configs stay under onednn.py's 2^25 threshold; at width 256 and 224 tokens the q/k/v and FFN
    matmuls cross it (x86 CPUs), so the model runs its oneDNN path, forward and backward."""
    import onednn

    if not onednn.AVAILABLE:
        pytest.skip("oneDNN linears run on x86 CPUs only")
    calls, apply = [], onednn.OneDNNLinearFunction.apply

    def counted(*args):
        calls.append(args[0].shape)
        return apply(*args)

    monkeypatch.setattr(onednn.OneDNNLinearFunction, "apply", counted)
    ref = reference(dict(VARIANTS["rope"], num_attention_heads=4, attention_head_dim=64))
    ref.save_pretrained(tmp_path / "transformer")
    ours = model.load_transformer(str(tmp_path)).eval()
    x, text, t = torch.randn(2, 4, 4, 8, 12), torch.randn(2, 16, 32), torch.tensor([999, 17])
    rope = reference_rope(ref, 4, 8, 12)
    want, got = ref(x, text, t, image_rotary_emb=rope, return_dict=False)[0], ours(x, text, t)
    assert len(calls) == 3 * 2, "q/k/v, fc1 and fc2 of both blocks take oneDNN"
    assert (got - want).abs().max() <= 1e-5, f"max abs diff {(got - want).abs().max():.3g}"
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(x_ref, text, t, image_rotary_emb=rope, return_dict=False)[0].square().mean().backward()
    ours(x_ours, text, t).square().mean().backward()
    assert (x_ours.grad - x_ref.grad).abs().max() <= 1e-5 * x_ref.grad.abs().max()


def test_norms_match_diffusers(pair):
    """Every LayerNorm's size, eps and affine flag, as a multiset. An eps off by 10x (1e-5 for the q/k norms'
    1e-6) moves the output by ~4e-6, inside the parity tolerance, so the norms are compared directly."""
    ref, ours, _ = pair
    norms = [[n for n in m.modules() if isinstance(n, torch.nn.LayerNorm)] for m in (ours, ref)]
    ours, ref = [sorted((tuple(n.normalized_shape), n.eps, n.elementwise_affine) for n in ns) for ns in norms]
    assert len(ours) == 10 and ours == ref, (ours, ref)  # 2 blocks x 4 (AdaLN x 2, q, k), final, output


def test_positions_at_480x720_are_integers():
    """At the training size (60×90 latents, 30×45 tokens) RoPE positions are exactly 0..29 and 0..44."""
    t, h, w = model.rope_positions(model.get_config("cogvideox-5b"), 13, 30, 45, "cpu")
    assert torch.equal(h, torch.arange(30.0)) and torch.equal(w, torch.arange(45.0))
    assert torch.equal(t, torch.arange(13.0))


def test_rope_table_matches_reference_at_480x720():
    cfg = model.get_config("cogvideox-5b")
    ref = SimpleNamespace(config=SimpleNamespace(**asdict(cfg)))
    cos, sin = reference_rope(ref, 13, 60, 90)
    ours = model.rope_table(cfg, 13, 30, 45, 226, "cpu")  # (S, 32) complex: one angle per pair of dims
    assert torch.equal(ours[:226], torch.ones(226, 32, dtype=torch.complex64)), "text rows must not rotate"
    assert torch.equal(cos[:, ::2], cos[:, 1::2]) and torch.equal(sin[:, ::2], sin[:, 1::2])  # pairs share θ
    diff = max((ours[226:].real - cos[:, ::2]).abs().max(), (ours[226:].imag - sin[:, ::2]).abs().max())
    assert diff <= 1e-6, f"max abs diff {diff:.3g}"


class ZeroExtension(torch.nn.Module):
    """An extension that checks the shapes it is handed and adds nothing."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def begin(self, tokens, temb, cond):
        self.calls.append(("begin", tuple(tokens.shape), tuple(temb.shape), cond))
        return "ctx"

    def hook(self, i, ctx):
        def branch(kind, h):
            self.calls.append((i, kind, tuple(h.shape), ctx))
            return torch.zeros_like(h)

        return branch


def test_default_size_is_the_trained_resolution():
    """sample.py, train.py and eval.py default to it. 1.5's config says 300x300 latents, the bound of its RoPE
    grid: diffusers' pipeline then defaults to 2400x2400 pixels; CogVideoX 1.5 was trained at 768x1360."""
    sizes = {name: model.get_config(name).default_size for name in ("cogvideox-2b", "cogvideox-5b")}
    assert sizes == {"cogvideox-2b": (480, 720), "cogvideox-5b": (480, 720)}
    assert model.get_config("cogvideox1.5-5b").default_size == (768, 1360)


def test_extension_point_contract_and_no_op_is_bitwise():
    m = model.load_transformer("tiny")
    x, text, t = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 16, 32), torch.tensor([3, 900])
    base = m(x, text, t)
    m.ext = ZeroExtension()
    out = m(x, text, t, cond="e")
    assert torch.equal(out, base), "a zero branch must leave the output bitwise unchanged"
    s = 16 + 3 * 4 * 4
    assert m.ext.calls[0] == ("begin", (2, s, 32), (2, 32), "e")
    assert m.ext.calls[1:] == [(i, k, (2, s, 32), "ctx") for i in range(2) for k in ("attn", "ff")]


def test_branch_reads_the_sub_layer_input_and_is_gated():
    """The extension point's placement (adapters.py: the official code's): a branch reads the normalised,
    AdaLN-modulated h its sub-layer reads, and its delta joins the sub-layer output before the AdaLN gate."""
    m = model.load_transformer("tiny")
    x, text, t = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 16, 32), torch.tensor([3, 900])
    inputs, given = {}, {}
    for i, block in enumerate(m.blocks):  # what each sub-layer reads: attention and the first FFN matmul
        block.attn.register_forward_pre_hook(lambda mod, args, i=i: inputs.update({(i, "attn"): args[0]}))
        block.fc1.register_forward_pre_hook(lambda mod, args, i=i: inputs.update({(i, "ff"): args[0]}))

    class Ones(ZeroExtension):
        def hook(self, i, ctx):
            return lambda kind, h: (given.update({(i, kind): h}), torch.ones_like(h))[1]

    base = m(x, text, t)
    m.ext = Ones()
    assert not torch.equal(m(x, text, t), base), "a non-zero branch must change the output"
    assert given.keys() == inputs.keys() and all(torch.equal(given[k], inputs[k]) for k in inputs)
    with torch.no_grad():  # every gate (chunks 2 and 5 of each AdaLN's 6: video, text) to 0
        for norm in [b.norm1 for b in m.blocks] + [b.norm2 for b in m.blocks]:
            d = m.config.inner_dim
            for rows in (slice(2 * d, 3 * d), slice(5 * d, 6 * d)):
                norm.mod.weight[rows], norm.mod.bias[rows] = 0.0, 0.0
    gated = m(x, text, t)
    m.ext = None
    assert torch.equal(gated, m(x, text, t)), "a gate of 0 must silence the sub-layer and its branch alike"


def test_gradient_checkpointing_gives_same_output_and_grads(monkeypatch):
    m = model.load_transformer("tiny")
    x, text, t = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 16, 32), torch.tensor([500])
    calls, real = [], model.grad_checkpoint

    def counting(block, *args, **kwargs):
        calls.append(block)
        return real(block, *args, **kwargs)

    monkeypatch.setattr(model, "grad_checkpoint", counting)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.grad_checkpointing = ckpt
        calls.clear()
        out = m(x, text, t)
        out.square().mean().backward()
        want = list(m.blocks) if ckpt else []
        assert calls == want, f"grad_checkpointing={ckpt}: checkpointed {len(calls)} blocks, want {len(want)}"
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    out_diff = (grads[0][0] - grads[1][0]).abs().max()
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6), f"output max abs diff {out_diff:.3g}"
    worst = max((a - b).abs().max() for a, b in zip(grads[0][1], grads[1][1]))
    assert worst <= 1e-6, f"grad max abs diff {worst:.3g}"


@pytest.mark.parametrize("name", ["cogvideox-2b", "cogvideox-5b", "cogvideox1.5-5b"])
def test_full_size_keys_and_shapes(name):
    """Every key of the real diffusers model maps onto our parameters with the right shape (meta device)."""
    cfg = model.get_config(name)
    accepted = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters
    kwargs = {k: v for k, v in asdict(cfg).items() if k in accepted}
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**kwargs)
        ours = model.CogVideoXTransformer(cfg)
    ref_state = ref.state_dict()
    state = model.convert_checkpoint(ref_state, cfg)
    our_state = ours.state_dict()
    assert set(state) == set(our_state)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in our_state.items()}
    counts = {"cogvideox-2b": 1_693_783_872, "cogvideox-5b": 5_570_283_072, "cogvideox1.5-5b": 5_570_676_352}
    assert sum(p.numel() for p in ours.parameters()) == counts[name]
    assert len(ref_state) == {"cogvideox-2b": 736}.get(name, 1024)


def test_bf16_forward_close_to_fp32(pair):
    """bf16 weights and activations stay within 3% of the output scale of the fp32 forward."""
    ref, ours, folder = pair
    ours16 = model.load_transformer(str(folder), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours16.parameters())
    x, text, t = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 16, 32), torch.tensor([400])
    with torch.no_grad():
        want = ours(x, text, t)
        got = ours16(x.bfloat16(), text.bfloat16(), t).float()
    rel = (got - want).abs().max() / want.abs().max()
    assert rel <= 0.03, f"bf16 vs fp32: max abs diff / max abs = {rel:.3g}"


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def saved(tmp_path):
    reference(VARIANTS["rope"]).save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    return tmp_path / "transformer"


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        model.load_transformer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model.load_transformer(str(tmp_path))


def test_missing_shard(saved):
    shards = sorted(saved.glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shards[-1].name} .* is missing"):
        model.load_transformer(str(saved))


def test_truncated_safetensors(saved):
    shard = sorted(saved.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        model.load_transformer(str(saved))


def test_wrong_shape(saved):
    index = json.loads((saved / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = saved / index["weight_map"]["proj_out.weight"]
    tensors = load_file(shard)
    tensors["proj_out.weight"] = torch.zeros(3, 3)
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): proj_out.weight: checkpoint \(3, 3\)"):
        model.load_transformer(str(saved))


@pytest.mark.parametrize(
    "extra, error",
    [("extra.weight", "keys this model does not use: extra.weight"),
     (None, r"does not fit this model: missing keys \(1\): norm_final.bias$")],
    ids=["unexpected", "missing"],
)  # fmt: skip
def test_missing_or_unexpected_key(saved, extra, error):
    """A renamed key fails on the unused name (convert_checkpoint); a removed one in assign_strict."""
    index = json.loads((saved / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shard = saved / index["weight_map"]["norm_final.bias"]
    tensors = load_file(shard)
    bias = tensors.pop("norm_final.bias")
    if extra is not None:
        tensors[extra] = bias
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=error):
        model.load_transformer(str(saved))


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown model config 'cogvideox-7b'; known configs: cogvideox-2b"):
        model.get_config("cogvideox-7b")
    with pytest.raises(FileNotFoundError, match="no folder 'cogvideox-7b'"):
        model.load_transformer("cogvideox-7b")


def test_image_to_video_config_rejected(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps(dict(cfg, use_learned_positional_embeddings=True)))
    with pytest.raises(ValueError, match="image-to-video checkpoints are not supported"):
        model.load_transformer(str(saved))


def test_bad_latent_shapes():
    m = model.load_transformer("tiny")
    text, t = torch.randn(1, 16, 32), torch.tensor([1])
    with pytest.raises(ValueError, match="latents must be"):
        m(torch.randn(1, 2, 3, 8, 8), text, t)
    with pytest.raises(ValueError, match="divisible by 2"):
        m(torch.randn(1, 2, 4, 7, 8), text, t)
    with pytest.raises(ValueError, match="text must be"):
        m(torch.randn(1, 2, 4, 8, 8), torch.randn(1, 16, 8), t)
