"""The LoRA-the-Explorer layers: ``LTELinear`` and the LTE forms of Conv2d, MultiheadAttention,
Embedding, transformers' Conv1D and a tied output layer (model conversion: ``lte.common.core.policy``;
the merge arithmetic: ``lte.common.core.merge``; an LTE model's state by name: ``lte.common.core.model_state``).

The math (docs/design.md section 2). Scale ``s = alpha / r``; ``N`` heads in the whole job. Head ``i``
with factors ``(B_i, A_i)`` and the factors of its last merge ``(B'_i, A'_i)`` computes

    y = W x + s * (B_i A_i x - B'_i A'_i x)

``LTELinear`` holds ``h`` local heads vectorised (the batch is split evenly across them); its own
``merge`` (one process holding every head) folds them into ``W`` through ``merge_head_deltas``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lte.common.core.merge import Factors, merge_head_deltas
from lte.common.core.quant import QUANT_KINDS, QuantizedTensor, quantize, quantized_zeros

A_INITS = ("semi-orthogonal", "reference", "kaiming", "xavier")


@dataclass
class LTEConfig:
    """How a model is converted: heads on this process, the job's total, rank, scale, init."""

    heads: int = 1  # h: heads held (vectorised) by this process
    total_heads: int | None = None  # N: heads in the whole job (merge weight 1/N); None -> heads
    rank: int = 16
    alpha: float = 64.0
    reset: bool = False  # the paper's reset variant: B <- 0 after every merge
    a_init: str = "reference"  # init_lora_a's kinds; reference: the paper authors' scale
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

    def layer_kwargs(self) -> dict:
        """What every LTE layer built by this conversion takes from it."""
        keys = ("heads", "total_heads", "rank", "alpha", "reset", "quant", "prev_dtype")
        return {k: getattr(self, k) for k in keys}


def _seed_for(seed: int, head_id: int, layer_index: int) -> int:
    """A stable 63-bit seed per (job seed, head, layer): the same head inits the same anywhere."""
    x = (seed * 0x9E3779B97F4A7C15 + head_id * 0xBF58476D1CE4E5B9 + layer_index * 0x94D049BB133111EB) & (
        (1 << 64) - 1
    )
    x ^= x >> 31
    return x & ((1 << 63) - 1)


def init_lora_a(a: torch.Tensor, kind: str, generator: torch.Generator, gain: float = 1.0) -> None:
    """Initialise one head's ``A [r, n]`` in place (``n``: the layer's fan-in; a conv's
    ``in * kh * kw``, an embedding's width ``D``), times ``gain``.

    - semi-orthogonal: orthonormal rows (columns when ``r > n``) scaled to spectral norm
      ``sqrt(r / n)``, the spectral condition of Bernstein et al. (fan_out / fan_in of ``A``).
    - reference: the same orthogonal draw scaled to spectral norm ``sqrt(n / r)``, as the paper
      authors' code does (github minyoungg/LTE, ``lte/ddp/linear.py`` and ``lte/mhlora/linear.py``,
      ``reset_lora_parameters``: ``orthogonal_(A)`` then ``A *= sqrt(A.shape[1] / A.shape[0])``).
      That is ``n / r`` times semi-orthogonal's: entries of size about ``1 / sqrt(r)``, rows of norm
      ``sqrt(n / r)`` (for ``r <= n``), whatever the fan-in.
    - kaiming / xavier: the usual uniform inits (bounds ``sqrt(3 / n)``, ``sqrt(6 / (n + r))``).

    Raises ``ValueError`` for an unknown ``kind``.
    """
    r, n = a.shape
    with torch.no_grad():
        if kind in ("semi-orthogonal", "reference"):
            g = torch.randn(max(r, n), min(r, n), generator=generator, dtype=torch.float64)
            q, rr = torch.linalg.qr(g)
            q = q * torch.sign(torch.diagonal(rr)).clamp(min=0).mul(2).sub(1)  # unique Haar sample
            q = q.T if r < n else q
            norm = math.sqrt(r / n) if kind == "semi-orthogonal" else math.sqrt(n / r)
            a.copy_(q[:r, :n] * (norm * gain))
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
    if kind == "meta":  # no autocast there (the start-up check runs the model on meta tensors)
        return x.dtype
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except TypeError:  # torch < 2.4: no per-device query; only CUDA autocast is common there
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return x.dtype


_M = TypeVar("_M", bound=nn.Module)


def _expect(module: nn.Module, kind: type[_M]) -> _M:
    """``module`` as the plain type an LTE class converts (``LTE_MODULES`` pairs them by isinstance)."""
    if not isinstance(module, kind):
        raise TypeError(f"expected an {kind.__name__} to convert, got {type(module).__name__}")
    return module


class LayoutError(ValueError):
    """An LTE layer saw an input whose dim 0 is not the stacked batch of its heads."""


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

    # Registered as buffers in __init__; declared here for the type checker (Module.__getattr__
    # would otherwise type them "Tensor | Module"). ``weight`` is None on a quantised layer.
    lora_A_prev: torch.Tensor
    lora_B_prev: torch.Tensor
    weight: torch.Tensor | None
    bias: nn.Parameter | None
    # the master weight is W^T, [in, out] (transformers' Conv1D): the base is stored, loaded,
    # quantised and merged in that layout, and factors travel as (A^T, B^T) so the master merges
    # them as W^T += B_wire A_wire with no transposition on the server (``wire_factors``)
    transposed: bool = False

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
        dtype = dtype or torch.get_default_dtype()
        prev_dtype = prev_dtype or dtype
        self.lora_A = nn.Parameter(torch.zeros(heads, rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(heads, out_features, rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer(
            "lora_A_prev", torch.zeros(heads, rank, in_features, device=device, dtype=prev_dtype)
        )
        self.register_buffer(
            "lora_B_prev", torch.zeros(heads, out_features, rank, device=device, dtype=prev_dtype)
        )
        self.qweight: QuantizedTensor | None = None
        # False only while B' A' is known to be zero (fresh, or reset variant): skips its work
        self.has_prev = False
        self.layer_index = 0  # position among the model's Linears; set by from_linear
        # master-side identity: the plain model's name of this weight (relative to the parent module
        # when it is not ``<this module>.weight``, e.g. MultiheadAttention's ``in_proj_weight``) and
        # its shape there (a conv kernel is [out, in, kh, kw]; here it is the [out, in*kh*kw] matrix)
        self.master_attr: str | None = None
        self.master_shape: tuple[int, ...] = (out_features, in_features)
        self.name = ""  # the master name, for messages; set at conversion
        # rows of the stacked batch (heads x per-head batch) a training forward must see on dim 0;
        # None: unchecked (set by expect_stacked_batch)
        self.expected_rows: int | None = None
        # Opt-in: keep the frozen weight (dequantised, B'A' folded) between steps, in the compute
        # dtype. It only changes with the base or B', A', which change between rounds: every
        # mutator below clears it. Costs one [m, n] (per head when folded) per layer.
        self.cache_frozen = False
        self._frozen_cache: dict[tuple[torch.dtype, bool], torch.Tensor] = {}
        if quant == "none":
            self.register_buffer("weight", torch.zeros(*self.stored_shape, device=device, dtype=dtype))
        else:
            self.weight = None
            self.set_base_weight(quantized_zeros(quant, self.stored_shape, device=device))

    @property
    def stored_shape(self) -> tuple[int, int]:
        """The base matrix as the master holds it: ``[out, in]``, or ``[in, out]`` when ``transposed``."""
        m, n = self.out_features, self.in_features
        return (n, m) if self.transposed else (m, n)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LTEConfig, layer_index: int = 0) -> LTELinear:
        return cls._convert(linear.weight, linear.bias, config, layer_index)

    @classmethod
    def _convert(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        config: LTEConfig,
        layer_index: int,
        **extra,
    ) -> LTELinear:
        """An LTE layer over the matrix ``weight`` (``[m, n]``, or ``[m, ...]`` viewed as ``[m, n]``)."""
        w = weight
        layer = cls(
            int(w[0].numel()),
            int(w.shape[0]),
            bias=bias is not None,
            **config.layer_kwargs(),
            device=w.device,
            dtype=w.dtype,
            **extra,
        )
        layer.master_shape = tuple(w.shape)
        layer.layer_index = layer_index  # seeds its heads' A: kept for re-initialising after to_empty
        if bias is not None and layer.bias is not None:  # built with bias=True just above
            layer.bias.requires_grad_(bias.requires_grad)
        if w.is_meta:  # built without storage (prepare_model_on_device): nothing to copy yet
            return layer
        with torch.no_grad():
            layer.set_base_weight(w.detach())
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias.detach())
        layer.reset_parameters(config.head_ids, config.seed, layer_index, config.a_init, config.a_init_gain)
        return layer

    # -- the conversion table's interface (lte.common.core.policy.LTE_MODULES) --------------------
    @staticmethod
    def matrices(module: nn.Module) -> tuple[str, ...]:
        """Names (relative to ``module``) of the parameters that become LTE matrices."""
        return ("weight",)

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        """Why ``module`` cannot be converted (it then trains as replicas), or None."""
        if type(module).forward is not nn.Linear.forward:
            return f"{type(module).__name__} overrides Linear.forward"
        return None

    @classmethod
    def from_module(cls, module: nn.Module, config: LTEConfig, layer_index: int) -> nn.Module:
        return cls.from_linear(_expect(module, nn.Linear), config, layer_index)

    def reset_parameters(
        self,
        head_ids: Sequence[int] | None = None,
        seed: int = 0,
        layer_index: int = 0,
        a_init: str = "reference",
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
            dense = self._dense_weight()
            dense.copy_(weight.reshape(dense.shape))  # a conv kernel arrives [out, in, kh, kw]
            return
        if not isinstance(weight, QuantizedTensor):
            weight = quantize(weight.reshape(self.stored_shape), self.quant)
        q = weight
        if q.kind != self.quant or tuple(q.shape) != self.stored_shape:
            raise ValueError(
                f"expected a {self.quant} weight of shape {self.stored_shape}, got {q.kind} {tuple(q.shape)}"
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
        """``W [m, n]`` as the heads see it: the weight itself, or ``q(W)`` dequantised (a view of the
        stored ``[n, m]`` transposed when ``transposed``)."""
        if self.qweight is None:
            dense = self._dense_weight()
            dense = dense if dtype is None else dense.to(dtype)
        else:
            dense = self.qweight.dequantize(dtype or self.lora_A.dtype)
        return dense.mT if self.transposed else dense

    def master_weight(self) -> torch.Tensor:
        """The base in the plain model's layout and shape (``master_shape``): what an export holds."""
        w = self.base_weight()
        return (w.mT if self.transposed else w).reshape(self.master_shape)

    def wire_factors(self, local_index: int) -> Factors:
        """Head ``local_index``'s ``(B, A)`` as the master merges them: ``(B [m, r], A [r, n])``, or for
        a ``transposed`` layer ``(A^T [n, r], B^T [r, m])``, whose product is the delta of ``W^T``."""
        b, a = self.lora_B[local_index], self.lora_A[local_index]
        return (a.mT, b.mT) if self.transposed else (b, a)

    def _dense_weight(self) -> torch.Tensor:
        """The full-precision base ``W`` of an unquantised layer (a quantised one holds ``qweight``)."""
        if self.weight is None:
            raise RuntimeError(
                f"this layer holds W quantised ({self.quant}): it has no full-precision weight"
            )
        return self.weight

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

    def check_layout(self, x: torch.Tensor) -> None:
        """Refuse an input whose dim 0 is not the stacked batch: the heads would train on each other's samples."""
        rows = self.expected_rows
        if (rows is not None and x.shape[0] != rows) or x.shape[0] % self.heads:
            want = f"{rows} (heads x batch)" if rows is not None else f"a multiple of {self.heads} heads"
            raise LayoutError(
                f"LTE layer {self.name or type(self).__name__} got an input of shape {tuple(x.shape)}: dim 0 "
                f"must be the stacked batch, {want}; keep the batch on dim 0 of every layer's input "
                "(batch_first=True; x.view(batch, -1, features) rather than folding the batch into another dim)"
            )

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
            return self._add_bias(y)
        self.check_layout(x)
        xh = x.reshape(h, -1, n)  # head i gets samples [i*B/h, (i+1)*B/h)
        A: torch.Tensor = self.lora_A
        B: torch.Tensor = self.lora_B
        A_prev, B_prev, s = self.lora_A_prev, self.lora_B_prev, self.scale
        # y = W x + s * (B_i A_i x - B'_i A'_i x), all heads at once (reference_forward is the same
        # equation head by head). The last-merged term is folded into the weight when a head's rows
        # outnumber m n / (m + n), where that is the cheaper way to compute it.
        fold = self.has_prev and xh.shape[1] * (m + n) >= m * n
        # one cast to the compute dtype for both products: under autocast an fp32 input (a
        # LayerNorm's output) was cast once per product, and its two gradients cast back to fp32
        # and summed there (BENCHMARKS: the copies and adds an LTE step adds on a GPU)
        xh = xh.to(_compute_dtype(xh))
        y = _FrozenBaseMatmul.apply(xh, self, fold)  # one GEMM over all heads' rows (a bmm if folded)
        if self.has_prev and not fold:  # both low-rank terms as one: x [A_i; A'_i]^T [B_i, -B'_i]^T
            A = torch.cat([A, A_prev.to(A.dtype)], dim=1)  # [h, 2r, n]
            B = torch.cat([B, -B_prev.to(B.dtype)], dim=2)  # [h, m, 2r]
        # two batched GEMMs, the second accumulating into y in place (out of place, baddbmm first
        # copies all of y); in place autocast casts nothing, so B goes to y's dtype here
        y = y.baddbmm_((xh @ A.mT).to(y.dtype), B.mT.to(y.dtype), alpha=s)
        return self._add_bias(y.reshape(*x.shape[:-1], m))

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        """``y + b`` in ``y``'s dtype, as ``nn.Linear`` under autocast: a bf16 output stays bf16
        (type promotion with the fp32 bias would make every LTE layer's output fp32, twice the
        bytes, and cast its gradient back). Without autocast the dtypes agree and nothing changes."""
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """docs/design.md section 2 as written, one head at a time (the check on ``forward``; slow).

        Training: ``y_i = W x_i + s (B_i A_i x_i - B'_i A'_i x_i) (+ b)`` on head i's slice of the
        batch; eval: ``W x + b``. ``x [batch, ..., n]`` -> ``[batch, ..., m]``.
        """
        m, n, h, s = self.out_features, self.in_features, self.heads, self.scale
        w = self.base_weight(x.dtype)
        if not self.training:
            y = x @ w.T
        else:
            ys = []
            for i, xi in enumerate(x.reshape(h, -1, n)):
                b_prev, a_prev = self.lora_B_prev[i].to(x.dtype), self.lora_A_prev[i].to(x.dtype)
                low_rank = self.lora_B[i] @ (self.lora_A[i] @ xi.T) - b_prev @ (a_prev @ xi.T)
                ys.append(xi @ w.T + s * low_rank.T)
            y = torch.stack(ys).reshape(*x.shape[:-1], m)
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
        dense = self._dense_weight()
        merge_head_deltas(dense.mT if self.transposed else dense, factors, weights)
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


class LTEConv2d(LTELinear):
    """``nn.Conv2d`` as an LTE matrix over its unfolded patches.

    The kernel ``[out, in, kh, kw]`` is the matrix ``W [m = out, n = in * kh * kw]`` (the paper's
    reference code treats conv projections so); head ``i`` convolves its share of the batch with
    the kernel ``W + s (B_i A_i - B'_i A'_i)`` reshaped: docs/design.md section 2 with ``x`` the patches.
    All heads run as one grouped convolution. Input ``[heads * batch, in, H, W]``.
    """

    def __init__(self, *args, conv: nn.Conv2d | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kernel_size = conv.kernel_size if conv is not None else (1, 1)
        self.stride = conv.stride if conv is not None else (1, 1)
        self.padding = conv.padding if conv is not None else (0, 0)
        self.dilation = conv.dilation if conv is not None else (1, 1)
        self.in_channels = conv.in_channels if conv is not None else self.in_features

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        if type(module).forward is not nn.Conv2d.forward:
            return f"{type(module).__name__} overrides Conv2d.forward"
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups}) is not one matrix"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only 'zeros' is converted)"
        return None

    @classmethod
    def from_module(cls, module: nn.Module, config: LTEConfig, layer_index: int) -> nn.Module:
        conv = _expect(module, nn.Conv2d)
        return cls._convert(conv.weight, conv.bias, config, layer_index, conv=conv)

    def _conv(self, x: torch.Tensor, kernel: torch.Tensor, groups: int) -> torch.Tensor:
        kernel = kernel.reshape(-1, self.in_channels, *self.kernel_size)
        return F.conv2d(x, kernel, None, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)[:, None, None]
        if not self.training:  # eval: W alone
            y = self._conv(x.to(dtype), self.base_weight(dtype), 1)
            return y if bias is None else y + bias
        if x.dim() != 4:
            raise LayoutError(
                f"LTE layer {self.name or 'LTEConv2d'} got an input of shape {tuple(x.shape)}: expected "
                "[heads x batch, channels, height, width]"
            )
        self.check_layout(x)
        h, m, s = self.heads, self.out_features, self.scale
        # per head: W + s (B_i A_i - B'_i A'_i), a [h, m, n] stack of kernels
        kernels = self.frozen_weight(dtype, self.has_prev).detach()
        kernels = kernels + s * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        b = x.shape[0] // h
        xg = x.to(dtype).reshape(h, b, *x.shape[1:]).transpose(0, 1).reshape(b, h * x.shape[1], *x.shape[2:])
        y = self._conv(xg, kernels.expand(h, m, self.in_features), h)  # [b, h*m, H', W']
        y = y.reshape(b, h, m, *y.shape[2:]).transpose(0, 1).reshape(h * b, m, *y.shape[2:])
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (
            f"kernel={tuple(self.master_shape)}, stride={self.stride}, padding={self.padding}, "
            + super().extra_repr()
        )


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.MultiheadAttention's masks: boolean True = may not attend; a float mask is added to the scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class LTEMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with its packed input projection ``in_proj_weight [3E, E]`` and its
    output projection ``out_proj [E, E]`` as LTE layers; attention itself as in torch.

    Same call and return as ``nn.MultiheadAttention`` (masks, ``need_weights``, ``batch_first``);
    the LTE layers always see the batch on dim 0 (a sequence-first input is transposed first).
    Master names are the plain module's: ``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``.
    """

    def __init__(self, mha: nn.MultiheadAttention, config: LTEConfig, layer_index: int) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim, self.dropout, self.batch_first = mha.head_dim, mha.dropout, mha.batch_first
        self.in_proj = LTELinear._convert(mha.in_proj_weight, None, config, layer_index)
        self.in_proj.master_attr = "in_proj_weight"
        self.in_proj_bias = (
            None
            if mha.in_proj_bias is None
            else nn.Parameter(mha.in_proj_bias.detach().clone(), requires_grad=mha.in_proj_bias.requires_grad)
        )
        self.out_proj = LTELinear.from_linear(mha.out_proj, config, layer_index + 1)

    @staticmethod
    def matrices(module: nn.Module) -> tuple[str, ...]:
        return ("in_proj_weight", "out_proj.weight")

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        if type(module).forward is not nn.MultiheadAttention.forward:
            return f"{type(module).__name__} overrides MultiheadAttention.forward"
        if not module._qkv_same_embed_dim:
            return "kdim/vdim differ from embed_dim (separate q, k, v projections)"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv / add_zero_attn"
        return None

    @classmethod
    def from_module(cls, module: nn.Module, config: LTEConfig, layer_index: int) -> nn.Module:
        return cls(_expect(module, nn.MultiheadAttention), config, layer_index)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        same = query is key and key is value
        batched = query.dim() == 3
        if not batched:  # one sequence: a batch of one
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [L, B, E] -> [B, L, E]: the LTE layers split dim 0 across heads
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        e, nh, hd = self.embed_dim, self.num_heads, self.head_dim
        if same:
            q, k, v = self.in_proj(query).split(e, dim=-1)
        else:
            q, k, v = (self.in_proj(t)[..., i * e : (i + 1) * e] for i, t in enumerate((query, key, value)))
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias.to(q.dtype).split(e)  # in the product's dtype, as LTELinear
            q, k, v = q + bq, k + bk, v + bv
        b, length, source = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(b, -1, nh, hd).transpose(1, 2) for t in (q, k, v))  # [B, heads, L, hd]
        mask = None
        if attn_mask is not None:
            mask = _additive_mask(attn_mask, q.dtype)
            mask = mask.reshape(b, nh, length, source) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            pad = _additive_mask(key_padding_mask, q.dtype).reshape(b, 1, 1, source)
            mask = pad if mask is None else mask + pad
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            if causal:
                scores = scores.masked_fill(
                    torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1), float("-inf")
                )
            elif mask is not None:
                scores = scores + mask
            probs = F.dropout(scores.softmax(dim=-1), dropout, self.training)
            out = probs @ v
            weights = probs.mean(dim=1) if average_attn_weights else probs
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, e))
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


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

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        """Why an embedding stays a replica: what a low-rank table cannot keep."""
        if type(module).forward is not nn.Embedding.forward:
            return f"{type(module).__name__} overrides Embedding.forward"
        if module.padding_idx is not None or module.max_norm is not None or module.sparse:
            return "padding_idx, max_norm or sparse gradients"
        return None

    @classmethod
    def from_module(cls, module: nn.Module, config: LTEConfig, layer_index: int) -> nn.Module:
        return cls.from_embedding(_expect(module, nn.Embedding), config, layer_index)

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
            **config.layer_kwargs(),
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
        if ids.shape[0] == 1 and h > 1 and self.expected_rows:
            # ids shared by the whole batch (transformers' position ids [1, L]): each head reads them
            # through its own factors, so the output has the stacked batch's rows (it broadcasts the same)
            ids = ids.expand(self.expected_rows, *ids.shape[1:])
        if ids.shape[0] % h:
            raise LayoutError(
                f"LTE embedding {self.name or 'LTEEmbedding'}: a batch of {ids.shape[0]} ids does not split "
                f"evenly across {h} LTE heads; keep the batch on dim 0 of the ids"
            )
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


class LTEConv1D(LTELinear):
    """transformers' ``Conv1D`` (GPT-2's projections: ``y = x W_c + b`` with ``W_c [in, out]``) as an
    LTE matrix: ``W = W_c^T [out, in]`` trains exactly as an ``nn.Linear``'s weight (docs/design.md
    section 2), while the master, the snapshots, the merge and the export keep ``W_c``'s ``[in, out]``
    layout (``transposed``): factors travel as ``(A^T [in, r], B^T [r, out])``, the delta of ``W_c``.
    """

    transposed = True

    @staticmethod
    def unsupported(module: nn.Module) -> str | None:
        cls = conv1d_class()
        if cls is None or type(module).forward is not cls.forward:
            return f"{type(module).__name__} overrides Conv1D.forward"
        return None

    @classmethod
    def from_module(cls, module: nn.Module, config: LTEConfig, layer_index: int) -> nn.Module:
        w, bias = module.weight, module.bias  # [in, out], [out]
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise TypeError(f"expected a Conv1D with a 2-D weight, got {type(module).__name__}")
        layer = cls(int(w.shape[0]), int(w.shape[1]), bias=bias is not None, **config.layer_kwargs(),
                    device=w.device, dtype=w.dtype)  # fmt: skip
        layer.master_shape = tuple(w.shape)
        layer.layer_index = layer_index
        if isinstance(bias, torch.Tensor) and layer.bias is not None:
            layer.bias.requires_grad_(bias.requires_grad)
        if w.is_meta:
            return layer
        with torch.no_grad():
            layer.set_base_weight(w.detach())
            if isinstance(bias, torch.Tensor) and layer.bias is not None:
                layer.bias.copy_(bias.detach())
        layer.reset_parameters(config.head_ids, config.seed, layer_index, config.a_init, config.a_init_gain)
        return layer


def conv1d_class() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` when transformers is already imported (lte never imports it for this)."""
    import sys

    module = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(module, "Conv1D", None) if module is not None else None
    return cls if isinstance(cls, type) else None


class LTETiedLinear(nn.Module):
    """An output layer whose weight is an input embedding's table (weight tying, as transformers'
    ``lm_head`` and ``embed_tokens``): ``y = x W^T (+ b)`` through the table's heads,
    ``LTEEmbedding.attend``, so one ``W [V, D]`` and one ``(B_i, A_i)`` serve both uses in every
    head, merge and export. The table is not a submodule here (its owner holds it in the state);
    ``bias`` (``[V]``), when the layer has one, is a replica.
    """

    def __init__(self, embedding: LTEEmbedding, bias: torch.Tensor | None) -> None:
        super().__init__()
        self._table = (embedding,)  # a tuple: not registered, so the state holds the table once
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        )

    @property
    def embedding(self) -> LTEEmbedding:
        return self._table[0]

    @property
    def weight(self) -> torch.Tensor | None:
        """The tied table's base ``W [V, D]`` (for code that reads ``lm_head.weight``)."""
        return self.embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embedding.attend(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"tied to {self.embedding.name or 'an LTEEmbedding'}" + (
            ", bias=False" if self.bias is None else ""
        )
