"""Frozen conditioners: the T5 text encoder and the CLIP image embedder (both run by transformers).

Text (CogVideoX): the T5 v1.1 XXL encoder (d_model 4096). A prompt becomes exactly max_length tokens (226, the
transformer's max_text_seq_length): sentencepiece ids, then </s> (id 1), truncated to leave room for </s>,
padded with <pad> (id 0); "" gives [1, 0, 0, ...]. The encoder gets NO attention mask, and all max_length
outputs, pads included, go to the transformer, as in CogVideoXPipeline, SAT and finetrainers.
We run sentencepiece itself on tokenizer/spiece.model: it is T5's vocabulary, and what transformers v4's
T5Tokenizer ran when CogVideoX was trained. transformers v5 would convert it to a `tokenizers` model, which
needs `protobuf`; without it v5 falls back to a TikToken reader (an error here, or wrong ids). The tests
check our ids against v5's T5Tokenizer built from the same vocabulary, and the embeddings against
CogVideoXPipeline.encode_prompt.

Image (DualReal, METHOD.md §1, §6): e is the projected, unnormalized 1024-d image embedding of OpenCLIP
ViT-H/14 (CLIPVisionModelWithProjection(...).image_embeds). Preprocessing is in torch (no Pillow or
torchvision) and the same at train and test time: short side resized to 224 (bicubic, antialiased), center
crop (never a stretch), /255, CLIP mean and std. Torch's bicubic (a = -0.75, float) is not PIL's (a = -0.5,
8-bit): pixels differ from CLIPImageProcessor's by ~1 gray level on photos, up to ~6 at hard edges.

"tiny": a seeded random T5 (d_model 32) and CLIP (projection_dim 32), and a sentencepiece model trained in
memory: the same code paths, no file, no download. Shapes: B prompts, L tokens, N images, e_dim embedding.
"""

import io
import warnings
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
)
from transformers.utils import logging as hf_logging

T5_MAX_LENGTH = 226  # CogVideoX 1.0 max_text_seq_length (1.5 uses 224: pass the transformer's value)
CLIP_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_CORPUS = ["a sks dog playing guitar on the beach", "a person is playing guitar in a park"]
TINY_CORPUS += [
    "a cat riding a skateboard down the street at sunset",
    "the quick brown fox jumps over the lazy dog",
]
# a T5-layout vocabulary: <pad> 0, </s> 1, <unk> 2, no <s>
TINY_SPM = dict(model_type="unigram", vocab_size=64, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2)
TINY_SPM |= dict(bos_id=-1, num_threads=1, minloglevel=2)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TINY_CLIP |= dict(image_size=32, patch_size=8, projection_dim=32)  # preprocessing then crops to 32 x 32


class Tokenizer:
    """T5's sentencepiece tokenizer, called the CogVideoX way: ids + </s>, truncated, padded to max_length."""

    def __init__(self, model_proto: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if [self.sp.id_to_piece(i) for i in (0, 1)] != ["<pad>", "</s>"]:
            raise ValueError("not a T5 sentencepiece model: ids 0 and 1 must be <pad> and </s>")
        self.pad_id, self.eos_id, self.vocab_size = 0, 1, self.sp.get_piece_size()

    def __call__(self, prompts: list[str], max_length: int) -> Tensor:
        """(B, max_length) int64 token ids."""
        ids = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        for b, pieces in enumerate(self.sp.encode(list(prompts))):
            if len(pieces) >= max_length:  # say what the model will not see, as diffusers' pipeline does
                cut = self.sp.decode(pieces[max_length - 1 :])  # stacklevel 4: past encode and its no_grad
                warnings.warn(f"prompt cut to {max_length - 1} of its {len(pieces)} tokens, dropping {cut!r}",
                              stacklevel=4)  # fmt: skip
            pieces = pieces[: max_length - 1] + [self.eos_id]  # truncation keeps the closing </s>
            ids[b, : len(pieces)] = torch.tensor(pieces)
        return ids


class TextEncoder(nn.Module):
    """Prompts -> T5 hidden states (B, L, d_model). Frozen; move it with .to(device)."""

    def __init__(self, t5: T5EncoderModel, tokenizer: Tokenizer):
        super().__init__()
        self.t5, self.tokenizer = t5.eval().requires_grad_(False), tokenizer
        self.dim = t5.config.d_model

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, max_length: int = T5_MAX_LENGTH) -> Tensor:
        """(B, max_length, d_model) in the encoder's dtype; pass the transformer's max_text_seq_length."""
        ids = self.tokenizer([prompts] if isinstance(prompts, str) else prompts, max_length)  # (B, L)
        out = self.t5(input_ids=ids.to(self.t5.device)).last_hidden_state  # no attention mask, on purpose
        return out.to(self.t5.dtype)  # (B, L, d_model)


def clip_preprocess(frames: Tensor, size: int = 224) -> Tensor:
    """(N, 3, H, W) uint8 in [0, 255] or float in [0, 1] -> (N, 3, size, size) float32, CLIP-normalized.
    The short side is resized to `size` (long side int(size * long / short), as CLIPImageProcessor does), then
    the center is cropped: the aspect ratio is kept, never stretched."""
    x = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
    h, w = x.shape[-2:]
    if min(h, w) != size:
        new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageEncoder(nn.Module):
    """Images -> the CLIP projected embedding e (N, e_dim), float32, not normalized. Frozen."""

    def __init__(self, clip: CLIPVisionModelWithProjection):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.dim, self.image_size = clip.config.projection_dim, clip.config.image_size

    @torch.no_grad()
    def embed(self, frames: Tensor) -> Tensor:
        """frames (N, 3, H, W), uint8 or float in [0, 1], any size -> e (N, e_dim) float32."""
        x = clip_preprocess(frames.to(self.clip.device), self.image_size)  # (N, 3, 224, 224)
        return self.clip(pixel_values=x.to(self.clip.dtype)).image_embeds.float()  # (N, e_dim)


def tiny_tokenizer() -> Tokenizer:
    """A sentencepiece model trained in memory on TINY_CORPUS (single thread: deterministic)."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TINY_CORPUS), model_writer=proto, **TINY_SPM)
    return Tokenizer(proto.getvalue())


def _seeded(build, seed: int = 0):
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
        torch.manual_seed(seed)
        return build()


def _check_loaded(info: dict, what: str):
    """from_pretrained only warns about weights it did not find; a random frozen encoder is silent garbage."""
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(f"{what}: missing or mismatched weights {sorted(info['missing_keys'])[:5]}")


def load_text_encoder(path: str = "tiny", dtype: torch.dtype = torch.float32, device="cpu") -> TextEncoder:
    """T5 + tokenizer from "tiny", a CogVideoX checkpoint root (with text_encoder/ and tokenizer/) or a hub id
    such as THUDM/CogVideoX-5b. Then encode(prompts, max_length=transformer.config.max_text_seq_length)."""
    if path == "tiny":
        tok = tiny_tokenizer()
        t5 = _seeded(lambda: T5EncoderModel(T5Config(vocab_size=tok.vocab_size, **TINY_T5)))
        return TextEncoder(t5, tok).to(device=device, dtype=dtype)
    root = Path(path)
    if root.is_dir():
        spm_file, source, sub = root / "tokenizer" / "spiece.model", str(root / "text_encoder"), {}
        if not spm_file.is_file() or not Path(source).is_dir():
            raise FileNotFoundError(
                f"{path} has no text_encoder/ or tokenizer/spiece.model: not a checkpoint root"
            )
    elif path.count("/") == 1:  # a hub id
        from huggingface_hub import hf_hub_download

        spm_file = hf_hub_download(path, "spiece.model", subfolder="tokenizer")
        source, sub = path, {"subfolder": "text_encoder"}
    else:
        raise FileNotFoundError(f"{path} does not exist (give 'tiny', a checkpoint root or a hub id)")
    t5, info = T5EncoderModel.from_pretrained(source, dtype=dtype, output_loading_info=True, **sub)
    _check_loaded(info, f"T5 from {path}")  # fp16 keeps T5's `wo` in fp32, as in the reference
    return TextEncoder(t5, Tokenizer(Path(spm_file).read_bytes())).to(device)


def load_image_encoder(path: str = CLIP_ID, dtype: torch.dtype = torch.float32, device="cpu") -> ImageEncoder:
    """CLIP vision tower + projection from "tiny", a local folder, or a hub id (default: OpenCLIP ViT-H/14).
    The laion repository holds a whole CLIPModel: its text tower is skipped, projection_dim read from it."""
    if path == "tiny":
        clip = _seeded(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)))
        return ImageEncoder(clip).to(device=device, dtype=dtype)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a CLIP model folder")
    if not Path(path).is_dir() and (path.count("/") != 1 or path.startswith((".", "/"))):  # nor a hub id
        raise FileNotFoundError(f"{path}: no such folder (give 'tiny', a CLIP model folder or a hub id)")
    cfg = AutoConfig.from_pretrained(path)
    if isinstance(cfg, CLIPConfig):  # projection_dim lives on the full config, not on vision_config
        cfg.vision_config.projection_dim = cfg.projection_dim
        cfg = cfg.vision_config
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence the report listing every unused text-tower weight
    try:
        clip, info = CLIPVisionModelWithProjection.from_pretrained(
            path, config=cfg, dtype=dtype, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_loaded(info, f"CLIP from {path}")
    return ImageEncoder(clip).to(device)
