"""Training steps per second with and without the frozen-tower cache, for TriKD and for contrastive learning
(AltCLIP stage 2), at realistic tower sizes: CLIP ViT-B/32's architecture with random weights and the real
`xlmr-me5-small` (118M) as the multilingual text encoder / AltCLIP text tower.

    python /work/shared/tools/offline_models.py ~/.cache/xclip/offline_models --only xlmr-me5-small
    python training_scripts/benchmark_train.py --mte ~/.cache/xclip/offline_models/xlmr-me5-small

"Without the cache" every step runs the frozen towers (image preprocessing, CLIP's image tower, CLIP's text tower
for TTC, the MTE); "with the cache" they ran once before training (that one-time cost is printed too) and a step
runs only what trains. A step is forward, backward and the optimizer's step, through the trainers' own
`compute_loss` and collators, on the synthetic dataset (en + de).
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
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, TrainingArguments

from modeling_xclip import XAltCLIPModel, XMCLIPModel
from modeling_xclip.tiny import tiny_image_processor, word_level_tokenizer
from processing import XCLIPProcessor
from training_scripts.contrastive import (ContrastiveCollator, ContrastiveTrainer, EmbeddingTable, PixelTable,
                                          TriKDTrainer, caption_rows, frozen_image_embeddings, images_of,
                                          trikd_collator)
from training_scripts.data import DatasetImages
from training_scripts.embeddings import Encoder
from training_scripts.training import DataArguments, load_languages


def clip_b32(directory, english_captions):
    """CLIP ViT-B/32's architecture (transformers' CLIPConfig defaults: 224 px, patch 32, widths 768/512), random
    weights, saved with a processor (224 px; a word-level tokenizer: the text tower's cost does not depend on it)."""
    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(directory)
    image_processor = tiny_image_processor()
    image_processor.size, image_processor.crop_size = {"shortest_edge": 224}, {"height": 224, "width": 224}
    XCLIPProcessor(image_processor, word_level_tokenizer(english_captions), max_length=77).save_pretrained(directory)
    return str(directory)


def steps_per_second(trainer, model, collator, rows, batch_size, steps):
    optimizer = trainer.create_optimizer()
    batches = [collator(rows[i * batch_size:(i + 1) * batch_size]) for i in range(steps + 1)]
    model.train()
    for index, batch in enumerate(batches):
        if index == 1:
            start = time.perf_counter()   # the first step warms up
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return steps / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mte", default=str(Path.home() / ".cache/xclip/offline_models/xlmr-me5-small"),
                        help="the multilingual text encoder directory (xlmr-me5-small)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps without the cache (with it: 10x as many)")
    parser.add_argument("--num_images", type=int, default=200)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    data_args = DataArguments(dataset_options=[f"num_images={args.num_images}"], languages=["en", "de"])
    train = load_languages(data_args, "train")
    _, index, sources = images_of(train)
    needed = args.batch_size * (10 * args.steps + 1)
    with tempfile.TemporaryDirectory() as tmp:
        clip = clip_b32(Path(tmp) / "clip", train["en"]["caption"])
        clip_encoder = Encoder(clip, batch_size=64)
        mte_tokenizer = AutoTokenizer.from_pretrained(args.mte)
        training_args = TrainingArguments(output_dir=str(Path(tmp) / "run"), report_to="none", learning_rate=1e-4)
        print(f"{'method':<34}{'cache':<8}{'steps/s':>10}{'one-time encoding (s)':>24}")
        figures = {}

        # TriKD: frozen CLIP towers + frozen MTE; the projectors train
        model = XMCLIPModel.from_pretrained_towers(text=args.mte, clip=clip)
        model.freeze("trikd")
        trainer = TriKDTrainer(model=model, args=training_args)
        for cached in (False, True):
            rows = caption_rows(train, mte_tokenizer, index, max_length=64,
                                clip_tokenizer=None if cached else clip_encoder.tokenizer)
            start = time.perf_counter()
            collator = trikd_collator(model, train, rows, clip_encoder, data_args, mte_tokenizer,
                                      frozen_features=cached, cache_mte_states=cached, max_length=64)
            encoding = time.perf_counter() - start
            rows = (rows * (needed // len(rows) + 1))[:needed]     # the cached run times more steps
            figures["trikd", cached] = steps_per_second(trainer, model, collator, rows, args.batch_size,
                                                        10 * args.steps if cached else args.steps)
            print(f"{'TriKD (mCLIP)':<34}{'yes' if cached else 'no':<8}{figures['trikd', cached]:>10.2f}"
                  f"{encoding if cached else 0:>24.1f}", flush=True)
        del model, trainer

        # AltCLIP stage 2: the text tower (xlmr-me5-small) trains, CLIP's image tower is frozen
        model = XAltCLIPModel.from_pretrained_towers(text=args.mte, vision=clip)
        model.freeze("contrastive")
        alt_dir = Path(tmp) / "altclip"
        model.save_pretrained(alt_dir)
        XCLIPProcessor(clip_encoder.image_processor, mte_tokenizer, max_length=64).save_pretrained(alt_dir)
        trainer = ContrastiveTrainer(model=model, args=training_args)
        rows = caption_rows(train, mte_tokenizer, index, max_length=64)
        for cached in (False, True):
            start = time.perf_counter()
            table = (EmbeddingTable("image_embeds", frozen_image_embeddings(Encoder(str(alt_dir), batch_size=64),
                                                                            data_args, "train", train))
                     if cached else PixelTable(DatasetImages(sources), clip_encoder.image_processor))
            encoding = time.perf_counter() - start
            figures["contrastive", cached] = steps_per_second(trainer, model, ContrastiveCollator(mte_tokenizer, table),
                                                              rows, args.batch_size, args.steps)
            print(f"{'contrastive (AltCLIP stage 2)':<34}{'yes' if cached else 'no':<8}"
                  f"{figures['contrastive', cached]:>10.2f}{encoding if cached else 0:>24.1f}", flush=True)
    for method in ("trikd", "contrastive"):
        print(f"{method}: {figures[method, True] / figures[method, False]:.1f}x faster with the cache")
    return figures


if __name__ == "__main__":
    main()
