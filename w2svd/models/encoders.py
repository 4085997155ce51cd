"""HunyuanVideo's frozen encoders: the 3D VAE and the two text encoders.

HunyuanVideo conditions on a Llama-family encoder's hidden states (layer -3, behind a prompt
template whose prefix is cropped away) and on CLIP's pooled text output. Real weights load from
a local folder or a bucket folder (copied to a local cache first); with no path, tiny
random-init models of the same classes are built from the config, seeded so that every process
(every Ray actor, the benchmark's naive loop) gets identical weights and identical latents.

Tokenizers cannot be downloaded here, so tiny models use ``ByteTokenizer`` (UTF-8 bytes as
ids); real weights use the tokenizer saved beside them. With ``model.text_tokenizer: words``
the pooled vector is ``bag_of_words_pooled`` instead of a random-init CLIP's (why: there).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from w2svd.config import Config
from w2svd.data import storage

# Llama layer whose hidden states HunyuanVideo uses (hidden_states[-(2 + 1)]).
LLAMA_HIDDEN_LAYER = -3
CLIP_MAX_LENGTH = 77
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_weights(uri: str, options: storage.StorageOptions | None = None) -> Path:
    """A local folder with the weights at ``uri`` (a bucket folder is mirrored once; a
    ``world:CONFIG/PART`` URI is the self-trained part of a portrait world, ``w2svd.world``)."""
    from w2svd import world

    if world.is_world_uri(uri):
        return world.resolve_world_uri(uri)
    return storage.copy_to_local(uri, options=options)


def weights_id(uri: str) -> str:
    """What shards record as the id of configured weights (a world part adds its settings' key)."""
    from w2svd import world

    return world.world_part_id(uri) if world.is_world_uri(uri) else uri


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _arch_id(kind: str, seed: int, arch: dict) -> str:
    digest = hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:10]
    return f"random-{kind}:seed{seed}:{digest}"


class ByteTokenizer:
    """Deterministic tokenizer for random-init text encoders: ``<bos> utf-8 bytes <eos> <pad>...``."""

    pad_id, bos_id, eos_id = 0, 1, 258
    vocab_size = 259  # pad, bos, 256 byte values, eos

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if max_length < 2:
            raise ValueError(f"max_length = {max_length} leaves no room for <bos> and <eos>")
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            body = [b + 2 for b in text.encode("utf-8")][: max_length - 2]
            tokens = [self.bos_id, *body, self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad_id


class WordTokenizer:
    """Deterministic word-level tokenizer for random-init text encoders: ``<bos> words <eos> <pad>...``.

    A word (lower-cased, punctuation stripped) gets the id its SHA-1 picks in ``[4, vocab_size)``,
    so no vocabulary file is needed and every process agrees. Unlike bytes, a caption of ~35
    words fits a short ``max_length``, so each factor word (skin, hair, background, talking…)
    reaches the encoder. ``eos_id`` is not 2: CLIP's text model reads its pooled output at the
    highest id when ``eos_token_id == 2``, which would be an arbitrary word here.
    """

    pad_id, bos_id, eos_id = 0, 1, 3
    vocab_size = 4096

    @classmethod
    def word_id(cls, word: str) -> int:
        digest = int(hashlib.sha1(word.encode("utf-8")).hexdigest()[:8], 16)
        return 4 + digest % (cls.vocab_size - 4)

    @staticmethod
    def words(text: str) -> list[str]:
        cleaned = "".join(ch if ch.isalnum() else " " for ch in text.lower())
        return cleaned.split()

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if max_length < 2:
            raise ValueError(f"max_length = {max_length} leaves no room for <bos> and <eos>")
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            body = [self.word_id(w) for w in self.words(text)][: max_length - 2]
            tokens = [self.bos_id, *body, self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != self.pad_id


def bag_of_words_pooled(ids_BL: torch.Tensor, mask_BL: torch.Tensor, projection_VP: torch.Tensor) -> torch.Tensor:
    """``pooled_BP = counts_BV · R_VP / sqrt(n_B)``: a fixed random projection of the caption's
    word counts (``n_B`` words; ``<bos>``, ``<eos>`` and padding left out).

    The 13B's CLIP-L is trained, so its pooled vector carries what the caption says; a
    random-init CLIP's does not: on the portrait world's 128 captions a linear probe recovers
    each clip's colour (its latent channel means) from that pooled vector with R² 0.63, from
    this one with R² 0.99 (docs/benchmarks.md, "Portrait world"). The pooled vector drives the
    transformer's global modulation, which is where a clip's overall colour is decided.
    """
    special = (ids_BL == WordTokenizer.bos_id) | (ids_BL == WordTokenizer.eos_id)
    counted_BL = (mask_BL & ~special).to(projection_VP.dtype)
    counts_BV = torch.zeros(ids_BL.shape[0], projection_VP.shape[0], dtype=projection_VP.dtype, device=ids_BL.device)
    counts_BV.scatter_add_(1, ids_BL, counted_BL)
    return counts_BV @ projection_VP / counted_BL.sum(1, keepdim=True).clamp_min(1.0).sqrt()


def tiny_tokenizer(cfg: Config):
    return WordTokenizer() if cfg.model.text_tokenizer == "words" else ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# VAE


def _vae_arch(cfg: Config) -> dict:
    a = cfg.model.vae_arch
    arch = dict(latent_channels=a.latent_channels, block_out_channels=tuple(a.block_out_channels),
                layers_per_block=a.layers_per_block, norm_num_groups=a.norm_num_groups,
                scaling_factor=a.scaling_factor)
    # Only when set, so the ids of existing configs' random VAEs stay what their shards recorded.
    if a.spatial_compression_ratio != 8:
        arch["spatial_compression_ratio"] = a.spatial_compression_ratio
    if not a.mid_block_add_attention:
        arch["mid_block_add_attention"] = False
    return arch


def vae_kwargs(cfg: Config) -> dict:
    """Keyword arguments of ``AutoencoderKLHunyuanVideo`` for ``model.vae_arch`` (one block type
    per entry of ``block_out_channels``: diffusers' defaults assume four)."""
    arch = _vae_arch(cfg)
    n = len(arch["block_out_channels"])
    return {**arch, "down_block_types": ("HunyuanVideoDownBlock3D",) * n,
            "up_block_types": ("HunyuanVideoUpBlock3D",) * n}


def encoder_ids(cfg: Config) -> tuple[str, str]:
    """(vae_id, text_encoder_id) that shards record, known without building the models."""
    m = cfg.model
    vae_id = weights_id(m.vae) if m.vae else _arch_id("hunyuan-vae", m.seed, {**_vae_arch(cfg), "dtype": m.dtype})
    if m.text_encoder:
        text_id = f"{weights_id(m.text_encoder)}+{weights_id(m.text_encoder_2)}"
    else:
        llama_cfg, clip_cfg = _tiny_text_configs(cfg)
        arch = {"llama": llama_cfg, "clip": clip_cfg, "dtype": m.dtype}
        if m.text_tokenizer != "bytes":
            arch["tokenizer"] = m.text_tokenizer
            arch["pooled"] = "bag-of-words"
        text_id = _arch_id("llama+clip", m.seed, arch)
    return vae_id, text_id


def build_vae(cfg: Config, options: storage.StorageOptions | None = None):
    from diffusers import AutoencoderKLHunyuanVideo

    dtype = _DTYPES[cfg.model.dtype]
    if cfg.model.vae:
        vae = AutoencoderKLHunyuanVideo.from_pretrained(str(resolve_weights(cfg.model.vae, options)), torch_dtype=dtype)
    else:
        with _seeded(cfg.model.seed):
            vae = AutoencoderKLHunyuanVideo(**vae_kwargs(cfg))
        vae = vae if dtype == torch.float32 else vae.to(dtype)
    return vae.eval().requires_grad_(False), encoder_ids(cfg)[0]


# ---------------------------------------------------------------------------------------------
# Text encoders


def _tiny_text_configs(cfg: Config) -> tuple[dict, dict]:
    d, p = cfg.model.arch.text_embed_dim, cfg.model.arch.pooled_projection_dim
    tok = tiny_tokenizer(cfg)
    llama_cfg = dict(vocab_size=tok.vocab_size, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=4,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max(64, cfg.model.text_max_length),
                     pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    clip_cfg = dict(vocab_size=tok.vocab_size, hidden_size=p, intermediate_size=2 * p, projection_dim=p,
                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                    pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    return llama_cfg, clip_cfg


def _tiny_text_encoders(cfg: Config):
    """Random-init Llama and CLIP text models; no CLIP in ``words`` mode, whose pooled vector is
    ``bag_of_words_pooled`` (the CLIP tokenizer's ids are still what it counts)."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    llama_cfg, clip_cfg = _tiny_text_configs(cfg)
    with _seeded(cfg.model.seed + 1):
        llama = LlamaModel(LlamaConfig(**llama_cfg))
    clip = None
    if cfg.model.text_tokenizer != "words":
        with _seeded(cfg.model.seed + 2):
            clip = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    return llama, tiny_tokenizer(cfg), clip, tiny_tokenizer(cfg), encoder_ids(cfg)[1]


class TextEncoders:
    """``encode(captions) -> (text_BLD, mask_BL, pooled_BP)`` as HunyuanVideo consumes them."""

    def __init__(self, cfg: Config, options: storage.StorageOptions | None = None):
        m = cfg.model
        self.max_length = m.text_max_length
        self.dtype = _DTYPES[m.dtype]
        if (m.text_encoder is None) != (m.text_encoder_2 is None):
            raise ValueError("set both model.text_encoder (Llama) and model.text_encoder_2 (CLIP), or neither")
        # The fixed projection of ``bag_of_words_pooled`` (tiny ``words`` encoders only).
        self.pooled_projection_VP: torch.Tensor | None = None
        if m.text_encoder is None:
            self.llama, self.llama_tok, self.clip, self.clip_tok, self.encoder_id = _tiny_text_encoders(cfg)
            self.template = None
            if m.text_tokenizer == "words":
                g = torch.Generator().manual_seed(m.seed + 3)
                self.pooled_projection_VP = torch.randn(WordTokenizer.vocab_size, m.arch.pooled_projection_dim,
                                                        generator=g)
        else:
            from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
            from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

            llama_dir, clip_dir = resolve_weights(m.text_encoder, options), resolve_weights(m.text_encoder_2, options)
            self.llama = LlamaModel.from_pretrained(llama_dir, torch_dtype=self.dtype)
            self.clip = CLIPTextModel.from_pretrained(clip_dir, torch_dtype=self.dtype)
            self.llama_tok = AutoTokenizer.from_pretrained(_tokenizer_dir(llama_dir))
            self.clip_tok = CLIPTokenizer.from_pretrained(_tokenizer_dir(clip_dir))
            self.template = DEFAULT_PROMPT_TEMPLATE
            self.encoder_id = encoder_ids(cfg)[1]
        for model in (self.llama, self.clip):
            if model is not None:
                model.to(self.dtype).eval().requires_grad_(False)
        got_d = self.llama.config.hidden_size
        got_p = self.clip.config.hidden_size if self.clip is not None else self.pooled_projection_VP.shape[1]
        if (got_d, got_p) != (m.arch.text_embed_dim, m.arch.pooled_projection_dim):
            raise ValueError(
                f"text encoders give dims ({got_d}, {got_p}) but the transformer expects "
                f"model.arch.text_embed_dim = {m.arch.text_embed_dim}, pooled_projection_dim = {m.arch.pooled_projection_dim}"
            )

    def to(self, device) -> TextEncoders:
        self.llama.to(device)
        if self.clip is not None:
            self.clip.to(device)
        if self.pooled_projection_VP is not None:
            self.pooled_projection_VP = self.pooled_projection_VP.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.llama.parameters()).device

    def _tokenize(self, tok, texts: list[str], max_length: int):
        if isinstance(tok, (ByteTokenizer, WordTokenizer)):
            return tok(texts, max_length)
        out = tok(texts, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
        return out.input_ids, out.attention_mask.bool()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not captions:
            raise ValueError("encode_text needs at least one caption")
        crop = 0
        texts = list(captions)
        if self.template is not None:
            crop = self.template["crop_start"]
            texts = [self.template["template"].format(c) for c in captions]
        ids, mask = self._tokenize(self.llama_tok, texts, self.max_length + crop)
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.llama(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        text_BLD = out.hidden_states[LLAMA_HIDDEN_LAYER][:, crop:]
        mask_BL = mask[:, crop:]
        clip_ids, clip_mask = self._tokenize(self.clip_tok, list(captions), CLIP_MAX_LENGTH)
        if self.pooled_projection_VP is not None:
            pooled_BP = bag_of_words_pooled(clip_ids.to(self.device), clip_mask.to(self.device), self.pooled_projection_VP)
        else:
            pooled_BP = self.clip(input_ids=clip_ids.to(self.device), output_hidden_states=False).pooler_output
        return text_BLD.to(self.dtype), mask_BL, pooled_BP.to(self.dtype)


def _tokenizer_dir(model_dir: Path) -> Path:
    # diffusers' HunyuanVideo layout keeps tokenizers in sibling folders (text_encoder → tokenizer).
    sibling = model_dir.parent / model_dir.name.replace("text_encoder", "tokenizer")
    return sibling if sibling != model_dir and sibling.is_dir() else model_dir


# ---------------------------------------------------------------------------------------------
# Both together, as the pre-encode stage and the sample decoders use them


class LatentEncoder:
    """The VAE and text encoders of one model family, on one device."""

    def __init__(self, cfg: Config, options: storage.StorageOptions | None = None, device: str | None = None,
                 text: bool = True):
        self.vae, self.vae_id = build_vae(cfg, options)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.dtype = _DTYPES[cfg.model.dtype]
        self.text = TextEncoders(cfg, options) if text else None
        if cfg.data.vae_tiling:
            self.vae.enable_tiling()
        self.vae.enable_slicing()  # encode a batch one clip at a time: peak memory of one clip
        self.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def to(self, device) -> LatentEncoder:
        self.device = torch.device(device)
        self.vae.to(self.device)
        if self.text is not None:
            self.text.to(self.device)
        return self

    @property
    def text_encoder_id(self) -> str:
        return self.text.encoder_id if self.text is not None else ""

    @property
    def spatial_ratio(self) -> int:
        return int(self.vae.spatial_compression_ratio)

    @property
    def temporal_ratio(self) -> int:
        return int(self.vae.temporal_compression_ratio)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.vae.config.latent_channels, (frames - 1) // self.temporal_ratio + 1,
                height // self.spatial_ratio, width // self.spatial_ratio)

    def encode_text(self, captions: list[str]):
        if self.text is None:
            raise RuntimeError("this LatentEncoder was built with text=False")
        return self.text.encode(captions)

    @torch.no_grad()
    def encode_video(self, frames_BCTHW: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] ``[B, 3, T, H, W]`` → scaled latents ``[B, C, T', H/8, W/8]``.

        Uses the posterior mode, so a clip always encodes to the same latent (reruns and the
        resume path produce identical shards).
        """
        if frames_BCTHW.ndim != 5 or frames_BCTHW.shape[1] != 3:
            raise ValueError(f"encode_video wants [B, 3, T, H, W], got {tuple(frames_BCTHW.shape)}")
        _, _, t, h, w = frames_BCTHW.shape
        if (t - 1) % self.temporal_ratio or h % self.spatial_ratio or w % self.spatial_ratio:
            raise ValueError(f"frames {t} must be {self.temporal_ratio}k+1 and sizes {h}x{w} multiples of "
                             f"{self.spatial_ratio} for the HunyuanVideo VAE")
        x = frames_BCTHW.to(self.device, self.dtype)
        return self.vae.encode(x).latent_dist.mode() * self.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents_BCTHW: torch.Tensor) -> torch.Tensor:
        """Scaled latents → pixels in [-1, 1] ``[B, 3, T, H, W]``."""
        z = latents_BCTHW.to(self.device, self.dtype) / self.scaling_factor
        return self.vae.decode(z).sample.clamp(-1, 1)


def decode_latents(cfg: Config, latents_BCTHW: torch.Tensor) -> torch.Tensor:
    """One-off decode with the config's VAE (sample videos, tests)."""
    return LatentEncoder(cfg, text=False).decode_latents(latents_BCTHW)
