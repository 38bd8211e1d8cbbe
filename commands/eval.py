"""``lte-eval``: evaluate an exported model the way lte-server did, from the file alone.

The model's metadata (common/job/run_metadata.py) holds the job and the preprocessing, so the same
zoo model is rebuilt, the dataset is loaded with the job's seed (the same test split), and its
images are standardised with the *training* mean and std stored in the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lte.common.job.checks import ConfigError, OneLineArgumentParser, check_range, one_line_errors, read_toml

# lte.common.data.datasets, text, run_metadata, trainer and hf import torch: imported where used, so that
# `lte-eval --help` and its argument errors start without it (python -X importtime, 2026-12-07,
# the loaded 2-core machine: this module 0.1-0.3 s, torch alone 6.5-7.8 s)
if TYPE_CHECKING:
    from lte.common.data.datasets import Dataset
    from lte.common.data.text import TokenDataset


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="lte-eval",
        description="Evaluate a model exported by lte-server (model.safetensors, or the run folder\n"
        "holding it) on a dataset's test split, with the preprocessing stored in the\nfile.",
        epilog="examples:\n"
        "  lte-eval runs/20260101-120000                 # the run's own dataset\n"
        "  lte-eval model.safetensors --dataset fashion-mnist --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="RUN_OR_MODEL", help="a run folder or a .safetensors file")
    parser.add_argument("--dataset", help="dataset to evaluate on [the job's]")
    parser.add_argument("--data-dir", help="dataset folder [the run's data_dir, if any]")
    parser.add_argument("--device", default="cpu", help="torch device [cpu]")
    parser.add_argument("--batch-size", type=int, default=1000, help="samples per forward pass [1000]")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    return parser


# the datasets read from a folder, and what that folder is
FOLDER_DATASETS = {
    "text": "the folder lte-prepare-text wrote",
    "imagefolder": "class folders of images",
    "webdataset": "a folder of .tar shards",
}


def _model_file(path: Path) -> Path:
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise ConfigError(f"RUN_OR_MODEL {path}: no such file (give a run folder or a .safetensors file)")
    return path


def _run_data_dir(model_file: Path) -> str | None:
    """The data_dir the run used, from the config.toml beside the model (None when absent).

    A relative data_dir is relative to the folder lte-server ran in: used as it is when it exists
    from here, else found from the run folder (its ``out`` setting names it from that folder)."""
    config_file = model_file.parent / "config.toml"
    if not config_file.is_file() and (model_file.parent / "config.json").is_file():
        model_file = model_file.parent  # a run's hf/ folder: the run's config.toml is one up
        config_file = model_file.parent / "config.toml"
    if not config_file.is_file():
        return None
    config = read_toml(config_file)
    data_dir, out = config.get("data_dir"), config.get("out")
    if not isinstance(data_dir, str) or not data_dir:
        return None
    if Path(data_dir).is_absolute() or Path(data_dir).exists() or not isinstance(out, str):
        return data_dir
    run_dir, out_parts = model_file.parent.absolute(), Path(out).parts
    if Path(out).is_absolute() or not out_parts or run_dir.parts[-len(out_parts) :] != out_parts:
        return data_dir
    server_cwd = run_dir.parents[len(out_parts) - 1]
    found = server_cwd / data_dir
    return str(found) if found.exists() else data_dir


def restandardise(dataset, prep: dict) -> None:
    """Standardise the test images with the training run's mean/std instead of this dataset's own.

    Streamed image files (``ImageFiles``) take the run's statistics as their normalisation, so
    nothing is decoded here; in-memory images (a tensor, or ``ResizedImages``) are rescaled.
    Raises ConfigError when the channel counts differ.
    """
    import torch

    from lte.common.data.datasets import ResizedImages

    extras = dataset.extras
    if not {"mean", "std"} <= set(prep) or not {"mean", "std"} <= set(extras):
        return
    own_mean, own_std = extras["mean"].flatten(), extras["std"].flatten()
    mean, std = torch.tensor(prep["mean"]), torch.tensor(prep["std"])
    if mean.shape != own_mean.shape:
        raise ConfigError(
            f"--dataset {dataset.name}: {own_mean.numel()} channels, the model was trained on {mean.numel()}"
        )
    test_x = dataset.test_x
    if hasattr(test_x, "with_normalisation"):  # files decoded per batch: normalised as they load
        dataset.test_x = test_x.with_normalisation(mean, std)
        return
    shape = (1, -1, 1, 1)
    images = test_x.images if isinstance(test_x, ResizedImages) else test_x
    images = (images * own_std.view(shape) + own_mean.view(shape) - mean.view(shape)) / std.view(shape)
    dataset.test_x = ResizedImages(images, test_x.size) if isinstance(test_x, ResizedImages) else images


def _test_samples(dataset: Dataset | TokenDataset, context: int) -> int:
    """Images of the test split, or for token data the validation windows ``evaluate`` reads."""
    from lte.common.data.text import TokenDataset, eval_starts

    if isinstance(dataset, TokenDataset):
        return eval_starts(len(dataset.val_tokens), context, dataset.eval_tokens).numel()
    return int(dataset.test_x.shape[0])


@one_line_errors("lte-eval")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_range("batch_size", args.batch_size, low=1)
    model_file = _model_file(Path(args.model))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(model_file), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"RUN_OR_MODEL {model_file}: not a readable safetensors file ({exc})") from None
    from lte.common.job.run_metadata import job_from_metadata

    job = job_from_metadata(metadata, source=str(model_file))
    prep = json.loads(metadata.get("lte_preprocessing") or "{}")
    dataset_name = args.dataset or job.dataset
    from lte.common.data.datasets import DATASET_NAMES, load_job_dataset

    if dataset_name not in DATASET_NAMES:
        raise ConfigError(f"--dataset {dataset_name!r}: must be one of {', '.join(DATASET_NAMES)}")
    data_dir = args.data_dir
    if data_dir is None and dataset_name == job.dataset:  # the run's folder holds the run's dataset only
        data_dir = _run_data_dir(model_file)
    if data_dir is None and dataset_name in FOLDER_DATASETS:  # lte-sim's export: no config.toml beside it
        raise ConfigError(
            f"--data-dir: {dataset_name} data needs its folder and {model_file} has no run's "
            f"config.toml beside it that names one; give --data-dir ({FOLDER_DATASETS[dataset_name]})"
        )
    # loaded as the server loaded it: the job's image size, channels and class names (the test
    # view is never augmented, so the training augmentations are left out)
    eval_job = dataclasses.replace(job, dataset=dataset_name, augment="", randaugment_ops=0)
    try:
        dataset = load_job_dataset(eval_job, data_dir)
    except (ValueError, OSError) as exc:  # a missing or unfit dataset folder (FileNotFoundError too)
        raise ConfigError(f"--dataset {dataset_name}: {exc}") from None
    if dataset.output_dim != job.num_classes:
        raise ConfigError(
            f"--dataset {dataset_name}: {dataset.output_dim} outputs, the model has {job.num_classes}"
        )
    restandardise(dataset, prep)
    from safetensors.torch import load_file

    from lte.common.job.trainer import build_job_model, evaluate

    hf_folder = (model_file.parent / "config.json").is_file()
    if hf_folder:  # lte's hf/ export: transformers loads it (its own names, ties saved once)
        from lte.common.core.hf import HFError, load_hf_folder

        try:
            model = load_hf_folder(model_file.parent, job.context).to(args.device)
        except (HFError, OSError, ValueError) as exc:
            raise ConfigError(
                f"RUN_OR_MODEL {model_file.parent}: {' '.join(str(exc).split())[:300]}"
            ) from None
    else:
        model = build_job_model(job).to(args.device)
    try:
        if not hf_folder:
            model.load_state_dict(load_file(str(model_file), device=args.device))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"RUN_OR_MODEL {model_file}: does not fit the {job.model} it names ({first})"
        ) from None
    result = evaluate(model, dataset, batch_size=args.batch_size, device=args.device)
    summary = {
        "model": str(model_file),
        "dataset": dataset_name,
        "test_samples": _test_samples(dataset, job.context),
        "version": int(metadata.get("version", -1)),
        **result,
    }
    if args.json:
        print(json.dumps(summary))
    elif result.get("perplexity") is not None:  # a language model: validation windows of val.bin
        bpb = result.get("bits_per_byte")
        print(
            f"lte-eval: {job.model} v{summary['version']} on {dataset_name} "
            f"({summary['test_samples']} validation windows): val loss {result['test_loss']:.4f}, "
            f"perplexity {result['perplexity']:.2f}" + (f", {bpb:.3f} bits/byte" if bpb else "")
        )
    else:
        acc = f"test accuracy {result['test_accuracy']:.4f}, " if "test_accuracy" in result else ""
        print(
            f"lte-eval: {job.model} v{summary['version']} on {dataset_name} "
            f"({summary['test_samples']} test samples): {acc}test loss {result['test_loss']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
