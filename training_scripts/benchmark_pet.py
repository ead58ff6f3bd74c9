"""Per-language PET figures: the time to switch the active language on a loaded model (`set_adapter`), the time
per training step with and without the image-embedding cache, and the disk size of one language's adapter per method.

    python training_scripts/benchmark_pet.py --base DIR [--batch_size 10] [--steps 10]

Without --base it builds a tiny M-CLIP (with a random image tower). Without an image tower in the base, the step
time without the cache is not measured.
"""
import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image
from transformers import AutoProcessor

from modeling_xclip.losses import pet_alignment_loss
from training_scripts import pet
from training_scripts.cli import run_cli
from training_scripts.embeddings import load_model

CAPTIONS = ["ein großer roter Kreis oben links", "un petit carré bleu à droite", "a small green star at the bottom",
            "маленькая жёлтая звезда внизу", "一颗大的紫色星星在左边"]


def switch_ms(base_dir, method, tmp, repeats=200):
    """Mean milliseconds of `set_adapter` between two loaded languages."""
    model = pet.add_pet(load_model(base_dir), method, "de")
    model = pet.add_pet(model, method, "fr")
    start = time.perf_counter()
    for i in range(repeats):
        model.set_adapter("de" if i % 2 else "fr")
    return 1000 * (time.perf_counter() - start) / repeats


def step_seconds(model, processor, batch_size, steps, cached):
    """Seconds per optimiser step of the eq. 9 loss (LoRA), image vectors cached or encoded by the frozen tower."""
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch_size)]
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    images = [Image.new("RGB", (224, 224), (30 * i % 255, 90, 160)) for i in range(batch_size)]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    base = model.get_base_model()
    with torch.no_grad():
        cache = base.get_image_features(pixel_values=pixels).pooler_output
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    timings = []
    for step in range(steps + 1):
        start = time.perf_counter()
        if cached:
            image = cache
        else:
            with torch.no_grad():
                image = base.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
        loss = pet_alignment_loss(text, image, pivot=text.detach(), kind="mse", weight=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up
            timings.append(time.perf_counter() - start)
    return sum(timings) / len(timings)


def _main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="an M-CLIP directory (default: a tiny random one)")
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = args.base
        if base_dir is None:
            from modeling_xclip.tiny import build_tiny_model

            base_dir = str(Path(tmp) / "tiny-mclip")
            build_tiny_model("m-clip", save_dir=base_dir)
        print(f"base {args.base or 'tiny M-CLIP'}, {torch.get_num_threads()} threads")
        for method in ("lora", "adapter", "compacter"):
            print(f"set_adapter switch ({method}): {switch_ms(base_dir, method, tmp):.3f} ms")
        processor = AutoProcessor.from_pretrained(base_dir, trust_remote_code=True)
        model = pet.add_pet(load_model(base_dir).train(), "lora", "de")
        print(f"training step, batch {args.batch_size} (LoRA): "
              f"{step_seconds(model, processor, args.batch_size, args.steps, cached=True) * 1000:.1f} ms with the "
              "image-embedding cache", end="")
        if model.get_base_model().vision_model is not None and getattr(processor, "image_processor", None):
            print(f", {step_seconds(model, processor, args.batch_size, args.steps, cached=False) * 1000:.1f} ms "
                  "encoding the images every step")
        else:
            print(" (the base has no image tower)")
        for method in ("lora", "adapter", "compacter", "prompt", "linear", "full", "hard_prompt"):
            model = pet.add_pet(load_model(base_dir), method, "de", prompt_init_text="a photo of",
                                tokenizer_path=base_dir)
            folder = pet.save_language(model, Path(tmp) / method, "de", {"method": method})
            print(f"adapter size on disk ({method}): {pet.adapter_bytes(folder) / 1024:.1f} KiB")


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
