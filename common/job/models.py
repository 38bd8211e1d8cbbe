"""Model zoo: a plain MLP, Vision Transformers (ViT-Micro/Tiny/S/B/L), GPT language models
(gpt-micro, gpt-nano, gpt2-small, gpt2-medium), plus user factories.

Reads top to bottom: configs, the ViT's small modules, the ViT, the MLP, the GPT, then `build_model`.

Contract every model here keeps, because the LTE layer later splits dim 0 of each
`nn.Linear` input across heads:
- every projection is an `nn.Linear` (the patch embedding too, so it gets LoRA heads);
- every `nn.Linear` sees the batch as dim 0;
- no operation mixes samples across the batch (no batch norm, no dropout).
Everything that is not an `nn.Linear` weight (LayerNorm, biases, cls token, position
embedding) becomes a replica that workers train and the server averages, except the GPT's token
embedding, which gets LTE heads of its own (`LTEEmbedding`) and is also its output layer (the tie).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lte.common.core.hf import build_hf_model
from lte.common.core.outputs import generate_tokens

MODEL_NAMES = (
    "mlp",
    "vit-tiny",
    "vit-s",
    "vit-b",
    "vit-l",
    "vit-micro",
    "gpt-micro",
    "gpt-nano",
    "gpt2-small",
    "gpt2-medium",
)

# (width, depth, num_heads, mlp_dim) as in Dosovitskiy et al. / DeiT
VIT_PRESETS: dict[str, dict[str, int]] = {
    "vit-tiny": dict(width=192, depth=12, num_heads=3, mlp_dim=768),
    "vit-s": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit-b": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit-l": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
    # not a paper size: the training-quality benchmark's model, a few minutes per epoch on a CPU
    "vit-micro": dict(width=128, depth=4, num_heads=4, mlp_dim=512),
}

# (depth, width, num_heads, context): nanoGPT's character model and GPT-2 (Radford et al. 2019)
GPT_PRESETS: dict[str, dict[str, int]] = {
    "gpt-micro": dict(depth=4, width=128, num_heads=4, context=128),  # trains on a 2-core CPU in minutes
    "gpt-nano": dict(depth=6, width=384, num_heads=6, context=256),  # nanoGPT's shakespeare_char
    "gpt2-small": dict(depth=12, width=768, num_heads=12, context=1024),  # 124M with vocabulary 50257
    "gpt2-medium": dict(depth=24, width=1024, num_heads=16, context=1024),  # 350M
}

# std of N(0, 1) truncated to [-2, 2], as in JAX's truncated_normal initialiser
TRUNC_NORMAL_STD_RATIO = 0.87962566103423978

# small images get patches that leave at most this many tokens (28x28 -> 4x4 patches, 49 tokens)
MAX_SMALL_IMAGE_TOKENS = 64


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.patch_size <= 0 or self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}; "
                "pick a patch size that divides the image size"
            )
        if self.width % self.num_heads != 0:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2


@dataclass
class MLPConfig:
    in_features: int
    num_classes: int
    hidden: tuple[int, ...] = (256, 256)  # () gives a single Linear: plain linear regression


@dataclass
class GPTConfig:
    vocab_size: int = 50257  # taken from the token data
    context: int = 1024  # longest sequence (learned positions)
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}; it comes from the token data")
        if self.context < 1:
            raise ValueError(f"context must be >= 1, got {self.context}")
        if self.width % self.num_heads != 0:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")


@torch.no_grad()
def trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    """Normal truncated at +-2 sigma, with sigma chosen so the result has standard deviation `std`."""
    # torch's erfinv-based nn.init.trunc_normal_ is several times slower on CPU; resample outliers instead
    if t.is_meta:
        return t
    sigma = std / TRUNC_NORMAL_STD_RATIO
    flat = t.view(-1)
    flat.normal_(0.0, sigma)
    redo = torch.nonzero(flat.abs() > 2 * sigma).squeeze(1)
    while redo.numel() > 0:
        fresh = torch.randn(redo.numel(), dtype=t.dtype, device=t.device) * sigma
        flat[redo] = fresh
        redo = redo[fresh.abs() > 2 * sigma]
    return t


# ---------------------------------------------------------------------------------------
# ViT building blocks


class PatchEmbed(nn.Module):
    """Cut images into non-overlapping patches and project each with one nn.Linear.

    Equivalent to a Conv2d with kernel = stride = patch_size whose weight is
    `proj.weight.view(width, C, p, p)`; a Linear lets the patch projection carry LoRA heads.
    """

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.in_channels = cfg.in_channels
        self.proj = nn.Linear(cfg.patch_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if (self.in_channels, self.image_size, self.image_size) != (C, H, W):
            raise ValueError(
                f"expected images [B, {self.in_channels}, {self.image_size}, {self.image_size}], "
                f"got {list(x.shape)}"
            )
        p = self.patch_size
        h, w = H // p, W // p
        # [B, C, h, p, w, p] -> [B, h, w, C, p, p]: patch vectors flattened in (C, p, p) order
        patches = x.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        return self.proj(patches)  # [B, L, width]

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, patch_size={self.patch_size}"


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(d)) v, then an output projection."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # [B, L, 3, heads, d] -> 3 x [B, heads, L, d]
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # attends over tokens only, never across the batch
        y = y.transpose(1, 2).reshape(B, L, D)
        return self.proj(y)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class FeedForward(nn.Module):
    """fc2(gelu(fc1(x)))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


# ---------------------------------------------------------------------------------------
# The models


class ViT(nn.Module):
    """Vision Transformer: patches + cls token + learned positions -> blocks -> LayerNorm -> head(cls)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.width, cfg.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        trunc_normal_(self.pos_embed, std)
        nn.init.zeros_(self.cls_token)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # [B, L, D]
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # expand: each sample gets its own cls row
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # [B, 1 + L, D]
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0])  # [B, num_classes]


class MLP(nn.Module):
    """Flatten, then Linear-GELU for each hidden width, then a Linear head.

    Keeps nn.Linear's default (Kaiming-uniform) init: std 0.02 would shrink activations layer by layer.
    """

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.config = cfg
        widths = (cfg.in_features, *cfg.hidden)
        self.hidden = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.head = nn.Linear(widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.gelu(layer(x))
        return self.head(x)


# ---------------------------------------------------------------------------------------
# GPT (nanoGPT-like): pre-LN blocks, causal attention, learned positions, tied output layer


class TokenEmbedding(nn.Embedding):
    """``nn.Embedding`` that is also the output layer: ``attend(x) = x W^T`` (GPT-2's weight tie)."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class CausalSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(d) + causal mask) v over the tokens of each sequence, then c_proj."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.c_attn = nn.Linear(cfg.width, 3 * cfg.width)
        self.c_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.c_attn(x).view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token t sees tokens <= t only
        return self.c_proj(y.transpose(1, 2).reshape(B, L, D))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal=True"


class GPTBlock(nn.Module):
    """x + attn(ln_1(x)), then x + c_proj(gelu(c_fc(ln_2(x))))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """Causal language model: token ids ``[B, L]`` (``L <= context``) -> next-token logits ``[B, L, V]``.

    The output layer is the token embedding (``tok_embed.attend``), so the state dict holds the
    ``[V, D]`` table once: under LTE its heads train both uses together and the tie cannot break.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_embed = TokenEmbedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList([GPTBlock(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere; residual projections N(0, 0.02 / sqrt(2 depth)) (GPT-2, sec. 2.3)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("norm."):
                nn.init.ones_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.depth))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length, context = ids.shape[1], self.config.context
        if length > context:
            raise ValueError(f"sequence of {length} tokens is longer than the context {context}")
        x = self.tok_embed(ids) + self.pos_embed[:length]  # [B, L, D]
        for block in self.blocks:
            x = block(x)
        return self.tok_embed.attend(self.norm(x))  # [B, L, V]: the tied output layer

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``ids [B, L]``; ``temperature`` 0 is greedy,
        ``top_k`` 0 samples from the whole vocabulary. The model should be in eval mode
        (``lte.common.core.outputs.generate_tokens`` over the last ``config.context`` tokens)."""
        return generate_tokens(
            self,
            ids,
            max_new_tokens,
            context=self.config.context,
            temperature=temperature,
            top_k=top_k,
            generator=generator,
        )


# ---------------------------------------------------------------------------------------
# Building models by name


def default_patch_size(image_size: int) -> int:
    """16 for images of 64 px and up; for small images, the smallest patch >= 2 leaving <= 64 tokens.

    8x8 -> 2 (16 tokens), 28x28 -> 4 (49 tokens), 32x32 -> 4 (64 tokens).
    """
    if image_size >= 64:
        if image_size % 16 != 0:
            raise ValueError(
                f"image_size {image_size} is not divisible by the default patch_size 16; pass patch_size"
            )
        return 16
    for p in range(2, image_size + 1):
        if image_size % p == 0 and (image_size // p) ** 2 <= MAX_SMALL_IMAGE_TOKENS:
            return p
    return image_size  # image_size 1: one token


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _make_config(cls: type, name: str, values: dict[str, Any]) -> Any:
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for model '{name}'; valid options: {sorted(valid)}")
    return cls(**values)


def _build_from_factory(
    spec: str,
    *,
    image_size: int,
    in_channels: int,
    num_classes: int,
    patch_size: int | None,
    context: int | None = None,
    **overrides: Any,
) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"custom model '{spec}' must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ImportError(
            f"cannot import module '{module_name}' for model '{spec}' ({e}); "
            "is it installed or on PYTHONPATH?"
        ) from e
    factory: Callable[..., Any] | None = getattr(module, attr, None)
    if factory is None:
        raise AttributeError(f"module '{module_name}' has no attribute '{attr}' (model '{spec}')")
    if not callable(factory):
        raise TypeError(f"'{spec}' is not callable")

    offered: dict[str, Any] = dict(image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    if patch_size is not None:
        offered["patch_size"] = patch_size
    if context:  # a language model's job: its sequence length, and num_classes is the vocabulary
        offered.update(context=context, vocab_size=num_classes)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    # standard kwargs the factory does not declare are dropped; user overrides must be accepted
    rejected = sorted(k for k in overrides if not takes_any and k not in params)
    if rejected:
        raise TypeError(f"factory '{spec}' does not accept option(s) {rejected}")
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params}
    kwargs.update(overrides)
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"factory '{spec}' returned {type(model).__name__}, expected a torch.nn.Module")
    return model


def build_model(
    name: str,
    *,
    image_size: int,
    in_channels: int,
    num_classes: int,
    patch_size: int | None = None,
    context: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a zoo model by name, or a user model from 'package.module:factory'.

    For a GPT, `num_classes` is the vocabulary size and `context` (None: the preset's) the longest
    sequence; image_size, in_channels and patch_size are ignored.

    `overrides` set config fields (e.g. depth=6 for a ViT, hidden=(512,) for the MLP).
    `patch_size` is ignored by the MLP; None picks `default_patch_size(image_size)` for a ViT.
    A factory is called with whichever of image_size, in_channels, num_classes, patch_size
    (when given), and for a language model context and vocab_size (= num_classes), its signature
    accepts, plus the overrides. ``hf:PATH`` builds a transformers model from a local config
    (``lte.common.core.hf.build_hf_model``: ``vocab_size`` must be ``num_classes``).
    """
    if name.startswith("hf:"):
        return build_hf_model(name, vocab_size=num_classes or None, context=context)
    if ":" in name:
        return _build_from_factory(
            name,
            image_size=image_size,
            in_channels=in_channels,
            num_classes=num_classes,
            patch_size=patch_size,
            context=context,
            **overrides,
        )
    key = name.lower().replace("_", "-")
    if key == "mlp":
        values = dict(in_features=in_channels * image_size * image_size, num_classes=num_classes, **overrides)
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        return MLP(_make_config(MLPConfig, name, values))
    if key in VIT_PRESETS:
        if patch_size is None:
            patch_size = default_patch_size(image_size)
        values = dict(
            VIT_PRESETS[key],
            image_size=image_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_classes=num_classes,
        )
        values.update(overrides)
        return ViT(_make_config(ViTConfig, name, values))
    if key in GPT_PRESETS:
        values = dict(GPT_PRESETS[key], vocab_size=num_classes)
        if context:
            values["context"] = context
        values.update(overrides)
        return GPT(_make_config(GPTConfig, name, values))
    raise ValueError(f"unknown model '{name}'; choose one of {MODEL_NAMES} or 'package.module:factory'")
