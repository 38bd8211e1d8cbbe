"""The model half of the version handshake (issue 24, item 4): what model a job builds here.

Server and worker each build the job's plain model on the meta device (no memory, no init) and
describe it: every module's path and class, every parameter's and buffer's name and shape, and,
for a user factory (``--model package.module:factory``), a hash of the factory module's source.
Two sides whose descriptions differ would train different models under one job (a ReLU where the
other side has GELU has the same shapes); ``fingerprint_difference`` names the first difference.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import json
import textwrap
import threading

import torch
from torch import nn

from lte.common.job.config import JobConfig
from lte.common.job.trainer import build_job_model


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


# CPython 3.11's ast module keeps its AST-constructor recursion-depth count in the interpreter's
# module state, shared by its threads: two threads parsing at once (in-process workers joining
# together; seen in `make test`) can fail with "SystemError: AST constructor recursion depth
# mismatch" (a threaded report: python/cpython#106905). One parse at a time, and once per class.
_AST_LOCK = threading.Lock()
_CODE_BY_CLASS: dict[type, str] = {}  # holds the classes, so an id is never reused


def _code_of(cls: type) -> str:
    """A class's source as its syntax tree without docstrings (comments, formatting and docs do not
    count); "" when the source cannot be read. Cached per class; safe to call from several threads."""
    with _AST_LOCK:
        if cls not in _CODE_BY_CLASS:
            _CODE_BY_CLASS[cls] = _syntax_without_docstrings(cls)
        return _CODE_BY_CLASS[cls]


def clear_code_cache() -> None:
    """Forget the classes' parsed code (a test parses them again, from several threads at once)."""
    with _AST_LOCK:
        _CODE_BY_CLASS.clear()


def _syntax_without_docstrings(cls: type) -> str:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return ""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return ast.dump(tree)


def module_code_hash(model: nn.Module) -> str:
    """sha256 (16 hex) of the code of every module class in ``model`` that is not torch's: a zoo
    model's forward (``F.gelu`` vs ``F.relu`` has the same tree) or a user block imported from
    another file than the factory's. For a transformers model, its config (the model's code is the
    transformers version's)."""
    parts = []
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: (c.__module__, c.__qualname__)):
        if cls.__module__.split(".")[0] in ("torch", "transformers"):
            continue
        parts.append(f"{cls.__module__}.{cls.__qualname__}\n{_code_of(cls)}")
    config = getattr(model, "config", None)
    if (
        config is not None
        and hasattr(config, "to_dict")
        and any(type(m).__module__.startswith("transformers.") for m in model.modules())
    ):
        values = {
            k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")
        }
        parts.append(json.dumps(values, sort_keys=True, default=str))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def model_fingerprint(job: JobConfig) -> tuple[str, str]:
    """(fingerprint, tree) of ``job``'s model: ``tree <sha256 of the tree, 16 hex> factory <hash|->
    code <hash of the module classes' code>``."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the caller's RNG stays as it was
        model = build_job_model(job)
    tree = model_tree(model)
    digest = hashlib.sha256(tree.encode()).hexdigest()[:16]
    factory = factory_source_hash(job.model) or "-"
    return f"tree {digest} factory {factory} code {module_code_hash(model)}", tree


def fingerprint_difference(
    server: tuple[str, str], here: tuple[str, str], spec: str, who: str = "this worker"
) -> str | None:
    """None when the fingerprints agree (or the server sent none: an older server); else one phrase
    naming the first difference of the module trees (when both trees are given; else the tree
    hashes), or the factory source, or the modules' code. ``who`` names the side of ``here`` ("this
    worker" on the worker; the server says "the worker")."""
    (server_fp, server_tree), (fp, tree) = server, here
    theirs_parts, mine_parts = server_fp.split(), fp.split()
    n = min(len(theirs_parts), len(mine_parts))  # a server from before the code hash sends fewer parts
    if not server_fp or theirs_parts[:n] == mine_parts[:n]:
        return None

    def part(parts: list[str], i: int) -> str:
        return _short(parts[i]) if len(parts) > i else "(none)"

    if theirs_parts[:2] != mine_parts[:2]:
        if not tree or not server_tree:
            return (
                f"the model's module tree or parameter shapes differ (server tree {part(theirs_parts, 1)}, "
                f"{who} tree {part(mine_parts, 1)})"
            )
        theirs, mine = server_tree.splitlines(), tree.splitlines()
        for a, b in zip(theirs, mine, strict=False):
            if a != b:
                return f"the model differs: the server has {_short(a)!r}, {who} {_short(b)!r}"
        return f"the model differs: the server's has {len(theirs)} modules/tensors, {who}'s {len(mine)}"
    if theirs_parts[2:4] != mine_parts[2:4]:
        return (
            f"the source of the model factory {spec} differs (server {part(theirs_parts, 3)}, "
            f"{who} {part(mine_parts, 3)})"
        )
    return (
        f"the code of the model's modules differs (server code {part(theirs_parts, 5)}, {who} code "
        f"{part(mine_parts, 5)}): the same model with another forward (a different lte release, edited "
        "model code, or another transformers config)"
    )


def _short(text: str, limit: int = 200) -> str:
    """``text`` cut to ``limit`` characters: a line of a log or an error stays one readable line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
