"""Teacher learning: AltCLIP's stage 1 (seed paper 001 §3.1), and how M-CLIP models are made.

    accelerate launch training_scripts/run_teacher_learning.py --model_family m-clip \\
        --student intfloat/multilingual-e5-small --text_template "query: {}" \\
        --teacher sentence-transformers/all-MiniLM-L6-v2 --teacher_pooling mean \\
        --dataset multi30k --data_dir multi30k-dataset --dataset_options variant=parallel \\
        --languages de fr cs --max_train_samples 10000 --output_dir mclip-e5

    accelerate launch training_scripts/run_teacher_learning.py --model_family altclip \\
        --student xlm-roberta-large --teacher openai/clip-vit-large-patch14 --teacher_pooling clip \\
        --clip openai/clip-vit-large-patch14 --dataset multi30k --dataset_options variant=parallel \\
        --output_dir altclip-stage1

The student regresses the teacher's vector of the English side of every pair, from the English sentence itself and
from its translation (`training_scripts.teacher_learning`). Pairs come from a dataset of ours with a `source`
(English) column: Multi30K's `parallel` variant, or any Parquet/Hub dataset in our schema that has one. The teacher's
vectors are computed once and cached (--feature_cache_dir), and the student's head starts from their least-squares
fit (--head_init). Defaults follow seed 001 Table 8 (AdamW with betas 0.99/0.999, learning rate 2e-4, weight decay
0.2, 500 warmup steps, 10 epochs, gradient clipping 1.0); its batch of 11264 is global over 88 GPUs, so the batch per
device is a command-line choice (default 128). The saved model (with its processor and a model card) loads with
`AutoModel.from_pretrained(DIR, trust_remote_code=True)`; an AltCLIP-style model continues with run_contrastive.py.
"""
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
import torch
from transformers import AutoTokenizer, CLIPImageProcessor, PretrainedConfig, TrainingArguments, set_seed

from processing import XCLIPProcessor
from training_scripts import teacher_learning as tl
from training_scripts.cli import run_cli
from training_scripts.data import DatasetImages, image_features
from training_scripts.embeddings import Encoder, cached_features, encode_text_batches, model_fingerprint
from training_scripts.training import (DataArguments, RetrievalEvaluator, card_hyperparameters, check_images,
                                       check_output_dir, finish, load_languages, parse_args, results_record)

logger = logging.getLogger(__name__)

SOURCE_COLUMN, TARGET_COLUMN = "source", "caption"


@dataclass
class ModelArguments:
    model_family: str = field(metadata={"help": "altclip (AltCLIP stage 1) or m-clip (an M-CLIP model)",
                                        "choices": tuple(tl.FAMILIES)})
    student: str = field(metadata={"help": "the multilingual text encoder (Hub id or dir, e.g. xlm-roberta-large), "
                                           "or a saved model of the family to train further"})
    teacher: str = field(metadata={"help": "the teacher: a CLIP checkpoint (--teacher_pooling clip) or any text "
                                           "encoder (mean or cls)"})
    teacher_pooling: str = field(metadata={"help": "clip: CLIP's pooled end-of-text state; mean: masked mean of "
                                                   "the token states; cls: the first token's state",
                                           "choices": tl.POOLINGS})
    clip: Optional[str] = field(default=None, metadata={
        "help": "altclip: the CLIP checkpoint whose image tower (and image processor) the model gets"})
    text_template: Optional[str] = field(default=None, metadata={
        "help": 'template of the student\'s texts, saved with the processor (e.g. "query: {}" for e5 encoders)'})
    max_length: int = field(default=77, metadata={"help": "truncation of the student's texts"})
    teacher_max_length: Optional[int] = field(default=None, metadata={
        "help": "truncation of the teacher's texts (default: the teacher tokenizer's, at most 512)"})
    head_init: str = field(default="least_squares", metadata={
        "help": "least_squares: the student's head (M-CLIP's linear map, AltCLIP's text_transformation) starts from "
                "the least-squares fit of the frozen student's features to the teacher's vectors; random; keep (a "
                "saved model's head)", "choices": ("least_squares", "random", "keep")})
    head_init_ridge: float = field(default=0.1, metadata={
        "help": "ridge penalty of the least-squares fit, relative to the features' scale (0: the plain fit, whose "
                "weights explode on the nearly collinear features of many encoders)"})
    dropout: Optional[float] = field(default=None, metadata={
        "help": "dropout of the student's encoder during training (default: its config's)"})
    freeze_embeddings: bool = field(default=False, metadata={
        "help": "keep the student's token embeddings fixed (seed 002 §3.3 does for its encoder; saves the optimizer "
                "state of XLM-R's 250k-token vocabulary)"})


@dataclass
class TeacherDataArguments(DataArguments):
    """DataArguments of teacher learning: parallel text needs no images, so evaluation is asked for explicitly."""

    eval_split: Optional[str] = field(default=None, metadata={
        "help": "split evaluated (retrieval) during and after training; needs --image_features or the model's image "
                "tower (default: none)"})


@dataclass
class TeacherLearningArguments(TrainingArguments):
    """TrainingArguments with seed 001 Table 8's teacher-learning defaults."""

    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (Table 8: 2e-4)"})
    adam_beta1: float = field(default=0.99, metadata={"help": "AdamW beta1 (Table 8: 0.99)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (Table 8: 0.999)"})
    weight_decay: float = field(default=0.2, metadata={"help": "AdamW weight decay (Table 8: 0.2)"})
    dataloader_pin_memory: bool = field(default=False, metadata={
        "help": "pin the batches' memory (the collator's tensors are small; pinning needs an accelerator)"})
    warmup_steps: float = field(default=500, metadata={"help": "linear warmup steps (Table 8: 500)"})
    num_train_epochs: float = field(default=10.0, metadata={"help": "epochs (Table 8: 10)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (Table 8: 1.0)"})
    per_device_train_batch_size: int = field(default=128, metadata={
        "help": "rows per device and step (Table 8: 11264 in all, over 88 GPUs)"})
    optim: str = field(default="adamw_torch", metadata={"help": "optimizer (Table 8: AdamW)"})
    logging_steps: float = field(default=50, metadata={"help": "log the loss every N steps"})


def is_saved_model(name_or_path, family):
    """Whether `student` is a saved model of `family` (to train further) rather than a bare text encoder."""
    config, _ = PretrainedConfig.get_config_dict(name_or_path)
    return config.get("model_type") == tl.FAMILIES[family].config_class.model_type


def build_student_and_teacher(args):
    """(model, teacher, tokenizer, image_processor). A bare encoder is assembled into the family with the teacher's
    width as its target width; a saved model keeps its own, which the teacher must match."""
    family = tl.FAMILIES[args.model_family]
    if args.model_family == "altclip" and not args.clip and not is_saved_model(args.student, "altclip"):
        raise ValueError("--model_family altclip needs --clip, the CLIP checkpoint whose image tower it gets")
    projected = args.model_family == "m-clip"  # M-CLIP regresses CLIP's joint space, AltCLIP the pre-projection state
    if is_saved_model(args.student, args.model_family):
        model = family.from_pretrained(args.student)
        teacher = tl.Teacher.from_pretrained(args.teacher, args.teacher_pooling, projected, args.teacher_max_length)
    elif args.model_family == "altclip" and args.teacher_pooling == "clip":
        # CLIP's text tower comes with the model: its text projection becomes the student's `text_projection`
        model = family.from_pretrained_towers(text=args.student, vision=args.clip, clip_text=args.teacher)
        teacher = tl.Teacher(model.clip_text_model, AutoTokenizer.from_pretrained(args.teacher), "clip",
                             max_length=args.teacher_max_length)
    else:
        teacher = tl.Teacher.from_pretrained(args.teacher, args.teacher_pooling, projected, args.teacher_max_length)
        width = {"text_transformation_dim" if args.model_family == "altclip" else "numDims": teacher.width}
        model = family.from_pretrained_towers(text=args.student, vision=args.clip, **width)
    if getattr(model, "clip_text_model", None) is not None:
        model.remove_clip_text_model()  # the teacher is held apart: checkpoints and the saved model leave it out
    tl.check_widths(model, teacher)
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    image_source = args.clip or args.student
    try:
        image_processor = CLIPImageProcessor.from_pretrained(image_source)
    except OSError:  # a text-only M-CLIP: CLIP's standard preprocessing, for the image tower whose space it targets
        image_processor = CLIPImageProcessor()
    return model, teacher, tokenizer, image_processor


def teacher_targets(teacher, english, model_args, cache_dir, batch_size):
    """The teacher's vectors of the distinct English sentences, computed once (cached when `cache_dir`)."""
    key = {"kind": "teacher_targets", "teacher": model_fingerprint(model_args.teacher),
           "pooling": teacher.pooling, "projected": teacher.projected, "max_length": teacher.max_length,
           "texts": english}
    compute = lambda: teacher.encode(english, batch_size)  # noqa: E731
    return cached_features(cache_dir, key, compute) if cache_dir else compute()


def student_pooled_features(model, tokenizer, texts, model_args, cache_dir, batch_size):
    """The frozen student's features before its head (the least-squares design matrix), cached when `cache_dir`."""
    @torch.no_grad()
    def compute():
        model.eval()
        return encode_text_batches(lambda ids, mask: tl.student_pooled(model, ids, mask), tokenizer, texts, batch_size,
                                   model_args.max_length, "student features", model.device)

    key = {"kind": "student_pooled", "model": model_fingerprint(model_args.student), "family": model_args.model_family,
           "max_length": model_args.max_length, "texts": texts}
    return cached_features(cache_dir, key, compute) if cache_dir else compute()


def _main(argv):
    model_args, data_args, training_args = parse_args((ModelArguments, TeacherDataArguments, TeacherLearningArguments), argv)
    logging.basicConfig(level=logging.INFO if training_args.should_log else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if model_args.text_template is not None and "{}" not in model_args.text_template:
        raise ValueError(f"--text_template {model_args.text_template!r} needs a {{}} where the text goes")
    if not training_args.resume_from_checkpoint:
        check_output_dir(training_args.output_dir, data_args.overwrite_output_dir)
    set_seed(training_args.seed)

    # everything a run can fail on is checked before the first step: data, languages, columns, widths, resume
    train = load_languages(data_args, data_args.train_split, columns=(SOURCE_COLUMN, TARGET_COLUMN),
                           purpose="teacher learning (the English side and its translation)",
                           max_samples=data_args.max_train_samples)
    evaluation = None
    if data_args.eval_split:
        evaluation = load_languages(data_args, data_args.eval_split, columns=(TARGET_COLUMN, "image_id"),
                                    purpose="evaluation", max_samples=data_args.max_eval_samples)
        check_images(evaluation, data_args, purpose="evaluation")
    model, teacher, tokenizer, image_processor = build_student_and_teacher(model_args)
    processor = XCLIPProcessor(image_processor, tokenizer, text_template=model_args.text_template,
                               max_length=model_args.max_length)
    template = model_args.text_template or "{}"
    rows, english = tl.build_pairs(train, SOURCE_COLUMN, TARGET_COLUMN)
    logger.info("%d training rows (%d English sentences, languages %s)", len(rows), len(english), ", ".join(train))

    cache_dir = data_args.cache_dir
    batch_size = training_args.per_device_eval_batch_size
    with training_args.main_process_first(desc="teacher targets"):
        targets = teacher_targets(teacher, english, model_args, cache_dir, batch_size)
        if model_args.head_init == "least_squares" and not training_args.resume_from_checkpoint:
            features = student_pooled_features(model, tokenizer, [template.format(r["text"]) for r in rows],
                                               model_args, cache_dir, batch_size)
            mse = tl.init_head(model, features, targets[[r["target"] for r in rows]], model_args.head_init_ridge)
            logger.info("head initialised by least squares on %d rows (mean squared error %.5f)", len(rows), mse)
    if model_args.head_init == "random" and not training_args.resume_from_checkpoint:
        model._init_weights(tl.student_head(model))

    if model_args.dropout is not None:
        tl.set_dropout(model, model_args.dropout)
    model.freeze(tl.STAGE[model_args.model_family])
    if model_args.freeze_embeddings:
        getattr(model, model.text_tower_name).get_input_embeddings().requires_grad_(False)
    trainable = model.trainable_parameters()
    logger.info("trainable: %d of %d parameters (%.2f%%)", trainable["trainable"], trainable["total"],
                trainable["percent"])

    evaluator = None
    if evaluation is not None:
        evaluator = RetrievalEvaluator(evaluation, processor, image_vectors(evaluation, data_args, model, processor),
                                       text_template=template)
    run_info = {"stage": "teacher_learning", "model_family": model_args.model_family, "student": model_args.student,
                "teacher": model_args.teacher, "teacher_pooling": model_args.teacher_pooling}
    trainer = tl.TeacherLearningTrainer(
        model=model, args=training_args, train_dataset=datasets.Dataset.from_list(rows),
        data_collator=tl.TeacherLearningCollator(tokenizer, model_args.max_length, template, targets=targets),
        run_info=run_info, evaluator=evaluator)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    results = None
    if evaluator is not None:
        trainer.evaluate()
        per_language = trainer.last_evaluation
        results = results_record(per_language, training_args.output_dir, data_args.dataset, data_args.eval_split,
                                 setup={"text_template": template, "image_features": data_args.image_features})
    card = model_card(model_args, data_args, training_args, trainer, rows, english, train)
    finish(trainer, processor, training_args.output_dir, card, results, push_to_hub=training_args.push_to_hub)
    return trainer


def image_vectors(evaluation, data_args, model, processor):
    """callable(model) -> {image_id: vector} for retrieval during training: --image_features, else the model's image
    tower (frozen in teacher learning) on the dataset's pixels; either way encoded once."""
    image_ids, rows = [], {}
    for ds in evaluation.values():
        for row, image_id in enumerate(str(i) for i in ds["image_id"]):
            rows.setdefault(image_id, (ds, row))
    image_ids = list(rows)
    if data_args.image_features:
        vectors = image_features(data_args.image_features, image_ids)
    elif getattr(model, "vision_model", None) is None:
        raise ValueError("evaluation needs image vectors and this model has no image tower: pass --image_features, "
                         "or no --eval_split")
    else:
        encoder = Encoder.from_model(model, processor)
        vectors = encoder.images(DatasetImages([rows[i] for i in image_ids], data_args.data_dir), None,
                                 desc="eval images")
    vectors = dict(zip(image_ids, vectors))
    return lambda model: vectors


def model_card(model_args, data_args, training_args, trainer, rows, english, train):
    hyperparameters = card_hyperparameters(training_args)
    hyperparameters.update(teacher_pooling=model_args.teacher_pooling, head_init=model_args.head_init,
                           head_init_ridge=model_args.head_init_ridge, dropout=model_args.dropout,
                           freeze_embeddings=model_args.freeze_embeddings, max_length=model_args.max_length)
    base_models = {"student": model_args.student, "teacher": model_args.teacher}
    if model_args.clip:
        base_models["image tower"] = model_args.clip
    method = "teacher learning (AltCLIP stage 1)" if model_args.model_family == "altclip" else "teacher learning (M-CLIP)"
    return {
        "languages": ["en", *train], "base_model": model_args.student, "method": method,
        "method_summary": ("The multilingual student regresses (MSE) the teacher's vector of the English side of "
                           "parallel sentence pairs, from the English sentence and from its translation (seed paper "
                           "001, §3.1; Carlsson et al., 2022)."),
        "script": "training_scripts/run_teacher_learning.py", "family": model_args.model_family,
        "base_models": base_models, "trainable": trainer.model.trainable_parameters(),
        "data_summary": (f"{len(rows)} training rows from `{data_args.dataset}` (split `{data_args.train_split}`, "
                         f"languages {', '.join(train)}, at most {data_args.max_train_samples or 'all'} pairs per "
                         f"language): {len(english)} English sentences (EN-EN rows) and their translations."),
        "hyperparameters": hyperparameters,
    }


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
