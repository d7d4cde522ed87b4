"""Peak memory of feature extraction against collection size (issue 7: streaming).

Writes N distinct toy images (scikit-learn digits at 32 px, each copy with
its own seeded +-2 grey-level jitter so no two files are equal, captions in
``metadata.jsonl``) and runs ``cdi extract`` on them in a child process for
each N, with the toy SD model. Prints the child's peak resident memory
(``ru_maxrss``) and wall time per N. If extraction streams, the peak stays
flat as N grows: images are decoded batch by batch in worker processes and
only the feature numbers (and each image's path, hash and caption) are kept.

    .venv/bin/python benchmarks/streaming_memory.py                 # N = 2,000 and 20,000
    .venv/bin/python benchmarks/streaming_memory.py --sizes 500,5000 --features cdi

The images are written under ``--work`` (default: a temporary folder,
removed at the end). Expect about 2 minutes for 20,000 images with the
default ``denoising_loss`` family on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_toy_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` distinct jittered toy digits with captions (``metadata.jsonl``) in ``folder``."""
    from cdi.toy.data import load_digit_images, write_image_folder

    images, labels = load_digit_images()
    rows = np.arange(count) % len(images)
    jitter = np.random.default_rng(seed).integers(-2, 3, size=(count, *images.shape[1:]), dtype=np.int16)
    jittered = np.clip(images[rows] + jitter, 0, 255).astype(np.uint8)
    write_image_folder(folder, np.arange(count), jittered, labels[rows])
    return folder


def peak_of_child(command: list[str]) -> tuple[int, float]:
    """Run ``command``; its peak resident memory in bytes (Linux ``ru_maxrss``) and wall seconds."""
    start = time.perf_counter()
    # A fresh process per run, so each peak is its own (RUSAGE_CHILDREN is the max over waited children).
    wrapper = [sys.executable, "-c",
               "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *command]
    out = subprocess.run(wrapper, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2000,20000", help="comma-separated collection sizes")
    parser.add_argument("--features", default="denoising_loss")
    parser.add_argument("--strength", default="light", choices=["light", "overtrained"])
    parser.add_argument("--work", default=None, help="folder for the images (default: temporary)")
    args = parser.parse_args()
    from cdi.toy.world import build_world

    world = build_world("sd", args.strength, progress=False)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="cdi-stream-") as tmp:
        work = Path(args.work or tmp)
        rows = []
        for n in sizes:
            folder = write_toy_images(work / f"images-{n}", n)
            out = work / f"features-{n}.csv"
            command = [sys.executable, "-m", "cdi.cli.main", "extract", "--images", str(folder), "--model",
                       str(world.model_dir), "--out", str(out), "--features", args.features, "--device", "cpu"]
            peak, seconds = peak_of_child(command)
            rows.append({"images": n, "peak_rss_bytes": peak, "seconds": round(seconds, 1),
                         "rows_written": sum(1 for _ in out.open()) - 1})
            print(f"{n:>7} images: peak RSS {peak / 2**20:7.1f} MiB, {seconds:6.1f} s "
                  f"({rows[-1]['rows_written']} rows)", flush=True)
    print(json.dumps({"features": args.features, "model": f"toy sd {args.strength}", "cpus": os.cpu_count(),
                      "load_average": os.getloadavg(), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
