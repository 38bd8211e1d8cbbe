"""Streaming image data (issue 12): peak RSS against the dataset's size, loader throughput against
what a vit-tiny worker consumes, and folder/shard writers for the real runs.

  python bench/data_stream.py make /tmp/jpeg2k --count 2000            # 96 px JPEG class folders
  python bench/data_stream.py rss /tmp/jpeg2k [--code OLD_TREE]        # peak RSS of lte-server and lte-worker
  python bench/data_stream.py make /tmp/big --count 300 --size 448 --noise 24
  python bench/data_stream.py throughput /tmp/big --workers 1 2        # loader images/s at 224 px vs vit-tiny
  python bench/data_stream.py throughput /tmp/big --workers 1 --randaugment 2 9   # also with RandAugment N=2, M=9
  python bench/data_stream.py fashion /tmp/fmnist-png [--shards /tmp/fmnist-wds]   # Fashion-MNIST as PNGs

``--code OLD_TREE`` runs another checkout of the package (``git archive REV | tar -x -C OLD_TREE``)
through PYTHONPATH, for the figures of the code before streaming.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PY = sys.executable


def make_jpegs(
    root: Path, count: int, size: int, classes: int, val_fraction: float, seed: int, noise: float = 0.0
) -> None:
    """``count`` JPEGs of ``size`` px (smooth random colour fields, so JPEG sizes are realistic),
    ``classes`` class folders under train/ and test/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    n_val = int(count * val_fraction)
    for i in range(count):
        split = "test" if i < n_val else "train"  # test/: the layout the code before streaming reads too
        d = root / split / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        im = Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BICUBIC)
        if noise:  # texture, so that a JPEG's size and decode time are closer to a photo's
            a = np.asarray(im, dtype=np.float32) + rng.normal(0, noise, (size, size, 3))
            im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
        im.save(d / f"{i:06d}.jpg", quality=90)


def old_code_path(tree: Path) -> Path:
    """A folder that makes ``import lte`` find ``tree``'s packages (its layout maps folders to lte.*)."""
    pkg = Path(tempfile.mkdtemp(prefix="lte-old-")) / "lte"
    pkg.mkdir()
    for f in (tree / "lte_pkg").iterdir():
        (pkg / f.name).symlink_to(f)
    for sub in ("common", "commands", "server", "worker", "proto"):
        (pkg / sub).symlink_to(tree / sub)
    return pkg.parent


def peak_rss_run(data: Path, code: Path | None, args: argparse.Namespace) -> dict[str, float]:
    """One job (server + one worker process) under GNU time; peak RSS in MB of each main process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if code is not None:
        env["PYTHONPATH"] = str(old_code_path(code))
    out = Path(tempfile.mkdtemp(prefix="lte-rss-"))
    server_cmd = [
        "/usr/bin/time", "-v", PY, "-m", "lte.server.cli", "--model", "vit-tiny", "--dataset", "imagefolder",
        "--data-dir", str(data), "--image-size", str(args.image_size), "--heads", "2", "--steps", str(args.steps),
        "--merge-every", "2", "--batch-size", "8", "--port", "0", "--dashboard-port", "-1", "--eval-every", "0",
        "--out", str(out / "run"), "--json", "--log-format", "json", "--threads", "1",
    ]  # fmt: skip
    started = time.perf_counter()
    server = subprocess.Popen(
        server_cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(out / "server.err", "w"),  # noqa: SIM115 (the child holds it)
    )
    address = None
    while address is None and server.poll() is None:  # the bound port is in the "serving" log line
        text = (out / "server.err").read_text()
        m = re.search(r'"address": "([^"]+)"', text)
        address = m.group(1) if m else None
        time.sleep(0.5)
    if address is None:
        raise RuntimeError((out / "server.err").read_text()[-2000:])
    worker_cmd = [
        "/usr/bin/time",
        "-v",
        PY,
        "-m",
        "lte.worker.cli",
        "--server",
        address,
        "--quiet",
        "--threads",
        "1",
    ]
    if code is None:
        worker_cmd += ["--data-dir", str(data), "--loader-workers", str(args.loader_workers)]
    else:  # the old worker's --data-dir path ignores --image-size (issue 12); its --data path does not
        worker_cmd += ["--data", str(data)]
    worker = subprocess.run(worker_cmd, env=env, capture_output=True, text=True, timeout=3600)
    try:  # the server ends once the worker finished its last round
        server.wait(timeout=300)
    except subprocess.TimeoutExpired:
        server.kill()
        raise RuntimeError(f"the job did not finish; worker said: {worker.stderr[-3000:]}") from None
    seconds = time.perf_counter() - started

    def peak(text: str) -> float:
        return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024

    return {
        "server_mb": peak((out / "server.err").read_text()),
        "worker_mb": peak(worker.stderr),
        "seconds": seconds,
        "worker_rc": worker.returncode,
    }


def loader_throughput(
    data: Path, size: int, workers: int, batch: int, steps: int, randaugment: tuple[int, int] = (0, 0)
) -> float:
    """Images/s that ``workers`` DataLoader processes deliver as training batches (crop-flip, then
    RandAugment's (N, M) when N > 0) of ``batch``."""
    from lte.common.data.datasets import HeadBatches, load_dataset
    from lte.common.data.loader import PrefetchedBatches

    ds = load_dataset("imagefolder", str(data), image_size=size, randaugment=randaugment)
    stream = HeadBatches(ds.train_x, ds.train_y, 0, 1, batch, 0)
    batches = PrefetchedBatches([stream], workers, horizon=steps + 10)
    batches.get([0])  # start-up (spawning the loader processes) is not throughput
    start = time.perf_counter()
    for k in range(1, steps + 1):
        batches.get([k])
    seconds = time.perf_counter() - start
    batches.close()
    return steps * batch / seconds


def cpu_rates(
    data: Path, size: int, batch: int, steps: int, settings: list[tuple[int, int]], reps: int = 5
) -> dict[tuple[int, int], float]:
    """Median images per CPU-second of training batches decoded in this process (no loader
    processes), per RandAugment setting (N, M); the settings alternate ``reps`` times, each rep on a
    new seed, so the load of other processes falls on all of them alike. CPU time, not wall time."""
    import statistics

    from lte.common.data.datasets import HeadBatches, load_dataset

    sets = {ra: load_dataset("imagefolder", str(data), image_size=size, randaugment=ra) for ra in settings}
    rates: dict[tuple[int, int], list[float]] = {ra: [] for ra in settings}
    for rep in range(reps):
        for ra, ds in sets.items():
            stream = HeadBatches(ds.train_x, ds.train_y, 0, 1, batch, rep)
            start = time.process_time()
            for k in range(steps):
                stream.batch(k)
            rates[ra].append(steps * batch / (time.process_time() - start))
    return {ra: statistics.median(r) for ra, r in rates.items()}


def vit_tiny_consumption(size: int, batch: int, steps: int) -> float:
    """Images/s one vit-tiny LTE worker trains at ``size`` px on this CPU (batches already in memory)."""
    import torch

    from lte.common.data.datasets import Dataset
    from lte.common.job.config import JobConfig
    from lte.common.job.trainer import LocalTrainer

    x = torch.randn(batch * 2, 3, size, size)
    y = torch.randint(0, 10, (batch * 2,))
    ds = Dataset("random", x, y, x, y, 10, 3, size, "classification")
    job = JobConfig(model="vit-tiny", dataset="random", heads=1, rank=16, alpha=64, batch_size=batch,
                    merge_every=steps, steps=100).with_dataset(ds)  # fmt: skip
    trainer = LocalTrainer(job, [0], ds)
    trainer.train_round(1)  # warm-up
    stats = trainer.train_round(steps)
    return stats.samples / stats.seconds


def write_fashion(folder: Path, shards: Path | None) -> None:
    """Fashion-MNIST (Debian's IDX files) as PNG class folders train/ and val/, and as WebDataset shards."""
    from PIL import Image

    from lte.common.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, _find_idx_file, read_idx

    root = Path(FASHION_MNIST_DIR)
    names = [c.replace("/", "-") for c in FASHION_MNIST_CLASSES]
    for split, prefix in (("train", "train"), ("val", "t10k")):
        images = read_idx(_find_idx_file(root, f"{prefix}-images-idx3-ubyte"), "images").numpy()
        labels = read_idx(_find_idx_file(root, f"{prefix}-labels-idx1-ubyte"), "labels").numpy()
        for c in names:
            (folder / split / c).mkdir(parents=True, exist_ok=True)
        sink, written = None, 0
        for i, (im, label) in enumerate(zip(images, labels, strict=True)):
            buf = io.BytesIO()
            Image.fromarray(im, "L").save(buf, format="PNG")
            (folder / split / names[label] / f"{i:05d}.png").write_bytes(buf.getvalue())
            if shards is not None:
                import webdataset as wds

                if sink is None or written == 10000:
                    if sink is not None:
                        sink.close()
                    (shards / split).mkdir(parents=True, exist_ok=True)
                    sink, written = wds.TarWriter(str(shards / split / f"fmnist-{i // 10000:04d}.tar")), 0
                sink.write({"__key__": f"{i:05d}", "png": buf.getvalue(), "cls": str(int(label)).encode()})
                written += 1
        if sink is not None:
            sink.close()
    if shards is not None:
        (shards / "classes.txt").write_text("\n".join(names) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make")
    p.add_argument("root", type=Path)
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--noise", type=float, default=0.0, help="std of pixel noise added (texture) [0]")
    p = sub.add_parser("rss")
    p.add_argument("root", type=Path)
    p.add_argument("--code", type=Path, help="another checkout's tree (the code before streaming)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--loader-workers", type=int, default=1)
    p = sub.add_parser("throughput")
    p.add_argument("root", type=Path)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--randaugment",
        type=int,
        nargs=2,
        metavar=("N", "M"),
        help="also measure with RandAugment N ops at M",
    )
    p = sub.add_parser("fashion")
    p.add_argument("root", type=Path)
    p.add_argument("--shards", type=Path)
    args = parser.parse_args()
    if args.cmd == "make":
        make_jpegs(
            args.root, args.count, args.size, args.classes, args.val_fraction, seed=0, noise=args.noise
        )
        print(f"wrote {args.count} JPEGs under {args.root}")
    elif args.cmd == "rss":
        r = peak_rss_run(args.root, args.code, args)
        files = sum(1 for _ in args.root.rglob("*.jpg"))
        code = "before (in-memory)" if args.code else "streaming"
        print(
            f"| {code} | {files} | {r['server_mb']:.0f} | {r['worker_mb']:.0f} | {r['seconds']:.0f} | rc {r['worker_rc']} |"
        )
    elif args.cmd == "throughput":
        import torch

        torch.set_num_threads(1)
        consumed = vit_tiny_consumption(args.size, args.batch, 3)
        print(f"vit-tiny LTE worker (1 thread) trains {consumed:.1f} images/s at {args.size} px")
        settings = [(0, 0)] + ([tuple(args.randaugment)] if args.randaugment else [])
        for w in args.workers:
            for n, m in settings:
                rate = loader_throughput(args.root, args.size, w, args.batch, args.steps, (n, m))
                what = f"crop-flip + RandAugment N={n} M={m}" if n else "crop-flip"
                print(f"loader, {w} process(es): {rate:.1f} images/s at {args.size} px ({what})")
        if args.randaugment:
            rates = cpu_rates(args.root, args.size, args.batch, args.steps, settings)
            for (n, m), rate in rates.items():
                what = f"crop-flip + RandAugment N={n} M={m}" if n else "crop-flip"
                print(f"in-process, median of 5: {rate:.0f} images per CPU-second at {args.size} px ({what})")
    else:
        write_fashion(args.root, args.shards)
        print(
            f"wrote Fashion-MNIST PNGs under {args.root}"
            + (f" and shards under {args.shards}" if args.shards else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
