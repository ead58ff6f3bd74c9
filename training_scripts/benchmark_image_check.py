"""Cost of checking images when a dataset is built: `PIL.Image.verify` (headers only: passes a truncated JPEG) against
the full decode the builders do (`datasets_builders.common.image_problem`), and the scan of `images_dir` that the
cache key covers (names, sizes and modification times of its files).

    python training_scripts/benchmark_image_check.py [--num_images 1000] [--width 640 --height 480]

Writes COCO-sized JPEGs (640x480, quality 90, noisy so that they compress like photos) into a temporary folder and
prints milliseconds per image for each check.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from datasets_builders.common import file_stats, image_problem
from training_scripts.cli import run_cli


def verify_only(path):
    with Image.open(path) as image:
        image.verify()


def timed(label, check, paths):
    start = time.perf_counter()
    for path in paths:
        check(path)
    seconds = time.perf_counter() - start
    print(f"{label}: {seconds:.2f} s for {len(paths)} images, {1000 * seconds / len(paths):.2f} ms per image")
    return seconds


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index in range(args.num_images):
            base = rng.integers(0, 256, size=3)
            pixels = np.clip(base + rng.normal(0, 40, size=(args.height, args.width, 3)), 0, 255).astype(np.uint8)
            paths.append(os.path.join(folder, f"{index:06d}.jpg"))
            Image.fromarray(pixels).save(paths[-1], quality=90)
        size = sum(os.path.getsize(p) for p in paths) / len(paths)
        print(f"{args.num_images} JPEGs of {args.width}x{args.height}, {size / 1024:.0f} KiB each on average")
        verify = timed("PIL verify (headers only)", verify_only, paths)
        decode = timed("full decode (image_problem)", image_problem, paths)
        print(f"full decode costs {decode / verify:.0f}x verify, {(decode - verify) / len(paths) * 1000:.2f} ms "
              "more per image")
        start = time.perf_counter()
        file_stats(folder)
        print(f"scan of images_dir for the cache key: {1000 * (time.perf_counter() - start):.1f} ms")


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
