"""The model half of the version handshake (issue 24, item 4): what model a job builds here.

Server and worker each build the job's plain model on the meta device (no memory, no init) and
describe it: every module's path and class, every parameter's and buffer's name and shape, and,
for a user factory (``--model package.module:factory``), a hash of the factory module's source.
Two sides whose descriptions differ would train different models under one job (a ReLU where the
other side has GELU has the same shapes); ``fingerprint_difference`` names the first difference.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

import torch
from torch import nn

from lte.common.config import JobConfig


def model_tree(model: nn.Module) -> str:
    """One line per module (``<path> <module>.<class>``), parameter and buffer (``<name> <shape>``)."""
    lines = [
        f"module {name or '<root>'} {type(m).__module__}.{type(m).__qualname__}"
        for name, m in model.named_modules()
    ]
    lines += [f"param {name} {list(p.shape)}" for name, p in model.named_parameters()]
    lines += [f"buffer {name} {list(b.shape)}" for name, b in model.named_buffers()]
    return "\n".join(lines)


def factory_source_hash(spec: str) -> str:
    """sha256 (16 hex) of the source of a user factory's module; "" for a zoo model (the package
    version covers it) or a module whose source cannot be read."""
    module_name, sep, _ = spec.partition(":")
    if not sep:
        return ""
    try:
        source = inspect.getsource(importlib.import_module(module_name))
    except (ImportError, OSError, TypeError):
        return ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def model_fingerprint(job: JobConfig) -> tuple[str, str]:
    """(fingerprint, tree) of ``job``'s model: ``tree <sha256 of the tree, 16 hex> factory <hash|->``."""
    from lte.common.trainer import build_job_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the caller's RNG stays as it was
        model = build_job_model(job)
    tree = model_tree(model)
    digest = hashlib.sha256(tree.encode()).hexdigest()[:16]
    return f"tree {digest} factory {factory_source_hash(job.model) or '-'}", tree


def fingerprint_difference(server: tuple[str, str], here: tuple[str, str], spec: str) -> str | None:
    """None when the fingerprints agree (or the server sent none: an older server); else one phrase
    naming the first difference of the module trees, or the factory source."""
    (server_fp, server_tree), (fp, tree) = server, here
    if not server_fp or server_fp == fp:
        return None
    theirs, mine = server_tree.splitlines(), tree.splitlines()
    for a, b in zip(theirs, mine, strict=False):
        if a != b:
            return f"the model differs: the server has {a!r}, this worker {b!r}"
    if len(theirs) != len(mine):
        return f"the model differs: the server's has {len(theirs)} modules/tensors, this worker's {len(mine)}"
    return (
        f"the source of the model factory {spec} differs (server {server_fp.rsplit(' ', 1)[-1]}, "
        f"this worker {fp.rsplit(' ', 1)[-1]})"
    )
