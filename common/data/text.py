"""Token data for causal language modelling: tokenizers, token files, windows, evaluation.

On disk (nanoGPT's layout): ``train.bin`` and ``val.bin`` are flat token ids, ``uint16`` (or
``uint32`` for vocabularies over 65,535), read through ``numpy.memmap`` and never loaded whole;
``meta.json`` names the tokenizer, the vocabulary and the token dtype; BPE data also keeps its
``tokenizer.json`` (Hugging Face ``tokenizers``) beside them.

A head's batch ``k`` is ``batch_size`` windows of ``context + 1`` tokens whose start positions are
drawn from a generator seeded by (seed, head, k): a pure function, as for images, so sync runs
equal the emulator, resumes are exact and a moved head reads what it would have read.

``lte-prepare-text`` turns text files into token files (byte-level by default: vocabulary 256,
no dependency; ``--tokenizer bpe`` trains a byte-level BPE on the user's text; a path to a
``tokenizer.json`` uses the user's own).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lte.common.core.hf import is_transformers_model, sample_tokens
from lte.common.core.outputs import forward_logits, generate_tokens, model_context
from lte.common.data.seeds import generator, mixed_seed

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
BYTES_ID = "bytes"  # the byte-level tokenizer: token t is byte t
DEFAULT_BPE_VOCAB = 4096
DEFAULT_EVAL_TOKENS = 1 << 16  # validation tokens per evaluation (windows spread evenly over val.bin)


# ---------------------------------------------------------------------------------------
# Tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocabulary 256). Decoding replaces invalid sequences with U+FFFD."""

    vocab_size = 256
    id = BYTES_ID

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> str | None:
        return None


class BPETokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (its ``tokenizer.json``), identified by its sha256."""

    def __init__(self, json_text: str) -> None:
        from tokenizers import Tokenizer

        self._json = json_text
        self._tok = Tokenizer.from_str(json_text)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.id = "bpe:" + hashlib.sha256(json_text.encode()).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        return cls(Path(path).read_text(encoding="utf-8"))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> BPETokenizer:
        """A byte-level BPE (GPT-2's scheme: every byte is in the alphabet, so any text encodes)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok.to_str())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_json(self) -> str | None:
        return self._json


Tokenizer = ByteTokenizer | BPETokenizer


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a token-data folder, or of an exported model (``meta.json`` beside it).

    Raises ``FileNotFoundError`` naming the missing file.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if meta["tokenizer"] == BYTES_ID:
        return ByteTokenizer()
    path = folder / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {folder / META_FILE} names a BPE tokenizer")
    tok = BPETokenizer.from_file(path)
    if tok.id != meta["tokenizer"]:
        raise ValueError(f"{path} is tokenizer {tok.id}, but {folder / META_FILE} says {meta['tokenizer']}")
    return tok


# ---------------------------------------------------------------------------------------
# Token files


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; make token files with lte-prepare-text (see README, 'Language models')"
        )
    meta = json.loads(path.read_text())
    for key in ("tokenizer", "vocab_size", "dtype"):
        if key not in meta:
            raise ValueError(f"{path}: no {key!r}; remake the token files with lte-prepare-text")
    return meta


def _token_folder(out_dir: str | Path, tokenizer: Any) -> tuple[Path, np.dtype, dict[str, Any]]:
    """The output folder (created), the token files' dtype and their meta.json's first fields."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    meta: dict[str, Any] = {
        "tokenizer": tokenizer.id,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
    }
    return out, dtype, meta


def write_token_files(
    out_dir: str | Path, texts: Sequence[str], tokenizer: Tokenizer, *, val_fraction: float = 0.1
) -> dict[str, Any]:
    """Tokenize ``texts`` (joined) into ``train.bin`` / ``val.bin`` (the last ``val_fraction`` of the
    characters) plus ``meta.json`` and, for BPE, ``tokenizer.json``. Returns the meta."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    text = "".join(texts)
    if not text:
        raise ValueError("no text to tokenize")
    cut = int(len(text) * (1.0 - val_fraction))
    out, dtype, meta = _token_folder(out_dir, tokenizer)
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        ids = np.asarray(tokenizer.encode(part), dtype=dtype)
        ids.tofile(out / f"{split}.bin")
        meta[f"{split}_tokens"] = int(ids.size)
        meta[f"{split}_bytes"] = len(part.encode("utf-8"))
    tokenizer_json = tokenizer.to_json()
    if tokenizer_json is not None:
        (out / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def copy_tokenizer(dataset: Any, dest_dir: str | Path) -> None:
    """Put token data's ``meta.json`` (and ``tokenizer.json``) beside an exported model, so
    ``lte-generate`` decodes with the tokenizer the model was trained on. No-op for other data."""
    if getattr(dataset, "task", "") != "lm":
        return
    src, dst = Path(dataset.folder), Path(dest_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (META_FILE, TOKENIZER_FILE):
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            shutil.copyfile(src / name, dst / name)


# ---------------------------------------------------------------------------------------
# The dataset and its windows


@dataclass
class TokenDataset:
    """Token files opened as memmaps. Duck-types ``data.Dataset`` where the job needs it."""

    name: str
    folder: Path
    train_tokens: np.ndarray  # memmap, [T_train]
    val_tokens: np.ndarray  # memmap, [T_val]
    vocab_size: int
    tokenizer_id: str
    bytes_per_token: float  # over val.bin: bits per byte = loss / ln 2 / bytes_per_token
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    task: str = "lm"
    in_channels: int = 0
    image_size: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def output_dim(self) -> int:
        return self.vocab_size

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.folder)


def load_text(data_dir: str | None, *, seed: int = 0, eval_tokens: int = DEFAULT_EVAL_TOKENS) -> TokenDataset:
    """Open ``data_dir``'s token files. Raises ``FileNotFoundError``/``ValueError`` naming the file."""
    if not data_dir:
        raise ValueError("--dataset text needs --data-dir: a folder made by lte-prepare-text")
    folder = Path(data_dir)
    meta = read_meta(folder)
    dtype = np.dtype(meta["dtype"])
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"{folder / META_FILE}: dtype {dtype} is neither uint16 nor uint32")
    splits = {}
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; remake the token files with lte-prepare-text")
        if path.stat().st_size % dtype.itemsize:
            raise ValueError(f"{path}: size is not a whole number of {dtype} tokens")
        splits[split] = np.memmap(path, dtype=dtype, mode="r")
    val_bytes, val_count = meta.get("val_bytes"), meta.get("val_tokens")
    bpt = (val_bytes / val_count) if val_bytes and val_count else 1.0
    return TokenDataset(
        name="text",
        folder=folder,
        train_tokens=splits["train"],
        val_tokens=splits["val"],
        vocab_size=int(meta["vocab_size"]),
        tokenizer_id=str(meta["tokenizer"]),
        bytes_per_token=float(bpt),
        eval_tokens=eval_tokens,
    )


def read_windows(tokens: np.ndarray, starts: torch.Tensor, length: int) -> torch.Tensor:
    """``tokens[s : s + length]`` for each start, as int64 ``[len(starts), length]`` (copies only those)."""
    return torch.from_numpy(
        np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts.tolist()])
    )


class TokenBatches:
    """Head ``head_id``'s batch ``k``: ``batch_size`` windows of ``context + 1`` tokens at start
    positions drawn uniformly (with replacement, as nanoGPT does) by a generator seeded with
    (seed, head_id, k). ``batch(k)`` returns inputs and next-token targets, int64 ``[bs, context]``.
    """

    def __init__(
        self, tokens: np.ndarray, head_id: int, num_heads: int, batch_size: int, seed: int, context: int
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        if len(tokens) < context + 2:
            raise ValueError(
                f"the token file has {len(tokens)} tokens, fewer than context + 2 = {context + 2}; "
                "use more text or a shorter --context"
            )
        self.tokens, self.head_id, self.num_heads = tokens, head_id, num_heads
        self.batch_size, self.seed, self.context = batch_size, seed, context

    def starts(self, step: int) -> torch.Tensor:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        g = generator(mixed_seed(self.seed, self.head_id, step, 0x7E47))
        return torch.randint(0, len(self.tokens) - self.context, (self.batch_size,), generator=g)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = read_windows(self.tokens, self.starts(step), self.context + 1)
        return w[:, :-1], w[:, 1:]

    def __repr__(self) -> str:
        return (
            f"TokenBatches(head_id={self.head_id}, batch_size={self.batch_size}, "
            f"context={self.context}, tokens={len(self.tokens)}, seed={self.seed})"
        )


def eval_starts(num_tokens: int, context: int, eval_tokens: int) -> torch.Tensor:
    """Start positions of the validation windows: ``eval_tokens // context`` of them (at least one,
    at most what fits without overlap), spread evenly over the file, the same for every run."""
    fit = (num_tokens - 1) // context
    if fit < 1:
        raise ValueError(f"val.bin has {num_tokens} tokens, fewer than context + 1 = {context + 1}")
    count = max(1, min(fit, eval_tokens // context))
    return torch.linspace(0, num_tokens - context - 1, count).round().long()


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    dataset: TokenDataset,
    context: int,
    *,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Validation loss (nats per token, mean over the tokens of the eval windows), perplexity
    ``exp(loss)`` and bits per byte ``loss / ln 2 / bytes_per_token`` (byte-level: bytes_per_token 1)."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    starts = eval_starts(len(dataset.val_tokens), context, dataset.eval_tokens)
    loss_sum, count = 0.0, 0
    for i in range(0, starts.numel(), batch_size):
        w = read_windows(dataset.val_tokens, starts[i : i + batch_size], context + 1).to(device)
        logits = forward_logits(model, w[:, :-1])
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        count += w[:, 1:].numel()
    model.train(was_training)
    loss = loss_sum / count
    return {
        "test_loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": loss / math.log(2) / dataset.bytes_per_token,
    }


SAMPLE_PROMPT_TOKENS = 32
SAMPLE_NEW_TOKENS = 160
SAMPLE_LINE_SEARCH = 512  # tokens of val.bin searched for the first line start


def sample_prompt_start(tokens: np.ndarray, tokenizer: Any) -> int:
    """Where the evaluation sample's prompt starts in ``tokens`` (val.bin): just after the first
    token that ends a line within the first ``SAMPLE_LINE_SEARCH`` tokens, so the prompt opens a
    line instead of cutting a word where the split fell; 0 when no line ends there."""
    last = len(tokens) - SAMPLE_PROMPT_TOKENS
    head = np.asarray(tokens[: min(SAMPLE_LINE_SEARCH, max(last, 0))], dtype=np.int64).tolist()
    for i, token in enumerate(head):
        if tokenizer.decode([token]).endswith("\n"):
            return i + 1
    return 0


@torch.no_grad()
def evaluation_sample(
    model: torch.nn.Module, dataset: Any, *, seed: int, device: str | torch.device = "cpu"
) -> dict[str, str]:
    """For token data, ``{"sample": text, "sample_prompt": prompt}``: ``SAMPLE_PROMPT_TOKENS``
    tokens of val.bin from its first line start (``sample_prompt_start``), continued by
    ``SAMPLE_NEW_TOKENS`` sampled tokens (temperature 0.8, top-k 40, generator seeded with
    ``seed``) from the model's current weights; ``sample`` holds the prompt and the continuation.
    ``{}`` for other data. A transformers model samples with its ``generate`` (``sample_tokens``);
    any other (the zoo GPT, a factory's) with ``generate_tokens`` over its ``model_context``, through
    the trainer's ``forward_logits``. The server calls it after each evaluation, on its evaluator thread."""
    if getattr(dataset, "task", "") != "lm":
        return {}
    was_training = model.training
    model.eval()
    tokenizer = dataset.tokenizer()
    start = sample_prompt_start(dataset.val_tokens, tokenizer)
    prompt = read_windows(dataset.val_tokens, torch.tensor([start]), SAMPLE_PROMPT_TOKENS).to(device)
    if is_transformers_model(model):
        out = sample_tokens(model, prompt, SAMPLE_NEW_TOKENS, temperature=0.8, top_k=40, seed=seed)
    else:
        gen = torch.Generator(device=device).manual_seed(int(seed))
        out = generate_tokens(
            model,
            prompt,
            SAMPLE_NEW_TOKENS,
            context=model_context(model),
            temperature=0.8,
            top_k=40,
            generator=gen,
        )
    model.train(was_training)
    return {
        "sample": tokenizer.decode(out[0].tolist()),
        "sample_prompt": tokenizer.decode(prompt[0].tolist()),
    }


def check_token_data(job: Any, dataset: TokenDataset) -> None:
    """Refuse (``ValueError``) token data made with another tokenizer than the job's, or ids the
    model cannot embed: every worker must read the same vocabulary the server evaluates."""
    if job.tokenizer and job.tokenizer != dataset.tokenizer_id:
        raise ValueError(
            f"{dataset.folder}: token data of tokenizer {dataset.tokenizer_id}, but the job uses "
            f"{job.tokenizer}; prepare this folder with the job's tokenizer (lte-prepare-text --tokenizer)"
        )
    if job.num_classes and job.num_classes < dataset.vocab_size:
        raise ValueError(
            f"{dataset.folder}: vocabulary {dataset.vocab_size} is larger than the model's {job.num_classes}"
        )


# -- records: .jsonl, .parquet, datasets.save_to_disk folders, streamed ---------------------------
RECORD_SUFFIXES = (".jsonl", ".parquet")


def is_record_source(path: str) -> bool:
    """A .jsonl / .parquet file or a ``datasets.save_to_disk`` folder (read as records, streamed)."""
    p = Path(path)
    return p.suffix in RECORD_SUFFIXES or (p.is_dir() and any((p / f).is_file() for f in DATASET_FILES))


DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
BATCH_ROWS = 1024  # rows read from parquet / arrow at a time: memory is bounded by a batch, not the corpus


def _load_from_disk(path: Path, column: str) -> Any:
    """A ``datasets.load_from_disk`` folder's Dataset (memory-mapped; a DatasetDict's train split)."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path}: a datasets folder needs the datasets package: pip install 'lte[hf]'"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (it has {sorted(ds)})")
        ds = ds["train"]
    if column not in ds.column_names:
        raise ValueError(f"{path}: no column {column!r} (it has {ds.column_names}); pass --text-column")
    return ds


def count_records(path: str, column: str) -> int:
    """Records in a source, without reading their text (parquet and datasets: metadata; jsonl: lines)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if p.is_dir():
        return _load_from_disk(p, column).num_rows
    if p.suffix == ".parquet":
        pq = _parquet()
        try:
            meta = pq.ParquetFile(str(p))
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError: name the file
            raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
        if column not in meta.schema_arrow.names:
            raise ValueError(
                f"{path}: no column {column!r} (it has {meta.schema_arrow.names}); pass --text-column"
            )
        return meta.metadata.num_rows
    with p.open("rb") as fh:
        return sum(1 for line in fh if line.strip())


def iter_records(path: str, column: str) -> Iterator[str]:
    """The ``column`` text of each record of a source, one at a time (a batch of rows in memory)."""
    p = Path(path)
    if p.is_dir():
        ds = _load_from_disk(p, column).select_columns([column])
        for batch in ds.iter(batch_size=BATCH_ROWS):
            yield from (_text(t, path, column) for t in batch[column])
    elif p.suffix == ".parquet":
        for batch in _parquet().ParquetFile(str(p)).iter_batches(batch_size=BATCH_ROWS, columns=[column]):
            yield from (_text(t, path, column) for t in batch.column(0).to_pylist())
    else:
        with p.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
                if not isinstance(record, dict) or column not in record:
                    raise ValueError(f"{path}:{number}: no field {column!r}; pass --text-column")
                yield _text(record[column], f"{path}:{number}", column)


def _parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("parquet files need the pyarrow package: pip install 'lte[hf]'") from None
    return pq


def _text(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {column!r} is a {type(value).__name__}, not text; pass --text-column")
    return value


def stream_token_files(
    out_dir: str | Path,
    sources: Sequence[str],
    tokenizer: Tokenizer,
    *,
    column: str = "text",
    val_fraction: float = 0.1,
) -> dict[str, Any]:
    """``write_token_files`` for corpora larger than memory: records are read, tokenized and appended
    to ``train.bin`` / ``val.bin`` one at a time, each followed by a newline (documents stay apart).
    The last ``val_fraction`` of the records (counted first: parquet and datasets metadata, jsonl lines)
    go to ``val.bin``. A plain text file among the sources is one record. Returns the meta.
    Raises ValueError / FileNotFoundError naming the source."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    counts = [count_records(s, column) if is_record_source(s) else 1 for s in sources]
    total = sum(counts)
    cut = int(total * (1.0 - val_fraction))
    if total < 2 or cut < 1 or cut >= total:
        raise ValueError(f"{total} record(s): too few to hold out a validation split of {val_fraction:g}")
    out, dtype, meta = _token_folder(out_dir, tokenizer)
    sizes = {"train": [0, 0], "val": [0, 0]}  # tokens, bytes
    index = 0
    with open(out / "train.bin", "wb") as train, open(out / "val.bin", "wb") as val:
        for source in sources:
            texts = (
                iter_records(source, column) if is_record_source(source) else iter(read_text_inputs([source]))
            )
            for text in texts:
                split, fh = ("train", train) if index < cut else ("val", val)
                text = text if text.endswith("\n") else text + "\n"
                ids = np.asarray(tokenizer.encode(text), dtype=dtype)
                ids.tofile(fh)
                sizes[split][0] += int(ids.size)
                sizes[split][1] += len(text.encode("utf-8"))
                index += 1
    for split, (tokens, nbytes) in sizes.items():
        meta[f"{split}_tokens"], meta[f"{split}_bytes"] = tokens, nbytes
    tokenizer_json = tokenizer.to_json()
    if tokenizer_json is not None:
        (out / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def read_text_inputs(paths: Sequence[str]) -> list[str]:
    """The UTF-8 text of each path (``-``: standard input). Raises FileNotFoundError or ValueError naming it."""
    texts = []
    for p in paths:
        if p == "-":
            texts.append(sys.stdin.read())
            continue
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"{p}: no such text file")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    return texts
