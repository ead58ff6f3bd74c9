"""The embedded default of the main job: CLIP and a multilingual text encoder (MTE) made from the synthetic world
alone, with no download, each built once and cached (under ``DEFAULT_CACHE/embedded``).

- **English CLIP**: a small transformers `CLIPModel` trained from scratch by `ContrastiveTrainer` on the English
  captions and images of the synthetic train split (both towers train). Its tokenizer is word-level, built from those
  English captions.
- **MTE**: a random XLM-R-architecture encoder, frozen, reading a word-level tokenizer built from the train captions
  of every synthetic language. One token per word makes even random token states tell the words apart; the
  X-projector learns what they mean from image-caption pairs alone.

Honesty: only captions and pixels reach the models. The `concept` column (the scene's attributes) is used for
nothing but scoring retrieval, as in every evaluation of ours.
"""
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import CLIPModel, TrainingArguments, XLMRobertaModel

from modeling_xclip.tiny import (MAX_LENGTH, small_clip_config, tiny_image_processor, tiny_text_config,
                                 word_level_tokenizer)
from processing import XCLIPProcessor
from training_scripts.contrastive import ContrastiveCollator, ContrastiveTrainer, PixelTable, Rows, caption_rows, images_of
from training_scripts.data import DatasetImages
from training_scripts.training import DEFAULT_CACHE, DataArguments, load_languages

logger = logging.getLogger(__name__)

# the synthetic world the embedded default trains on (the test split keeps 10%: 200 images)
SYNTHETIC_OPTIONS = ["num_images=2000"]
# the English CLIP's recipe (small images: 32 px in 8 px patches)
CLIP_RECIPE = {"hidden": 64, "layers": 2, "patch_size": 8, "projection_dim": 64, "epochs": 25, "batch_size": 256,
               "learning_rate": 2e-3, "weight_decay": 0.1, "warmup": 0.1, "seed": 0}
# XLM-R's own initialisation (0.02): the random layers add little to each token's embedding, so token states keep the
# words apart (the tiny test models' wider 0.2 mixes every position into one common state)
MTE_RECIPE = {"hidden": 64, "initializer_range": 0.02, "seed": 0}


def _key(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _build_once(target, build):
    """`build(tmp_dir)` writes a model into a temporary directory that then becomes `target`, unless it exists.
    Every process of a distributed run takes the same decision; only the main process writes."""
    state = PartialState()
    exists = (target / "config.json").is_file()
    state.wait_for_everyone()
    if not exists:
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        build(partial)
        if state.is_main_process:
            if target.exists():
                shutil.rmtree(target)
            partial.replace(target)
        elif partial.exists():
            shutil.rmtree(partial)
        state.wait_for_everyone()
    return target


def synthetic_data_args(languages=None, options=SYNTHETIC_OPTIONS):
    return DataArguments(dataset="synthetic", dataset_options=list(options), languages=languages)


def embedded_mte(cache_root=None, options=SYNTHETIC_OPTIONS):
    """Directory of the embedded MTE (random XLM-R weights and a word-level tokenizer over every language)."""
    loaded = load_languages(synthetic_data_args(options=options), "train", columns=["caption"])
    captions = [caption for ds in loaded.values() for caption in ds["caption"]]
    target = Path(cache_root or DEFAULT_CACHE) / "embedded" / f"mte-{_key(MTE_RECIPE, options)}"

    def build(directory):
        tokenizer = word_level_tokenizer(captions)
        torch.manual_seed(MTE_RECIPE["seed"])
        config = tiny_text_config(len(tokenizer), hidden=MTE_RECIPE["hidden"])
        config.initializer_range = MTE_RECIPE["initializer_range"]
        XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return _build_once(target, build)


def embedded_clip(cache_root=None, options=SYNTHETIC_OPTIONS, recipe=CLIP_RECIPE):
    """Directory of the embedded English CLIP, trained by `ContrastiveTrainer` the first time it is asked for."""
    target = Path(cache_root or DEFAULT_CACHE) / "embedded" / f"english-clip-{_key(recipe, options)}"

    def build(directory):
        logger.info("training the embedded English CLIP on the synthetic world (once; cached in %s)", target)
        train_english_clip(directory, options, recipe)

    return _build_once(target, build)


def small_clip(english_captions, recipe=CLIP_RECIPE):
    """A random small CLIP (`CLIPModel`) and its processor, with a word-level tokenizer of `english_captions`."""
    tokenizer = word_level_tokenizer(english_captions)
    processor = XCLIPProcessor(tiny_image_processor(), tokenizer, max_length=MAX_LENGTH)
    torch.manual_seed(recipe["seed"])
    config = small_clip_config(len(tokenizer), hidden=recipe["hidden"], layers=recipe["layers"],
                               patch_size=recipe["patch_size"], projection_dim=recipe["projection_dim"])
    return CLIPModel(config), processor


def train_english_clip(output_dir, options=SYNTHETIC_OPTIONS, recipe=CLIP_RECIPE):
    """Train a small CLIP from scratch on the synthetic English train split and save it with its processor."""
    english = load_languages(synthetic_data_args(["en"], options), "train", columns=["caption", "image"])["en"]
    model, processor = small_clip(english["caption"], recipe)
    _, image_index, sources = images_of({"en": english})
    rows = caption_rows({"en": english}, processor.tokenizer, image_index, max_length=MAX_LENGTH)
    images = PixelTable(DatasetImages(sources), processor.image_processor, keep=True)
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=recipe["batch_size"],
        num_train_epochs=recipe["epochs"], learning_rate=recipe["learning_rate"],
        weight_decay=recipe["weight_decay"], warmup_steps=recipe["warmup"], lr_scheduler_type="cosine",
        seed=recipe["seed"], save_strategy="no", report_to="none", logging_steps=25, dataloader_drop_last=True,
        dataloader_pin_memory=False)
    trainer = ContrastiveTrainer(model=model, args=args, train_dataset=Rows(rows),
                                 data_collator=ContrastiveCollator(processor.tokenizer, images),
                                 run_info={"stage": "english-clip", "model": "embedded"})
    trainer.train()
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(output_dir))
    return trainer
