"""mCLIP by triangle cross-modal knowledge distillation (TriKD, seed paper 002 §3.2).

    accelerate launch training_scripts/run_trikd.py                   # the main job: the embedded default
    accelerate launch training_scripts/run_trikd.py --clip openai/clip-vit-base-patch32 --text xlm-roberta-base \\
        --dataset DIR_OR_HUB_ID --languages en de fr --output_dir mclip

CLIP's image and text towers and the multilingual text encoder (MTE, e.g. XLM-R or a run_mte.py output) stay frozen;
only the CLIP-projector, the X-projector and the logit scale train, on ITC + 0.1 x TTC. Non-English captions give
ITC only; TTC pairs each English caption with CLIP's embedding of it. The frozen towers are encoded once (cached
under --feature_cache_dir): CLIP's image embeddings, CLIP's English text embeddings and, with --cache_mte_states,
the MTE's token states.

With no arguments it makes a multilingual model from the synthetic world, with no download: a small English CLIP
trained from scratch by ContrastiveTrainer (once, then cached) and a random word-level MTE, distilled into all 10
languages. It prints the English CLIP's English table and the result's per-language table (with the chance level),
and writes the model (AutoModel-loadable), its processor, model card and results.{json,md,png} to --output_dir.
"""
import logging
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoProcessor, AutoTokenizer, TrainingArguments, set_seed

from modeling_xclip import XMCLIPModel
from processing import XCLIPProcessor
from training_scripts import embedded
from training_scripts.cli import run_cli
from training_scripts.contrastive import (Rows, TriKDTrainer, caption_rows, chance_levels, data_summary,
                                          frozen_image_embeddings, images_of, optimizer_choice, results_table,
                                          split_sizes, trikd_collator)
from training_scripts.embeddings import Encoder, model_fingerprint
from training_scripts.training import (DataArguments, RetrievalEvaluator, card_hyperparameters, check_images,
                                       check_output_dir, finish, load_languages, parse_args, results_record)

logger = logging.getLogger(__name__)

# Seed paper 002, Table 9 / §A: TriKD with LAMB at a peak learning rate of 1e-2 and a batch of 16,384, linear warm-up
# (500 of its steps) and decay to 0, weight decay 0.01 (XLM-R's), the ITC temperature learnable from 0.07, TTC at 0.07,
# lambda 0.1, an X-projector of 2 layers. The batch, epochs (15 on CC3M) and learning rate are the paper's scale;
# the defaults below fit the embedded world on a CPU (batch 256, 12 epochs, 3e-3 with AdamW).
TRAINING_DEFAULTS = dict(output_dir="mclip-synthetic", per_device_train_batch_size=256, learning_rate=3e-3,
                         num_train_epochs=12, warmup_steps=0.1, lr_scheduler_type="linear", weight_decay=0.01,
                         logging_steps=50, save_strategy="epoch", save_total_limit=1, dataloader_drop_last=True,
                         dataloader_pin_memory=False, report_to="none", seed=42)


@dataclass
class TriKDArguments:
    clip: Optional[str] = field(default=None, metadata={
        "help": "CLIP checkpoint (Hub id or dir) whose image and text towers stay frozen; default: the embedded "
                "small English CLIP, trained on the synthetic world's English captions (once, then cached)"})
    text: Optional[str] = field(default=None, metadata={
        "help": "the multilingual text encoder (Hub id or dir: xlm-roberta-base, a run_mte.py output, ...); "
                "default: the embedded random MTE with a word-level tokenizer of the synthetic vocabulary"})
    text_template: Optional[str] = field(default=None, metadata={"help": 'e.g. "query: {}" for e5-style encoders'})
    x_projector_num_layers: int = field(default=2, metadata={"help": "transformer layers of the X-projector (paper: 2)"})
    ttc_weight: float = field(default=0.1, metadata={"help": "lambda, the weight of TTC (paper: 0.1; 0: ITC only)"})
    ttc_temperature: float = field(default=0.07, metadata={"help": "fixed temperature of TTC (paper: 0.07)"})
    frozen_features: bool = field(default=True, metadata={
        "help": "encode the frozen towers once (cached under --feature_cache_dir) rather than at every step"})
    cache_mte_states: Optional[bool] = field(default=None, metadata={
        "help": "also encode the frozen MTE's token states once (memory: rows x tokens x hidden floats); "
                "default: on for the embedded MTE, off otherwise"})
    optimizer: str = field(default="lamb", metadata={
        "help": "lamb: LAMB as in the paper, from timm (pip install timm); without timm, AdamW is used instead "
                "(and the run says so). trainer: TrainingArguments' --optim", "choices": ["lamb", "trainer"]})


def _main(argv):
    model_args, data_args, training_args = parse_args(
        (TriKDArguments, DataArguments, TrainingArguments), argv, TRAINING_DEFAULTS)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_output_dir(training_args.output_dir, data_args.overwrite_output_dir)
    set_seed(training_args.seed)    # before any weight is initialised: a run is reproducible
    if data_args.dataset == "synthetic" and not data_args.dataset_options:
        data_args.dataset_options = list(embedded.SYNTHETIC_OPTIONS)   # the world the embedded towers know
    if model_args.ttc_weight > 0 and data_args.languages is not None and "en" not in data_args.languages:
        raise ValueError("TTC needs English captions (the English side of TriKD): add en to --languages, or pass "
                         "--ttc_weight 0 for ITC only")
    train = load_languages(data_args, data_args.train_split, columns=["caption", "image_id"], purpose="TriKD",
                           max_samples=data_args.max_train_samples)
    if model_args.ttc_weight > 0 and "en" not in train:
        raise ValueError(f"dataset {data_args.dataset!r} has no English captions, which TTC needs: pass "
                         "--ttc_weight 0 for ITC only")
    check_images(train, data_args, purpose="TriKD")
    clip = model_args.clip or str(embedded.embedded_clip())
    text = model_args.text or str(embedded.embedded_mte())
    cache_mte = model_args.text is None if model_args.cache_mte_states is None else model_args.cache_mte_states

    model = XMCLIPModel.from_pretrained_towers(text=text, clip=clip,
                                               x_projector_num_layers=model_args.x_projector_num_layers,
                                               ttc_weight=model_args.ttc_weight,
                                               ttc_temperature=model_args.ttc_temperature)
    trainable = model.freeze("trikd")
    clip_processor = AutoProcessor.from_pretrained(clip, trust_remote_code=True)
    clip_tokenizer = getattr(clip_processor, "tokenizer", clip_processor)
    mte_tokenizer = AutoTokenizer.from_pretrained(text)
    max_length = min(mte_tokenizer.model_max_length, model.config.text_config.max_position_embeddings - 2)
    processor = XCLIPProcessor(clip_processor.image_processor, mte_tokenizer, text_template=model_args.text_template,
                               max_length=max_length)
    template = model_args.text_template or "{}"

    image_ids, image_index, _ = images_of(train)
    rows = caption_rows(train, mte_tokenizer, image_index, template, max_length,
                        clip_tokenizer=None if model_args.frozen_features else clip_tokenizer)
    clip_encoder = Encoder(clip, batch_size=256, cache_dir=data_args.cache_dir)
    collator = trikd_collator(model, train, rows, clip_encoder, data_args, mte_tokenizer,
                              frozen_features=model_args.frozen_features, cache_mte_states=cache_mte,
                              text_template=template, max_length=max_length, mte_fingerprint=model_fingerprint(text))

    def evaluator(split):
        """Per-language retrieval on `split`: CLIP's cached image embeddings through the training CLIP-projector."""
        sets = load_languages(data_args, split, columns=["caption", "image_id"], purpose="evaluation",
                              max_samples=data_args.max_eval_samples)
        ids = images_of(sets)[0]
        embeds = frozen_image_embeddings(clip_encoder, data_args, split, sets)
        project = lambda m: dict(zip(ids, m.project_clip_embeds(embeds.to(m.clip_projector.weight.device))))  # noqa: E731
        return RetrievalEvaluator(sets, processor, project, text_template=template), sets, embeds

    run_info = {"stage": "trikd", "clip": clip, "text": text, "dataset": data_args.dataset, "languages": list(train),
                "x_projector_num_layers": model_args.x_projector_num_layers}
    trainer = TriKDTrainer(
        model=model, args=training_args, train_dataset=Rows(rows), data_collator=collator, run_info=run_info,
        evaluator=evaluator(data_args.eval_split)[0] if data_args.eval_split and training_args.eval_strategy != "no"
        else None, optimizer_cls_and_kwargs=optimizer_choice(model_args.optimizer, training_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    results = None
    if data_args.test_split:
        test, sets, embeds = evaluator(data_args.test_split)
        per_language = test(trainer.model)
        chance = chance_levels(sets)
        setup = {"clip": clip, "text": text, "text_template": template, "chance_t2i_R@1": chance}
        if "en" in sets:  # the English CLIP, English only: the level TriKD distils from
            ids = images_of(sets)[0]
            english_clip = RetrievalEvaluator({"en": sets["en"]}, clip_processor, lambda m: dict(zip(ids, embeds)))
            clip_results = results_record(english_clip(clip_encoder.model), clip, data_args.dataset,
                                          data_args.test_split, {"chance_t2i_R@1": {"en": chance["en"]}})
            setup["english_clip_en_t2i_R@1"] = clip_results["per_language"]["en"]["t2i"]["R@1"]
            if trainer.is_world_process_zero():
                print(f"\nThe English CLIP, English only (chance t2i R@1 {chance['en']:.2f}%):\n")
                print(results_table(clip_results))
        results = results_record(per_language, training_args.output_dir, data_args.dataset, data_args.test_split,
                                 setup, split_sizes(sets))
        if trainer.is_world_process_zero():
            print(f"\nmCLIP after TriKD, every language (chance t2i R@1 "
                  f"{statistics.fmean(chance.values()):.2f}%):\n")
            print(results_table(results))
    model.remove_clip_text_model()
    hyperparameters = card_hyperparameters(training_args)
    hyperparameters.update(optimizer=type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                          else trainer.optimizer).__name__,
                           ttc_weight=model_args.ttc_weight, ttc_temperature=model_args.ttc_temperature,
                           x_projector_num_layers=model_args.x_projector_num_layers)
    card = dict(
        languages=list(train), base_model=[b for b in (model_args.clip, model_args.text) if b] or None, datasets=None,
        method="TriKD (mCLIP, seed paper 002 §3.2): ITC + λ·TTC; CLIP and the MTE frozen",
        method_summary="A multilingual CLIP made by triangle cross-modal knowledge distillation: CLIP's image and "
                       "text towers and a multilingual text encoder stay frozen; a shared CLIP-projector and an "
                       "X-projector over the encoder's token states learn the shared space. Non-English captions "
                       "give the image-text loss only; English captions also the text-text loss against CLIP.",
        script="training_scripts/run_trikd.py", family="xclip-mclip",
        base_models={"CLIP (image tower; text tower as TTC teacher)": clip, "multilingual text encoder": text},
        trainable=trainable, hyperparameters=hyperparameters,
        data_summary=data_summary(data_args, train, len(rows), len(image_ids)))
    finish(trainer, processor, training_args.output_dir, card, results=results, push_to_hub=training_args.push_to_hub)
    return results


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
