"""encoders.py: T5 tokenization and encoding against transformers and CogVideoXPipeline.encode_prompt, and the
CLIP preprocessing and embedder against transformers' CLIP classes. All tiny, offline, on CPU."""

import io

import pytest
import sentencepiece as spm
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, T5Tokenizer

import encoders

L = 16  # the tiny transformer's max_text_seq_length
PROMPTS = ["a sks dog playing guitar", "", "a  cat,   riding a skateboard!", "the dog " * 20]


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = (a.double() - b.double()).abs()
    return f"max abs diff {d.max().item():.3e}, mean {d.mean().item():.3e}"


@pytest.fixture(scope="module")
def text_encoder():
    return encoders.load_text_encoder("tiny")


def transformers_tokenizer(tok: encoders.Tokenizer) -> T5Tokenizer:
    """transformers v5's T5Tokenizer over the same vocabulary (pieces and scores: no protobuf needed)."""
    vocab = [(tok.sp.id_to_piece(i), tok.sp.get_score(i)) for i in range(tok.vocab_size)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def test_tokenizer_closes_with_eos_and_pads_to_max_length(text_encoder):
    ids = text_encoder.tokenizer(["a sks dog", ""], L)
    n = len(text_encoder.tokenizer.sp.encode("a sks dog"))
    assert ids.shape == (2, L) and ids[0, n] == 1 and (ids[0, n + 1 :] == 0).all(), ids
    assert ids[1].tolist() == [1] + [0] * (L - 1), ids[1]  # "" -> </s> then pads


def test_tokenizer_truncation_keeps_eos_and_warns(text_encoder):
    with pytest.warns(UserWarning, match=r"prompt cut to 7 of its \d+ tokens, dropping"):
        ids = text_encoder.tokenizer([PROMPTS[-1]], 8)[0]
    assert ids.tolist() == text_encoder.tokenizer.sp.encode(PROMPTS[-1])[:7] + [1], ids


@pytest.mark.filterwarnings("ignore:prompt cut")  # long prompts on purpose
def test_tokenizer_matches_transformers_t5_tokenizer(text_encoder):
    ref = transformers_tokenizer(text_encoder.tokenizer)
    want = ref(PROMPTS, padding="max_length", max_length=L, truncation=True, add_special_tokens=True)
    got = text_encoder.tokenizer(PROMPTS, L)
    assert got.tolist() == want.input_ids, (got.tolist(), want.input_ids)


def test_tokenizer_refuses_a_non_t5_vocabulary():
    writer = io.BytesIO()  # sentencepiece's default layout: <unk> 0, <s> 1, </s> 2
    corpus = iter(encoders.TINY_CORPUS)
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus, model_writer=writer, vocab_size=40, minloglevel=2
    )
    with pytest.raises(ValueError, match="T5"):
        encoders.Tokenizer(writer.getvalue())


def test_tiny_encode_shape(text_encoder):
    out = text_encoder.encode(PROMPTS, max_length=L)
    assert out.shape == (len(PROMPTS), L, 32) and out.dtype == torch.float32 and out.isfinite().all()


def test_tiny_text_encoder_is_deterministic(text_encoder):
    again = encoders.load_text_encoder("tiny")
    a, b = text_encoder.encode(PROMPTS, L), again.encode(PROMPTS, L)
    assert torch.equal(a, b), diff(a, b)


@pytest.mark.filterwarnings("ignore:prompt cut")  # long prompts on purpose
def test_encode_is_t5_called_without_attention_mask(text_encoder):
    ids = text_encoder.tokenizer(PROMPTS, L)
    want = text_encoder.t5(input_ids=ids).last_hidden_state
    masked = text_encoder.t5(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    got = text_encoder.encode(PROMPTS, L)
    assert torch.equal(got, want) and not torch.allclose(got, masked, atol=1e-3), diff(got, want)


def test_encode_matches_cogvideox_pipeline_encode_prompt(text_encoder):
    from diffusers import CogVideoXPipeline

    tok = transformers_tokenizer(text_encoder.tokenizer)
    pipe = CogVideoXPipeline(
        tokenizer=tok, text_encoder=text_encoder.t5, vae=None, transformer=None, scheduler=None
    )
    pos, neg = pipe.encode_prompt(PROMPTS[:1], None, True, max_sequence_length=L, device=torch.device("cpu"))
    got = text_encoder.encode([PROMPTS[0], ""], L)  # the pipeline's default negative prompt is ""
    want = torch.cat([pos, neg])
    assert torch.equal(got, want), diff(got, want)


def test_text_encoder_loads_from_a_checkpoint_root(text_encoder, tmp_path):
    text_encoder.t5.save_pretrained(tmp_path / "text_encoder")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "spiece.model").write_bytes(text_encoder.tokenizer.sp.serialized_model_proto())
    got, want = encoders.load_text_encoder(str(tmp_path)).encode(PROMPTS, L), text_encoder.encode(PROMPTS, L)
    assert torch.equal(got, want), diff(got, want)


def test_text_encoder_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        encoders.load_text_encoder(str(tmp_path))


@pytest.mark.parametrize("hw", [(300, 500), (500, 300), (100, 120), (224, 224)])
def test_clip_preprocess_shape(hw):
    x = torch.randint(0, 256, (2, 3, *hw), dtype=torch.uint8)
    assert encoders.clip_preprocess(x).shape == (2, 3, 224, 224)


def test_clip_preprocess_normalizes_a_constant_image_exactly():
    x = torch.full((1, 3, 300, 400), 128, dtype=torch.uint8)
    want = ((128 / 255 - torch.tensor(encoders.CLIP_MEAN)) / torch.tensor(encoders.CLIP_STD)).view(1, 3, 1, 1)
    got = encoders.clip_preprocess(x)
    assert torch.allclose(got, want.expand_as(got), atol=1e-6), diff(got, want.expand_as(got))


@pytest.mark.parametrize("landscape", [True, False])
def test_clip_preprocess_crops_instead_of_stretching(landscape):
    # a 100 x 200 image whose middle 120 columns are 200 and the rest 0: the center crop sees only the middle
    x = torch.zeros(1, 3, 100, 200, dtype=torch.uint8)
    x[..., 40:160] = 200
    x = x if landscape else x.transpose(-1, -2)
    got = encoders.clip_preprocess(x)
    want = encoders.clip_preprocess(torch.full((1, 3, 224, 224), 200, dtype=torch.uint8))
    assert torch.allclose(got, want, atol=1e-5), diff(got, want)


def test_clip_preprocess_uint8_and_unit_float_agree():
    x = torch.randint(0, 256, (2, 3, 250, 320), dtype=torch.uint8)
    a, b = encoders.clip_preprocess(x), encoders.clip_preprocess(x.float() / 255)
    assert torch.allclose(a, b, atol=1e-6), diff(a, b)


def test_clip_preprocess_matches_clip_image_processor_on_a_smooth_image():
    # PIL resizes in 8 bits (rounding) with a bicubic a = -0.5 where torch uses a = -0.75: on smooth content
    # (and on photos) they agree to 2 gray levels; at hard synthetic edges they differ by a few more
    from PIL import Image
    from transformers import CLIPImageProcessor

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 9, 13, generator=g)
    img = (torch.nn.functional.interpolate(x, size=(333, 517), mode="bilinear") * 255).round().to(torch.uint8)
    crop = {"height": 224, "width": 224}
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=crop, resample=Image.Resampling.BICUBIC)
    want = proc(images=Image.fromarray(img[0].permute(1, 2, 0).numpy()), return_tensors="pt").pixel_values
    got = encoders.clip_preprocess(img)
    level = 1 / 255 / min(encoders.CLIP_STD)  # one gray level, normalized
    assert (got - want).abs().max() <= 2 * level, diff(got, want)


def test_tiny_image_embed_shape_and_determinism():
    frames = torch.randint(0, 256, (3, 3, 48, 64), dtype=torch.uint8)
    a, b = (
        encoders.load_image_encoder("tiny").embed(frames),
        encoders.load_image_encoder("tiny").embed(frames),
    )
    assert a.shape == (3, 32) and a.dtype == torch.float32 and torch.equal(a, b), diff(a, b)


def tiny_clip_model() -> CLIPModel:
    vision = {k: v for k, v in encoders.TINY_CLIP.items() if k != "projection_dim"}
    text = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99
    )
    torch.manual_seed(1)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()


def test_image_encoder_loads_a_full_clip_checkpoint_unnormalized(tmp_path):
    # laion's repository is a whole CLIPModel whose projection_dim sits on the top-level config
    full = tiny_clip_model()
    full.save_pretrained(tmp_path)
    enc = encoders.load_image_encoder(str(tmp_path))
    frames = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)
    with torch.no_grad():
        pooled = full.vision_model(pixel_values=encoders.clip_preprocess(frames, 32)).pooler_output
        want = full.visual_projection(
            pooled
        )  # CLIPModel.forward would L2-normalize this; e is not normalized
    got = enc.embed(frames)
    assert enc.dim == 24 and torch.allclose(got, want, atol=1e-6), diff(got, want)


def test_image_encoder_refuses_a_checkpoint_without_projection(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(**encoders.TINY_CLIP)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        encoders.load_image_encoder(str(tmp_path))


@pytest.mark.parametrize("name", ["missing", "no/such/clip", "./clip"])
def test_image_encoder_names_a_mistyped_path(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # relative names resolve here: none of them exists
    with pytest.raises(FileNotFoundError, match=f"{name}: no such folder"):
        encoders.load_image_encoder(name)


def test_image_encoder_refuses_a_folder_without_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        encoders.load_image_encoder(str(tmp_path))


def test_tiny_builders_leave_the_global_rng_untouched():
    state = torch.get_rng_state()
    encoders.load_text_encoder("tiny"), encoders.load_image_encoder("tiny")
    assert torch.equal(state, torch.get_rng_state())
