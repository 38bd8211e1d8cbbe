"""Training precision of a worker's steps: fp32, or bf16 / fp16 autocast (fp16 with loss scaling).

Only the compute is lowered. The heads' factors ``A, B``, the replicas, their gradients and the
AdamW moments stay in the job's dtype (fp32): autocast casts copies for the matmuls and the
gradients land on the fp32 parameters. ``B', A'`` keep the uplink's dtype as before.

``auto`` (the default) is bf16 on CUDA devices that support it and fp32 everywhere else, so a CPU
run is bit-identical to one without this module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """The precision in effect: ``requested``, or for ``auto`` bf16 on CUDA with bf16 support, else fp32.

    Raises ValueError for an unknown name.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


class MixedPrecision:
    """Autocast and (for fp16) dynamic loss scaling for one training loop on one device.

    ``with mp.autocast(): loss = ...`` then ``mp.step(loss, optimizer)`` replaces
    ``loss.backward(); optimizer.step()``. For fp16 the loss is scaled before backward and the
    gradients unscaled before the step (``torch.amp.GradScaler``); a step whose gradients overflow
    is skipped and the scale halved, as the scaler does.
    """

    def __init__(self, precision: str, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = AUTOCAST_DTYPES.get(self.precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimiser step (scaled for fp16)."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def __repr__(self) -> str:
        return f"MixedPrecision({self.precision}, {self.device})"
