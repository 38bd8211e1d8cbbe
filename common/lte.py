"""LoRA-the-Explorer layers, model conversion and the tensor-level merge.

The math (DESIGN.md section 2). Scale ``s = alpha / r``; ``N`` heads in the whole job. Head ``i``
with factors ``(B_i, A_i)`` and the factors of its last merge ``(B'_i, A'_i)`` computes

    y = W x + s * (B_i A_i x - B'_i A'_i x)

and a merge folds every head's progress since its last merge into ``W``:

    W <- W + (s / N) * sum_i (B_i A_i - B'_i A'_i)        then (B'_i, A'_i) <- (B_i, A_i)

``LTELinear`` holds ``h`` local heads vectorised (the batch is split evenly across them).
Everything the network needs is a plain function over tensors (``export_head_factors``,
``export_replica_deltas``, ``merge_head_deltas``, ``apply_updates``): the emulator uses them,
and so does the parameter server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lte.common.quant import QUANT_KINDS, QuantizedTensor, quantize, quantized_zeros

A_INITS = ("semi-orthogonal", "kaiming", "xavier")

Factors = tuple[torch.Tensor, torch.Tensor]  # (B [m, r], A [r, n])


@dataclass
class LTEConfig:
    """How a model is converted: heads on this process, the job's total, rank, scale, init."""

    heads: int = 1  # h: heads held (vectorised) by this process
    total_heads: int | None = None  # N: heads in the whole job (merge weight 1/N); None -> heads
    rank: int = 16
    alpha: float = 64.0
    reset: bool = False  # the paper's reset variant: B <- 0 after every merge
    a_init: str = "semi-orthogonal"
    a_init_gain: float = 1.0  # extra factor on top of the init's own scale
    quant: str = "none"  # base weight storage: none | int8 | nf4
    # storage of B', A': the uplink's dtype when a worker rounds its factors to it before a merge
    # (then lossless, and half the bytes); None keeps the factors' own dtype
    prev_dtype: torch.dtype | None = None
    strict: bool = True  # every trainable parameter must be covered by heads or replicas
    replicas: bool = True  # train non-Linear parameters as per-process replicas
    # nn.Embedding tables get LTE heads too (LTEEmbedding); False keeps them replicas (full-size deltas)
    embeddings: bool = True
    exclude: tuple[str, ...] = ()  # Linear module names kept as they are (must be frozen in strict mode)
    head_ids: Sequence[int] | None = None  # global ids of the local heads (seed their A init)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.heads < 1:
            raise ValueError(f"heads must be >= 1, got {self.heads}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.total_heads is None:
            self.total_heads = self.heads
        if self.total_heads < self.heads:
            raise ValueError(f"total_heads ({self.total_heads}) is smaller than local heads ({self.heads})")
        if self.quant not in QUANT_KINDS:
            raise ValueError(f"quant must be one of {QUANT_KINDS}, got {self.quant!r}")
        if self.a_init not in A_INITS:
            raise ValueError(f"a_init must be one of {A_INITS}, got {self.a_init!r}")
        if self.head_ids is None:
            self.head_ids = tuple(range(self.heads))
        self.head_ids = tuple(int(i) for i in self.head_ids)
        if len(self.head_ids) != self.heads:
            raise ValueError(f"head_ids has {len(self.head_ids)} ids for {self.heads} heads")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _seed_for(seed: int, head_id: int, layer_index: int) -> int:
    """A stable 63-bit seed per (job seed, head, layer): the same head inits the same anywhere."""
    x = (seed * 0x9E3779B97F4A7C15 + head_id * 0xBF58476D1CE4E5B9 + layer_index * 0x94D049BB133111EB) & (
        (1 << 64) - 1
    )
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def init_lora_a(a: torch.Tensor, kind: str, generator: torch.Generator, gain: float = 1.0) -> None:
    """Initialise one head's ``A [r, n]`` in place.

    semi-orthogonal: orthonormal rows scaled to spectral norm sqrt(r / n), the spectral
    condition of Bernstein et al. (fan_out / fan_in); kaiming / xavier: the usual uniform inits.
    """
    r, n = a.shape
    with torch.no_grad():
        if kind == "semi-orthogonal":
            g = torch.randn(max(r, n), min(r, n), generator=generator, dtype=torch.float64)
            q, rr = torch.linalg.qr(g)
            q = q * torch.sign(torch.diagonal(rr)).clamp(min=0).mul(2).sub(1)  # unique Haar sample
            q = q.T if r < n else q
            a.copy_(q[:r, :n] * (math.sqrt(r / n) * gain))
        elif kind == "kaiming":
            bound = gain * math.sqrt(3.0 / n)
            a.copy_(torch.rand(r, n, generator=generator, dtype=torch.float64) * 2 * bound - bound)
        elif kind == "xavier":
            bound = gain * math.sqrt(6.0 / (n + r))
            a.copy_(torch.rand(r, n, generator=generator, dtype=torch.float64) * 2 * bound - bound)
        else:
            raise ValueError(f"unknown A init {kind!r}; choose one of {A_INITS}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own."""
    kind = x.device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except TypeError:  # torch < 2.4: no per-device query; only CUDA autocast is common there
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


class _FrozenBaseMatmul(torch.autograd.Function):
    """Each head's frozen part ``y_i = (W - s B'_i A'_i) x_i`` (the fold optional), W dequantised on the fly.

    Only x gets a gradient, and nothing of W is kept for backward: it is rebuilt there. Plain
    F.linear would hold every layer's dequantised weight until backward, the very memory a
    quantised base exists to save; and the weight gradient it skips is a third of a layer's work.
    """

    @staticmethod
    def forward(ctx, xh: torch.Tensor, layer: LTELinear, fold_prev: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.fold_prev, ctx.x_dtype = layer, fold_prev, xh.dtype
        dtype = _compute_dtype(xh)
        return xh.to(dtype) @ layer.frozen_weight(dtype, fold_prev).mT

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        grad_x = grad_out @ ctx.layer.frozen_weight(grad_out.dtype, ctx.fold_prev)
        return grad_x.to(ctx.x_dtype), None, None


class LTELinear(nn.Module):
    """``nn.Linear`` replacement with ``h`` vectorised LoRA heads on a frozen (optionally quantised) base.

    Parameters: ``lora_A [h, r, n]``, ``lora_B [h, m, r]`` and the ``bias`` replica.
    Buffers: the base ``weight [m, n]`` (or its quantised codes and scales) and the factors of
    the last merge ``lora_A_prev``, ``lora_B_prev``. In eval mode the layer computes ``W x + b``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        heads: int = 1,
        total_heads: int | None = None,
        rank: int = 16,
        alpha: float = 64.0,
        reset: bool = False,
        quant: str = "none",
        prev_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if quant not in QUANT_KINDS:
            raise ValueError(f"quant must be one of {QUANT_KINDS}, got {quant!r}")
        self.in_features, self.out_features = in_features, out_features
        self.heads, self.rank = heads, rank
        self.total_heads = total_heads or heads
        self.alpha, self.scale = alpha, alpha / rank
        self.reset, self.quant = reset, quant
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.lora_A = nn.Parameter(torch.zeros(heads, rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(heads, out_features, rank, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        kw_prev = {**kw, "dtype": prev_dtype or kw["dtype"]}
        self.register_buffer("lora_A_prev", torch.zeros(heads, rank, in_features, **kw_prev))
        self.register_buffer("lora_B_prev", torch.zeros(heads, out_features, rank, **kw_prev))
        self.qweight: QuantizedTensor | None = None
        # False only while B' A' is known to be zero (fresh, or reset variant): skips its work
        self.has_prev = False
        self.layer_index = 0  # position among the model's Linears; set by from_linear
        # Opt-in: keep the frozen weight (dequantised, B'A' folded) between steps, in the compute
        # dtype. It only changes with the base or B', A', which change between rounds: every
        # mutator below clears it. Costs one [m, n] (per head when folded) per layer.
        self.cache_frozen = False
        self._frozen_cache: dict[tuple[torch.dtype, bool], torch.Tensor] = {}
        if quant == "none":
            self.register_buffer("weight", torch.zeros(out_features, in_features, **kw))
        else:
            self.weight = None
            self.set_base_weight(quantized_zeros(quant, (out_features, in_features), device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LTEConfig, layer_index: int = 0) -> LTELinear:
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            heads=config.heads,
            total_heads=config.total_heads,
            rank=config.rank,
            alpha=config.alpha,
            reset=config.reset,
            quant=config.quant,
            prev_dtype=config.prev_dtype,
            device=w.device,
            dtype=w.dtype,
        )
        layer.layer_index = layer_index  # seeds its heads' A: kept for re-initialising after to_empty
        if linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        if w.is_meta:  # built without storage (prepare_model_on_device): nothing to copy yet
            return layer
        with torch.no_grad():
            layer.set_base_weight(w.detach())
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        layer.reset_parameters(config.head_ids, config.seed, layer_index, config.a_init, config.a_init_gain)
        return layer

    def reset_parameters(
        self,
        head_ids: Sequence[int] | None = None,
        seed: int = 0,
        layer_index: int = 0,
        a_init: str = "semi-orthogonal",
        gain: float = 1.0,
    ) -> None:
        """``B = 0``; each head's ``A`` drawn from its own generator seeded by (seed, head id, layer)."""
        head_ids = range(self.heads) if head_ids is None else head_ids
        self.invalidate_frozen()
        with torch.no_grad():
            self.lora_B.zero_()
            self.lora_B_prev.zero_()
            self.lora_A_prev.zero_()
            self.has_prev = False
            for local, head_id in enumerate(head_ids):
                gen = torch.Generator().manual_seed(_seed_for(seed, head_id, layer_index))
                a = torch.empty(self.rank, self.in_features, dtype=torch.float64)
                init_lora_a(a, a_init, gen, gain)
                self.lora_A[local].copy_(a)

    # -- the base weight -------------------------------------------------------------------
    def set_base_weight(self, weight: torch.Tensor | QuantizedTensor) -> None:
        """Load a new base ``W`` (full precision, or already quantised by the server)."""
        self.invalidate_frozen()
        if self.quant == "none":
            if isinstance(weight, QuantizedTensor):
                raise ValueError("this layer holds W unquantised; got a quantised snapshot")
            self.weight.copy_(weight)
            return
        q = weight if isinstance(weight, QuantizedTensor) else quantize(weight, self.quant)
        if q.kind != self.quant or tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"expected a {self.quant} weight of shape {(self.out_features, self.in_features)}, "
                f"got {q.kind} {tuple(q.shape)}"
            )
        self.qweight = q.to(self.lora_A.device)
        # Buffers so .to(device) and state_dict() see the codes; qweight shares their storage.
        self.register_buffer("weight_codes", self.qweight.codes)
        self.register_buffer("weight_scale", self.qweight.scale)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.invalidate_frozen()
        self.has_prev = True  # loaded factors: assume B' A' is not zero

    def _apply(self, fn, recurse=True):  # keep qweight pointing at the moved buffers
        super()._apply(fn, recurse)
        self.invalidate_frozen()
        if self.qweight is not None:
            self.qweight = QuantizedTensor(
                self.qweight.kind,
                self._buffers["weight_codes"],
                self._buffers["weight_scale"],
                self.qweight.shape,
                self.qweight.block_size,
            )
        return self

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W`` as the heads see it: the weight itself, or ``q(W)`` dequantised."""
        if self.qweight is None:
            return self.weight if dtype is None else self.weight.to(dtype)
        return self.qweight.dequantize(dtype or self.lora_A.dtype)

    # -- forward and merge -----------------------------------------------------------------
    def frozen_weight(self, dtype: torch.dtype, fold_prev: bool) -> torch.Tensor:
        """``W`` (``[m, n]``), or per head ``W - s B'_i A'_i`` (``[h, m, n]``), in ``dtype``."""
        if self.cache_frozen and (dtype, fold_prev) in self._frozen_cache:
            return self._frozen_cache[dtype, fold_prev]
        w = self.base_weight(dtype)
        if fold_prev:
            w = w - self.scale * (self.lora_B_prev.to(dtype) @ self.lora_A_prev.to(dtype))
        if self.cache_frozen:
            self._frozen_cache[dtype, fold_prev] = w.detach()
        return w

    def invalidate_frozen(self) -> None:
        """Drop the cached frozen weight: the base or ``B', A'`` changed."""
        self._frozen_cache.clear()

    @property
    def frozen_cache_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._frozen_cache.values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, n, h = self.out_features, self.in_features, self.heads
        if not self.training:  # eval: W alone
            y = _FrozenBaseMatmul.apply(x.reshape(1, -1, n), self, False).reshape(*x.shape[:-1], m)
            return y if self.bias is None else y + self.bias
        if x.shape[0] % h:
            raise ValueError(f"batch of {x.shape[0]} does not split evenly across {h} LTE heads")
        xh = x.reshape(h, -1, n)  # head i gets samples [i*B/h, (i+1)*B/h)
        A, B, A_prev, B_prev, s = self.lora_A, self.lora_B, self.lora_A_prev, self.lora_B_prev, self.scale
        # y = W x + s * (B_i A_i x - B'_i A'_i x). The last-merged term is folded into the weight
        # when a head's rows outnumber m n / (m + n), where that is the cheaper way to compute it.
        fold = self.has_prev and xh.shape[1] * (m + n) >= m * n
        y = _FrozenBaseMatmul.apply(xh, self, fold)
        if self.has_prev and not fold:
            y = y - s * ((xh @ A_prev.mT.to(xh.dtype)) @ B_prev.mT.to(xh.dtype))
        y = y + s * ((xh @ A.mT) @ B.mT)
        y = y.reshape(*x.shape[:-1], m)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the local heads into ``W``: ``W += (s/N) sum_i (B_i A_i - B'_i A'_i)``; then commit."""
        if self.qweight is not None:
            raise RuntimeError(
                "a quantised layer cannot merge into its own lossy W; merge into the master "
                "weights (apply_updates) and load the new snapshot with set_base_weight"
            )
        weights = [self.scale / self.total_heads] * self.heads
        factors = [
            (self.lora_B[i], self.lora_A[i], self.lora_B_prev[i], self.lora_A_prev[i])
            for i in range(self.heads)
        ]
        merge_head_deltas(self.weight, factors, weights)
        self.commit()

    @torch.no_grad()
    def commit(self) -> None:
        """After a merge: ``(B', A') <- (B, A)``; the reset variant zeroes ``B`` (and so ``B'``)."""
        self.invalidate_frozen()
        if self.reset:
            self.lora_B.zero_()
        self.lora_B_prev.copy_(self.lora_B)
        self.lora_A_prev.copy_(self.lora_A)
        self.has_prev = not self.reset  # the reset variant's B' is zero: nothing to subtract

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, heads={self.heads}, r={self.rank}, "
            f"s={self.scale:g}, N={self.total_heads}, quant={self.quant}"
            + (", reset=True" if self.reset else "")
            + (", bias=False" if self.bias is None else "")
        )


class LTEEmbedding(LTELinear):
    """``nn.Embedding`` replacement: ``h`` vectorised LoRA heads on a frozen token table ``W [V, D]``.

    The table is a matrix like a Linear's (``m = V`` rows, ``n = D`` columns), with ``B_i [V, r]``
    and ``A_i [r, D]``, so its factors travel, merge (``merge_head_deltas``) and export exactly as an
    ``LTELinear``'s. Looking token ``t`` up in head ``i`` reads row ``t`` of the head's weight:

        y = W[t] + s * (B_i[t] A_i - B'_i[t] A'_i)

    ``attend(x)`` is the tied output layer (GPT-2's logits ``x W^T``): it is ``LTELinear.forward``
    over the same weight, so the tie holds in every head, through every merge and in the export,
    because there is only one ``W`` and one ``(B_i, A_i)``. ``B = 0`` at init, as peft does for
    embeddings: the factor on the vocabulary side is the zero one.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs) -> None:
        super().__init__(embedding_dim, num_embeddings, bias=False, **kwargs)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, config: LTEConfig, layer_index: int = 0) -> LTEEmbedding:
        """Raises ``ValueError`` for what a low-rank table cannot keep (padding_idx, max_norm, sparse)."""
        if embedding.padding_idx is not None or embedding.max_norm is not None or embedding.sparse:
            raise ValueError(
                "LTE embeddings support plain lookups only; this nn.Embedding sets padding_idx, "
                "max_norm or sparse: exclude it (LTEConfig.embeddings=False keeps it a replica)"
            )
        w = embedding.weight
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            heads=config.heads,
            total_heads=config.total_heads,
            rank=config.rank,
            alpha=config.alpha,
            reset=config.reset,
            quant=config.quant,
            prev_dtype=config.prev_dtype,
            device=w.device,
            dtype=w.dtype,
        )
        layer.layer_index = layer_index
        if w.is_meta:
            return layer
        with torch.no_grad():
            layer.set_base_weight(w.detach())
        layer.reset_parameters(config.head_ids, config.seed, layer_index, config.a_init, config.a_init_gain)
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, ...]`` (``B`` divisible by the heads) -> vectors ``[B, ..., D]``."""
        w = self.frozen_weight(self.lora_A.dtype, False)  # [V, D], no gradient: W is frozen
        if not self.training:  # eval: W alone
            return F.embedding(ids, w)
        h = self.heads
        if ids.shape[0] % h:
            raise ValueError(f"batch of {ids.shape[0]} does not split evenly across {h} LTE heads")
        idsh = ids.reshape(h, -1)  # head i gets sequences [i*B/h, (i+1)*B/h)
        head = torch.arange(h, device=ids.device)[:, None]
        s = self.scale
        # y = W[t] + s * (B_i[t] A_i - B'_i[t] A'_i)
        y = w[idsh] + s * (self.lora_B[head, idsh] @ self.lora_A)
        if self.has_prev:
            y = y - s * (self.lora_B_prev[head, idsh].to(y.dtype) @ self.lora_A_prev.to(y.dtype))
        return y.reshape(*ids.shape, self.embedding_dim)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The tied output layer: ``[B, ..., D] -> [B, ..., V]``, ``x (W + s (B_i A_i - B'_i A'_i))^T``."""
        return super().forward(x)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, heads={self.heads}, r={self.rank}, "
            f"s={self.scale:g}, N={self.total_heads}, quant={self.quant}"
            + (", reset=True" if self.reset else "")
        )


# -- tensor-level merge: shared by LTELinear.merge, the emulator and the parameter server ----
@torch.no_grad()
def merge_head_deltas(
    weight: torch.Tensor,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    weights: Sequence[float],
) -> None:
    """``W += sum_k w_k (B_k A_k - B'_k A'_k)``; the weights already hold ``s / N``.

    ``factors[k] = (B_k [m, r], A_k [r, n], B'_k, A'_k)``, the last two ``None`` for a head never
    merged. With one weight for every head (sync mode) this is two in-place GEMMs,
    ``W += w [B_1 .. B_K] [A_1 ; .. ; A_K]`` and the same with ``-w`` for the primed factors, and no
    elementwise work; otherwise each ``B`` is scaled by its own weight first.
    """
    if not factors:
        return
    dt = weight.dtype

    def cat(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)).to(dt)

    if all(w == weights[0] for w in weights):
        w = float(weights[0])
        weight.addmm_(cat([f[0] for f in factors], 1), cat([f[1] for f in factors], 0), alpha=w)
        merged = [f for f in factors if f[2] is not None]
        if merged:
            weight.addmm_(cat([f[2] for f in merged], 1), cat([f[3] for f in merged], 0), alpha=-w)
        return
    lefts, rights = [], []
    for (b, a, b_prev, a_prev), w in zip(factors, weights, strict=True):
        lefts.append(b.to(dt) * w)
        rights.append(a)
        if b_prev is not None:
            lefts.append(b_prev.to(dt) * -w)
            rights.append(a_prev)
    weight.addmm_(cat(lefts, 1), cat(rights, 0))


@dataclass
class HeadUpdate:
    """One head's factors after its local steps, keyed by the master name of each layer's weight."""

    head_id: int
    factors: dict[str, Factors]


@dataclass
class ReplicaUpdate:
    """One process's replica deltas (now minus the snapshot it trained from) and its head count."""

    heads: int
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def apply_updates(
    master: Mapping[str, torch.Tensor],
    prev_factors: dict[int, dict[str, Factors]],
    heads: Sequence[HeadUpdate],
    head_weights: Sequence[float],
    replicas: Sequence[tuple[float, ReplicaUpdate]] = (),
    *,
    scale: float,
    reset: bool = False,
) -> None:
    """Fold head updates and replica deltas into ``master`` in place.

    ``W += scale * sum_k head_weights[k] (B_k A_k - B'_k A'_k)`` per layer, where ``B'_k, A'_k``
    come from ``prev_factors`` (zero for a head never merged) and are replaced by ``B_k, A_k``
    (``B`` zeroed for the reset variant). Each replica ``p += w * delta``.
    ``head_weights`` are ``1/N`` in sync mode, discounted by staleness in async mode.
    """
    per_layer: dict[str, list] = {}
    per_layer_w: dict[str, list[float]] = {}
    for update, w in zip(heads, head_weights, strict=True):
        prev = prev_factors.get(update.head_id, {})
        for name, (b, a) in update.factors.items():
            b_prev, a_prev = prev.get(name, (None, None))  # never merged: nothing to subtract
            per_layer.setdefault(name, []).append((b, a, b_prev, a_prev))
            per_layer_w.setdefault(name, []).append(scale * w)
    for name, factors in per_layer.items():
        merge_head_deltas(master[name], factors, per_layer_w[name])
    for update in heads:
        prev_factors[update.head_id] = {
            name: (torch.zeros_like(b) if reset else b.detach().clone(), a.detach().clone())
            for name, (b, a) in update.factors.items()
        }
    for w, rep in replicas:
        for name, delta in rep.deltas.items():
            master[name].add_(delta.to(master[name].dtype), alpha=w)


# -- model conversion --------------------------------------------------------------------------
def prepare_model(model: nn.Module, config: LTEConfig) -> nn.Module:
    """Replace every ``nn.Linear`` with an ``LTELinear`` in place, and (``config.embeddings``) every
    ``nn.Embedding`` with an ``LTEEmbedding``; other trainable params become replicas.

    In strict mode a trainable parameter that neither heads nor replicas cover is an error that
    names it (an excluded Linear left trainable, a Linear whose weight is tied elsewhere, or any
    trainable parameter when ``replicas=False``).
    """
    linears = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    weight_owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        weight_owners.setdefault(id(p), []).append(name)
    uncovered: list[str] = []
    for index, (name, linear) in enumerate(linears):
        if name in config.exclude:
            continue
        if len(weight_owners.get(id(linear.weight), [])) > 1:
            uncovered.append(f"{name}.weight (tied to {weight_owners[id(linear.weight)]})")
            continue
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LTELinear.from_linear(linear, config, layer_index=index))
    if config.embeddings:
        _convert_embeddings(model, config, first_index=len(linears))
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")) or not p.requires_grad:
            continue
        if not config.replicas:
            uncovered.append(name)
        elif _module_path(name) in config.exclude and name.endswith(".weight"):
            uncovered.append(f"{name} (excluded Linear)")
    if uncovered and config.strict:
        raise ValueError(
            "strict LTE conversion: these trainable parameters are covered by neither LoRA heads nor "
            f"replicas: {', '.join(sorted(set(uncovered)))}; freeze them (requires_grad=False), enable "
            "replicas, or pass strict=False"
        )
    return model


def _convert_embeddings(model: nn.Module, config: LTEConfig, first_index: int) -> None:
    """Every ``nn.Embedding`` (and subclass) not in ``config.exclude`` becomes an ``LTEEmbedding``."""
    tables = [
        (n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding) and n not in config.exclude
    ]
    for index, (name, table) in enumerate(tables, start=first_index):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LTEEmbedding.from_embedding(table, config, layer_index=index))


def prepare_model_on_device(
    meta_model: nn.Module, config: LTEConfig, device: torch.device | str
) -> nn.Module:
    """``prepare_model`` for a model built on the meta device, allocated on ``device`` without its base.

    The heads' factors are initialised exactly as ``prepare_model`` does; the base weights (their
    quantised codes), biases and replicas are allocated but left uninitialised, for
    ``load_master_weights`` to fill. A worker, whose base always comes from the server, so never
    holds a full-precision copy of the model (for vit-b, 340 MB of fp32 it would only discard).
    """
    model = prepare_model(meta_model, config).to_empty(device=device)
    for layer in lte_layers(model).values():
        layer.reset_parameters(
            config.head_ids, config.seed, layer.layer_index, config.a_init, config.a_init_gain
        )
    return model


def _module_path(param_name: str) -> str:
    return param_name.rpartition(".")[0]


def lte_layers(model: nn.Module) -> dict[str, LTELinear]:
    """Every LTE layer, keyed by the master name of its weight (``blocks.0.attn.qkv.weight``)."""
    return {
        f"{name}.weight" if name else "weight": m
        for name, m in model.named_modules()
        if isinstance(m, LTELinear)
    }


def replica_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters outside the heads, under their plain-model names."""
    return {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and not name.endswith(("lora_A", "lora_B"))
    }


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def export_head_factors(model: nn.Module, local_index: int) -> dict[str, Factors]:
    """Local head ``local_index``'s current ``(B, A)`` per layer (detached copies)."""
    return {
        name: (m.lora_B[local_index].detach().clone(), m.lora_A[local_index].detach().clone())
        for name, m in lte_layers(model).items()
    }


def export_replica_deltas(model: nn.Module, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replica value now minus its value in the snapshot the process trained from."""
    return {name: (p.detach() - base[name].to(p.dtype)) for name, p in replica_parameters(model).items()}


@torch.no_grad()
def load_master_weights(model: nn.Module, weights: Mapping[str, torch.Tensor | QuantizedTensor]) -> None:
    """Load base weights (full or quantised) and replica values from a master state dict.

    Names are those of the plain zoo model. Missing or unexpected names are errors, so a
    snapshot can never silently leave part of the model behind.
    """
    layers = lte_layers(model)
    replicas = replica_parameters(model)
    expected = set(layers) | set(replicas)
    missing, unexpected = expected - set(weights), set(weights) - expected
    frozen = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    unexpected -= frozen  # frozen plain-model params may travel too; they load below
    if missing or unexpected:
        raise KeyError(
            f"master weights do not match the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    for name, value in weights.items():
        if name in layers:
            layers[name].set_base_weight(
                value if isinstance(value, QuantizedTensor) else value.to(layers[name].lora_A.dtype)
            )
        elif name in replicas:
            replicas[name].copy_(value)
        else:
            _set_tensor(model, name, value)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    getattr(owner, attr).copy_(value)


@torch.no_grad()
def commit_merge(model: nn.Module) -> None:
    """Every LTE layer: ``(B', A') <- (B, A)`` (the worker's half of a merge)."""
    for layer in lte_layers(model).values():
        layer.commit()


@torch.no_grad()
def load_head_factors(
    model: nn.Module,
    local_index: int,
    factors: Mapping[str, Factors],
    prev: Mapping[str, Factors] | None = None,
) -> None:
    """Continue a head elsewhere: set its current factors (and its last-merged ones, default the same)."""
    prev = factors if prev is None else prev
    for name, layer in lte_layers(model).items():
        b, a = factors[name]
        bp, ap = prev[name]
        layer.lora_B[local_index].copy_(b)
        layer.lora_A[local_index].copy_(a)
        layer.lora_B_prev[local_index].copy_(bp)
        layer.lora_A_prev[local_index].copy_(ap)
        layer.has_prev = True
        layer.invalidate_frozen()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The master-style state of an LTE model: base ``W`` per layer (dequantised) plus everything else."""
    out: dict[str, torch.Tensor] = {}
    layers = lte_layers(model)
    skip = {_module_path(n) for n in layers}
    for name, t in model.state_dict().items():
        if _module_path(name) in skip and name.rpartition(".")[2] != "bias":
            continue
        out[name] = t.detach().clone()
    for name, layer in layers.items():
        out[name] = layer.base_weight().detach().clone()
    return out


def factor_names(model: nn.Module) -> Iterable[str]:
    return lte_layers(model).keys()
