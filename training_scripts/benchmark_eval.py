"""Throughput of evaluation encoding: texts/s, images/s, and the share of time spent outside the model's forward
(tokenizing, padding, image decoding and preprocessing, copies).

    python training_scripts/benchmark_eval.py --model DIR --dataset synthetic --dataset_options num_images=2000

Encodes the captions of one language and the images of its split once each, without the embedding cache.
"""
import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from training_scripts.cli import run_cli
from training_scripts.embeddings import Encoder
from training_scripts.data import DatasetImages, dataset_option, load_language


def timed(model, method, device):
    """Wraps ``model.<method>`` to add the seconds it takes to ``seconds[0]``; returns ``seconds``."""
    inner = getattr(model, method)
    seconds = [0.0]

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        output = inner(*args, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds[0] += time.perf_counter() - start
        return output

    setattr(model, method, wrapper)
    return seconds


def measure(encode, forward_seconds, count, unit):
    start = time.perf_counter()
    encode()
    total = time.perf_counter() - start
    outside = 1 - forward_seconds[0] / total
    print(f"{count} {unit}: {total:.2f} s, {count / total:.1f} {unit}/s, {100 * outside:.1f}% outside the forward")


def main(argv=None):
    """The command line; a user error ends in one line, `error: ...`, exit status 2 (`--debug`: the traceback)."""
    return run_cli(_main, argv)


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--data_dir")
    parser.add_argument("--dataset_options", nargs="+", default=[], metavar="KEY=VALUE", type=dataset_option)
    parser.add_argument("--language", default="en")
    parser.add_argument("--split")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip_images", action="store_true", help="texts only (a text-only checkpoint)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    split, ds = load_language(args.dataset, args.language, args.split, args.data_dir, dict(args.dataset_options))
    encoder = Encoder(args.model, device=args.device, batch_size=args.batch_size)
    print(f"{args.model} on {args.dataset}/{args.language}/{split}, batch {args.batch_size}, {encoder.device}, "
          f"{torch.get_num_threads()} threads")
    captions = list(ds["caption"])
    measure(lambda: encoder.texts(captions), timed(encoder.model, "get_text_features", encoder.device),
            len(captions), "texts")
    if not args.skip_images:
        first_rows = {str(image_id): (ds, row) for row, image_id in reversed(list(enumerate(ds["image_id"])))}
        images = DatasetImages(list(first_rows.values()), dict(args.dataset_options).get("images_dir") or args.data_dir)
        measure(lambda: encoder.images(images, identity=None), timed(encoder.model, "get_image_features", encoder.device),
                len(images), "images")


if __name__ == "__main__":
    main()
