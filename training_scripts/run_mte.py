"""Enhance a multilingual text encoder with NMT and a parallel-sentence contrastive loss (seed paper 002 §3.3), in
two stages, before TriKD:

    accelerate launch training_scripts/run_mte.py --stage 1 --model xlm-roberta-base \\
        --dataset multi30k --data_dir multi30k-dataset --dataset_options variant=parallel --output_dir mte-stage1
    accelerate launch training_scripts/run_mte.py --stage 2 --model mte-stage1 \\
        --dataset multi30k --data_dir multi30k-dataset --dataset_options variant=parallel --output_dir mte
    accelerate launch training_scripts/run_trikd.py --text mte ...

Stage 1 builds the encoder-decoder (the XLM-R encoder --model plus a random decoder, embeddings from XLM-R and fixed)
and trains the decoder alone on NMT; stage 2 reads stage 1's output and trains encoder and decoder on NMT + 2.0 x CTL
(`training_scripts.mte`). Each stage writes OUTPUT_DIR as a plain encoder directory with its tokenizer (what
`run_trikd.py --text` and `AutoModel` load), OUTPUT_DIR/encoder_decoder (the whole model, which the next stage
reads) and a model card. Pairs come from a dataset of ours with a `source` (English) column. Defaults follow seed 002
Table 9 and §A.4: AdamW, peak learning rate 5e-4 with 4000 warmup steps and 1 epoch (stage 1), 1e-4 without warmup
and 0.5 epoch (stage 2), the inverse-square-root schedule, dropout 0.3; the paper's batches of 32,768 tokens become
--per_device_train_batch_size sentences (default 64).
"""
import argparse
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
from transformers import AutoTokenizer, TrainingArguments, set_seed

from training_scripts import mte
from training_scripts.cli import run_cli
from training_scripts.training import (DataArguments, card_hyperparameters, check_output_dir, load_languages,
                                       parse_args, save_model_card)

logger = logging.getLogger(__name__)

ENCODER_DECODER = "encoder_decoder"
# seed 002 Table 9 per stage, applied where the command line does not set them
STAGE_DEFAULTS = {1: {"learning_rate": 5e-4, "warmup_steps": 4000, "num_train_epochs": 1.0},
                  2: {"learning_rate": 1e-4, "warmup_steps": 0, "num_train_epochs": 0.5}}


@dataclass
class MTEArguments:
    stage: int = field(metadata={"help": "1: the decoder learns NMT on the frozen encoder; 2: NMT + 2.0 x CTL, "
                                         "encoder and decoder", "choices": mte.STAGES})
    model: str = field(metadata={"help": "stage 1: the XLM-R encoder (Hub id or dir); stage 2: stage 1's output dir"})
    decoder_layers: Optional[int] = field(default=None, metadata={
        "help": "stage 1: layers of the random decoder (default: the encoder's)"})
    dropout: float = field(default=0.3, metadata={"help": "dropout of encoder and decoder (seed 002 §A.4: 0.3)"})
    ctl_temperature: float = field(default=0.07, metadata={
        "help": "fixed temperature of CTL (seed 002 leaves it unstated; 0.07 as its TTC)"})
    max_length: int = field(default=128, metadata={"help": "truncation of each sentence"})


@dataclass
class MTEDataArguments(DataArguments):
    eval_split: Optional[str] = field(default=None, metadata={"help": "not used: the MTE stages evaluate nothing"})


@dataclass
class MTETrainingArguments(TrainingArguments):
    """TrainingArguments with seed 002's MTE defaults; the stage's learning rate, warmup and epochs come from
    STAGE_DEFAULTS where the command line does not set them."""

    lr_scheduler_type: str = field(default="inverse_sqrt", metadata={"help": "seed 002 §A.4: inverse square root"})
    optim: str = field(default="adamw_torch", metadata={"help": "Table 9: AdamW"})
    per_device_train_batch_size: int = field(default=64, metadata={
        "help": "sentence pairs per device and step (Table 9: 32,768 tokens per batch)"})
    logging_steps: float = field(default=50, metadata={"help": "log the loss every N steps"})


def with_stage_defaults(argv):
    """`argv` plus the stage's Table 9 learning rate, warmup and epochs, where `argv` does not set them."""
    stage = argparse.ArgumentParser(add_help=False)
    stage.add_argument("--stage", type=int)
    known, _ = stage.parse_known_args(argv)
    given = {arg[2:].split("=")[0] for arg in argv if arg.startswith("--")}
    defaults = STAGE_DEFAULTS.get(known.stage, {})
    return list(argv) + [item for name, value in defaults.items() if name not in given
                         for item in (f"--{name}", str(value))]


def _main(argv):
    model_args, data_args, training_args = parse_args((MTEArguments, MTEDataArguments, MTETrainingArguments),
                                                      with_stage_defaults(argv))
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not training_args.resume_from_checkpoint:
        check_output_dir(training_args.output_dir, data_args.overwrite_output_dir)
    set_seed(training_args.seed)

    train = load_languages(data_args, data_args.train_split, columns=("source", "caption"),
                           purpose="MTE enhancement (the English side and its translation)",
                           max_samples=data_args.max_train_samples)
    rows = [{"source": source, "target": target} for ds in train.values()
            for source, target in zip(ds["source"], ds["caption"])]
    stage1_dir = Path(model_args.model) / ENCODER_DECODER
    if model_args.stage == 2 and not stage1_dir.is_dir():
        raise ValueError(f"--stage 2 --model {model_args.model}: not the output of stage 1 (no {ENCODER_DECODER}/ "
                         "folder); run --stage 1 first, as seed 002 §3.3 does, to train the decoder on the frozen "
                         "encoder")
    if model_args.stage == 1 and stage1_dir.is_dir():
        raise ValueError(f"--stage 1 --model {model_args.model}: this is already an MTE stage output; stage 1 starts "
                         "from a plain encoder (use --stage 2 to continue it)")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model)
    if model_args.stage == 1:
        model = mte.build_encoder_decoder(model_args.model, tokenizer, model_args.decoder_layers, model_args.dropout)
    else:
        model = mte.load_encoder_decoder(stage1_dir, tokenizer)  # with stage 1's dropout
    trainable = mte.freeze(model, model_args.stage)
    total = sum(p.numel() for p in model.parameters())
    logger.info("MTE stage %d: %d pairs (%s); trainable %d of %d parameters", model_args.stage, len(rows),
                ", ".join(train), trainable, total)

    run_info = {"stage": f"mte_stage{model_args.stage}", "model": model_args.model}
    trainer = mte.MTETrainer(model=model, args=training_args, train_dataset=datasets.Dataset.from_list(rows),
                             data_collator=mte.MTECollator(tokenizer, model_args.max_length,
                                                           model.config.decoder_start_token_id),
                             run_info=run_info, stage=model_args.stage, ctl_temperature=model_args.ctl_temperature)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    output_dir = Path(training_args.output_dir)
    trainer.save_model(output_dir / ENCODER_DECODER)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(output_dir / ENCODER_DECODER)
        mte.save_encoder(model, tokenizer, output_dir)
        hyperparameters = card_hyperparameters(training_args)
        hyperparameters.update(stage=model_args.stage, dropout=model_args.dropout,
                               ctl_weight=mte.CTL_WEIGHT if model_args.stage == 2 else None,
                               ctl_temperature=model_args.ctl_temperature if model_args.stage == 2 else None)
        save_model_card(output_dir, "mte_encoder.md", output_dir.name, languages=["en", *train],
                        base_model=model_args.model, stage=model_args.stage, hyperparameters=hyperparameters,
                        trainable=trainable, total=total, pairs=len(rows), dataset=data_args.dataset,
                        split=data_args.train_split)
        if training_args.push_to_hub:
            from training_scripts.training import publish

            publish(output_dir, training_args.hub_model_id or output_dir.name, token=training_args.hub_token,
                    private=training_args.hub_private_repo)
    return trainer


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
