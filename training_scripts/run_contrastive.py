"""Image-text contrastive learning: AltCLIP's stage 2 (seed paper 001 §3.2), or a CLIP trained in full.

    accelerate launch training_scripts/run_contrastive.py --model STAGE1_DIR --dataset DIR_OR_HUB_ID \\
        --languages en de fr --output_dir altclip
    accelerate launch training_scripts/run_contrastive.py --model CLIP_DIR --languages en --output_dir clip

With an AltCLIP-style model (e.g. the output of run_teacher_learning.py), the text side trains and the image tower
stays frozen (as in LiT): its image embeddings are encoded once and cached under --feature_cache_dir. With a
transformers CLIP model, both towers train from pixels (how the main job makes its small English CLIP). The loss is
CLIP's symmetric InfoNCE at the learnable temperature, over the batch of all processes.

The defaults are seed paper 001's Table 8 (contrastive stage): AdamW with betas (0.99, 0.999), learning rate 2e-6,
weight decay 0.05, 2,000 warm-up steps, one epoch, batch 1,024, gradient clipping at 5.0.
"""
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoProcessor, TrainingArguments, set_seed

from training_scripts.cli import run_cli
from training_scripts.contrastive import (ContrastiveCollator, ContrastiveTrainer, EmbeddingTable, PixelTable, Rows,
                                          caption_rows, chance_levels, data_summary, frozen_image_embeddings,
                                          images_of, results_table, split_sizes)
from training_scripts.data import DatasetImages
from training_scripts.embeddings import Encoder, load_model
from training_scripts.training import (DataArguments, RetrievalEvaluator, card_hyperparameters, check_images,
                                       check_output_dir, finish, load_languages, parse_args, results_record)

logger = logging.getLogger(__name__)

TRAINING_DEFAULTS = dict(output_dir="contrastive-output", per_device_train_batch_size=1024, learning_rate=2e-6,
                         adam_beta1=0.99, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.05, warmup_steps=2000,
                         num_train_epochs=1, max_grad_norm=5.0, lr_scheduler_type="linear", logging_steps=20,
                         save_strategy="epoch", save_total_limit=1, dataloader_drop_last=True, dataloader_pin_memory=False,
                         report_to="none",
                         seed=42)


@dataclass
class ContrastiveArguments:
    model: str = field(metadata={
        "help": "the model to train (Hub id or dir): an AltCLIP-style model of ours (stage 2: the text side trains, "
                "the image tower is frozen), or a transformers CLIP model (both towers train)"})
    text_template: Optional[str] = field(default=None, metadata={
        "help": "applied to every caption; default: the template saved with the model's processor"})


def _main(argv):
    model_args, data_args, training_args = parse_args(
        (ContrastiveArguments, DataArguments, TrainingArguments), argv, TRAINING_DEFAULTS)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_output_dir(training_args.output_dir, data_args.overwrite_output_dir)
    set_seed(training_args.seed)    # before any weight is initialised: a run is reproducible
    train = load_languages(data_args, data_args.train_split, columns=["caption", "image_id"],
                           purpose="contrastive learning", max_samples=data_args.max_train_samples)
    check_images(train, data_args, purpose="contrastive learning")

    model = load_model(model_args.model).train()
    processor = AutoProcessor.from_pretrained(model_args.model, trust_remote_code=True)
    tokenizer = getattr(processor, "tokenizer", processor)
    template = model_args.text_template or getattr(processor, "text_template", None) or "{}"
    max_length = getattr(processor, "max_length", None) or tokenizer.model_max_length
    if hasattr(model, "TRAINING_STAGES"):
        if "contrastive" not in model.TRAINING_STAGES:
            raise ValueError(f"{model_args.model} is a {type(model).__name__}, which has no contrastive stage: "
                             "give an AltCLIP-style model (e.g. the output of run_teacher_learning.py) or a CLIP model")
        trainable = model.freeze("contrastive")
        frozen_images = True
    elif hasattr(model, "get_image_features") and hasattr(model, "logit_scale"):   # a transformers CLIP
        total = sum(p.numel() for p in model.parameters())
        trainable = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "total": total}
        trainable["percent"] = 100.0 * trainable["trainable"] / total
        frozen_images = False
    else:
        raise ValueError(f"{model_args.model}: not a model with text and image towers")
    if frozen_images and data_args.image_features is None and getattr(model, "vision_model", None) is None:
        raise ValueError(f"{model_args.model} has no image tower: pass --image_features FILE")

    image_ids, image_index, image_sources = images_of(train)
    rows = caption_rows(train, tokenizer, image_index, template, max_length)
    encoder = Encoder(model_args.model, batch_size=256, cache_dir=data_args.cache_dir) if frozen_images else None
    if frozen_images:
        images = EmbeddingTable("image_embeds",
                                frozen_image_embeddings(encoder, data_args, data_args.train_split, train))
    else:
        images = PixelTable(DatasetImages(image_sources, data_args.data_dir), processor.image_processor)

    def evaluator(split):
        sets = load_languages(data_args, split, columns=["caption", "image_id"], purpose="evaluation",
                              max_samples=data_args.max_eval_samples)
        ids, _, sources = images_of(sets)
        if frozen_images:
            embeds = frozen_image_embeddings(encoder, data_args, split, sets)
            vectors = lambda m: dict(zip(ids, embeds))  # noqa: E731
        else:
            vectors = lambda m: dict(zip(ids, Encoder.from_model(m, processor).images(  # noqa: E731
                DatasetImages(sources, data_args.data_dir), None, desc=f"{split} images")))
        return RetrievalEvaluator(sets, processor, vectors, text_template=template), sets

    run_info = {"stage": "contrastive", "model": model_args.model, "dataset": data_args.dataset,
                "languages": list(train)}
    trainer = ContrastiveTrainer(
        model=model, args=training_args, train_dataset=Rows(rows), data_collator=ContrastiveCollator(tokenizer, images),
        run_info=run_info,
        evaluator=evaluator(data_args.eval_split)[0] if data_args.eval_split and training_args.eval_strategy != "no"
        else None)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    results = None
    if data_args.test_split:
        test, sets = evaluator(data_args.test_split)
        chance = chance_levels(sets)
        results = results_record(test(trainer.model), training_args.output_dir, data_args.dataset,
                                 data_args.test_split, {"model": model_args.model, "text_template": template,
                                                         "chance_t2i_R@1": chance},
                                 split_sizes(sets))
        if trainer.is_world_process_zero():
            print(results_table(results))
    card = dict(
        languages=list(train), base_model=model_args.model, datasets=None,
        method="contrastive learning (AltCLIP stage 2, seed paper 001 §3.2): symmetric InfoNCE"
               + (", image tower frozen" if frozen_images else ", both towers trained"),
        method_summary="Image-text contrastive learning with a learnable temperature over the global batch"
                       + (": the text side trains and the image tower stays frozen (LiT)." if frozen_images else "."),
        script="training_scripts/run_contrastive.py", family=model.config.model_type,
        base_models={"model": model_args.model}, trainable=trainable,
        hyperparameters=card_hyperparameters(training_args),
        data_summary=data_summary(data_args, train, len(rows), len(image_ids)))
    finish(trainer, processor, training_args.output_dir, card, results=results, push_to_hub=training_args.push_to_hub)
    return results


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
