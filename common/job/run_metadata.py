"""What an exported model carries so that it can be used without this run: the resolved job,
the input preprocessing and the package version (safetensors metadata, all strings).

Keys of the metadata (each value a string; the dicts are JSON):

- ``lte_job``: the JobConfig with every placeholder resolved (``warmup_steps`` in steps, the ViT
  ``patch_size`` picked for the image size; ``patch_size`` dropped where the model has none), so
  ``JobConfig(**json.loads(...))`` rebuilds the same model.
- ``lte_preprocessing``: ``pixel_scale`` (raw pixels are divided by it into [0, 1]), ``mean`` and
  ``std`` per channel (applied as ``(x - mean) / std`` after scaling), ``image_size``,
  ``in_channels``, ``resize`` and ``class_names`` (index order of the outputs), when known.
- ``lte_version``: the package version; ``version``: the merges the weights hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lte.common.job.checks import ConfigError
from lte.common.job.config import JobConfig, job_from_dict
from lte.common.job.models import VIT_PRESETS, default_patch_size
from lte.common.job.version import __version__

# raw pixel range per dataset: the loaders divide by it before standardising
PIXEL_SCALE = {"digits": 16.0, "fashion-mnist": 255.0, "imagefolder": 255.0}


def resolved_job(job: JobConfig) -> dict[str, Any]:
    """The job as a dict with no placeholder left (``-1`` / ``0`` meaning "pick for me")."""
    values = job.to_dict()
    values["warmup_steps"] = job.warmup
    is_vit = job.model.lower().replace("_", "-") in VIT_PRESETS
    if is_vit and not job.patch_size and job.image_size:
        values["patch_size"] = default_patch_size(job.image_size)
    elif not job.patch_size:
        values.pop("patch_size")  # the model has no patches (or a factory that picks its own)
    return values


def preprocessing(dataset: Any) -> dict[str, Any]:
    """How raw inputs become the tensors the model was trained on; ``{}`` for non-image data."""
    if dataset is None or dataset.task != "classification" or not dataset.image_size:
        return {}
    extras = dataset.extras
    out: dict[str, Any] = {
        "pixel_scale": PIXEL_SCALE.get(dataset.name, 255.0),
        "image_size": dataset.image_size,
        "in_channels": dataset.in_channels,
        "resize": "bilinear to image_size x image_size",
        "normalise": "x / pixel_scale, then (x - mean) / std per channel",
    }
    for key in ("mean", "std"):
        if key in extras:
            out[key] = [float(v) for v in extras[key].flatten()]
    if "classes" in extras:
        out["class_names"] = list(extras["classes"])
    return out


def export_metadata(job: JobConfig, dataset: Any, version: int) -> dict[str, str]:
    """The safetensors metadata of an exported model (see the module docstring)."""
    return {
        "lte_job": json.dumps(resolved_job(job)),
        "lte_preprocessing": json.dumps(preprocessing(dataset)),
        "lte_version": __version__,
        "version": str(version),
    }


def job_from_metadata(metadata: dict[str, str], *, source: str) -> JobConfig:
    """Rebuild the JobConfig of an export. Raises ConfigError naming ``source`` when it holds none."""
    if not metadata or "lte_job" not in metadata:
        raise ConfigError(f"{source}: no lte_job metadata; is it a model exported by lte-server?")
    try:
        values = json.loads(metadata["lte_job"])
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: its lte_job metadata is not JSON ({exc})") from None
    return job_from_dict(values, source=f"{source} lte_job")


def process_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (a brief window for other threads' files)
    os.umask(mask)
    return mask


def share_as_umask(path: str | Path) -> None:
    """Give an exported file the mode ``open()`` gives a new file (0666 less the umask: 0644 under the
    usual 022). safetensors' writer creates files 0600, which others on a shared box cannot read."""
    os.chmod(path, 0o666 & ~process_umask())
