"""What the training scripts share: arguments, data checks, evaluation during training, run identity for resume,
and what a finished run writes (model, processor, model card, results, Hub).

A script (``run_*.py``) parses ``(ModelArguments, DataArguments, TrainingArguments)`` with ``parse_args``, loads its
languages with ``load_languages`` (clear errors for a missing language or column, before any training step), builds
an ``XCLIPTrainer`` subclass whose ``compute_loss`` calls ``modeling_xclip.losses``, and ends with ``finish``.
Frozen towers are encoded once through ``training_scripts.embeddings.cached_features`` (the library's one cache),
under ``DataArguments.feature_cache_dir``.
"""
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from transformers import HfArgumentParser, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from training_scripts.data import dataset_languages, dataset_option, load_language
from training_scripts.embeddings import Encoder
from training_scripts.metrics import flatten, retrieval_metrics, summarize_columns
from training_scripts.publish import publishable

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MODEL_CARDS = REPO / "model_cards"
DEFAULT_CACHE = Path(os.environ.get("XCLIP_CACHE", Path.home() / ".cache" / "xclip"))
RUN_FILE = "xclip_run.json"
# files whose presence means a directory holds a saved model (or adapter) that a run must not overwrite
MODEL_FILES = ("config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors")


@dataclass
class DataArguments:
    """Which data a training script reads: any dataset of ours, one config per language."""

    dataset: str = field(default="synthetic", metadata={
        "help": "xtd, multi30k, coco_cn, synthetic, or a local Parquet dir / Hub dataset in our schema"})
    data_dir: Optional[str] = field(default=None, metadata={"help": "where the dataset's files are"})
    dataset_options: list[str] = field(default_factory=list, metadata={
        "help": "builder options KEY=VALUE, e.g. variant=parallel images_dir=/data/flickr30k num_images=2000",
        "nargs": "+"})
    languages: Optional[list[str]] = field(default=None, metadata={
        "help": "languages to train on (default: all the dataset has)", "nargs": "+"})
    train_split: str = field(default="train", metadata={"help": "split to train on"})
    eval_split: Optional[str] = field(default="validation", metadata={
        "help": "split evaluated during training ('none': no evaluation)"})
    test_split: Optional[str] = field(default="test", metadata={
        "help": "split of the final per-language results ('none': no final evaluation)"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "rows per language used for training"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "rows per language evaluated"})
    image_features: Optional[str] = field(default=None, metadata={
        "help": "Parquet of image_id, image_embeds: precomputed image-tower outputs (no image tower runs)"})
    feature_cache_dir: Optional[str] = field(default=None, metadata={
        "help": f"where frozen towers' outputs are cached across epochs and runs (default {DEFAULT_CACHE}/features; "
                "'none' disables the cache)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace a model already saved in --output_dir"})

    def __post_init__(self):
        if self.eval_split in ("none", "None", ""):
            self.eval_split = None
        if self.test_split in ("none", "None", ""):
            self.test_split = None

    @property
    def options(self):
        """The builder options as a dict (values parsed as JSON where they parse)."""
        return dict(dataset_option(option) for option in self.dataset_options)

    @property
    def cache_dir(self):
        """The frozen-feature cache directory, or None when disabled."""
        if self.feature_cache_dir in ("none", "None", ""):
            return None
        return Path(self.feature_cache_dir) if self.feature_cache_dir else DEFAULT_CACHE / "features"


def parse_args(dataclass_types, argv=None, defaults=None):
    """The dataclass instances of `dataclass_types` from `argv` (HfArgumentParser; `--help` lists every field).

    `defaults` overrides the defaults of fields (e.g. TrainingArguments' learning rate): a script's paper values."""
    parser = HfArgumentParser(dataclass_types)
    if defaults:
        parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


def check_output_dir(output_dir, overwrite=False):
    """Refuse to write a run into a directory that already holds a saved model, unless `overwrite`."""
    found = [name for name in MODEL_FILES if (Path(output_dir) / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a model ({', '.join(found)}): pass --overwrite_output_dir "
                              "to replace it, or choose another --output_dir")


def load_languages(data_args, split, columns=(), purpose="training", max_samples=None):
    """{language: Dataset} of `split` for the languages of `data_args`, each checked to have `columns`.

    Raises before any training step: a language the dataset lacks, a missing split, or a missing column (named with
    the dataset, language, split and `purpose`). Images are left undecoded. `max_samples` keeps the first rows.
    """
    available = dataset_languages(data_args.dataset, data_args.data_dir, data_args.options)
    languages = data_args.languages or available
    unknown = [language for language in languages if language not in available]
    if unknown:
        raise ValueError(f"--languages {' '.join(unknown)}: dataset {data_args.dataset!r} has no such language "
                         f"(it has {', '.join(available)})")
    loaded = {}
    for language in languages:
        split_name, ds = load_language(data_args.dataset, language, split, data_args.data_dir, data_args.options)
        missing = [column for column in columns if column not in ds.column_names]
        if missing:
            raise ValueError(f"dataset {data_args.dataset!r} ({language}, split {split_name}) lacks column(s) "
                             f"{', '.join(missing)} needed for {purpose}; it has {', '.join(ds.column_names)}")
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        loaded[language] = ds
    return loaded


def check_images(datasets_by_language, data_args, purpose="training"):
    """Every language must have image pixels (an `image` column, or `image_path`s) or --image_features."""
    if data_args.image_features:
        return
    for language, ds in datasets_by_language.items():
        has_pixels = "image" in ds.column_names or (
            "image_path" in ds.column_names and len(ds) and ds[0]["image_path"] is not None)
        if not has_pixels:
            raise ValueError(f"dataset {data_args.dataset!r} ({language}) has no image pixels for {purpose}: pass "
                             "the images (e.g. --dataset_options images_dir=DIR) or --image_features FILE")


def positive_keys(ds, key_ids):
    """Integer retrieval keys of a dataset's rows: its concept where the data has one, else its image id.

    `key_ids` ({name: int}) is shared across languages so that equal concepts or images get equal keys.
    """
    names = ds["concept"] if "concept" in ds.column_names else ds["image_id"]
    return [key_ids.setdefault(str(name), len(key_ids)) for name in names]


class RetrievalEvaluator:
    """Per-language retrieval of an in-memory model during training, with the metrics module's conventions.

    Args:
        datasets_by_language: {language: Dataset} (captions and image ids; concepts where the data has them).
        processor: the model's processor (tokenizer, max length).
        image_embeds: callable(model) -> {image_id: vector} for every image of the datasets: the frozen image
            tower's cached outputs, mapped by whatever of the model trains on top of them.
        text_template: applied to every caption ("{}" by default), or {language: template} (e.g. per-language hard
            prompts). Captions in another form (e.g. translated) are given as the datasets' `caption` column.
    """

    def __init__(self, datasets_by_language, processor, image_embeds, text_template="{}", batch_size=64):
        self.datasets = datasets_by_language
        self.processor = processor
        self.image_embeds = image_embeds
        self.text_template = text_template
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, model):
        was_training = model.training
        model.eval()
        try:
            vectors = self.image_embeds(model)
            encoder = Encoder.from_model(model, self.processor, batch_size=self.batch_size)
            key_ids, per_language = {}, {}
            for language, ds in self.datasets.items():
                keys = positive_keys(ds, key_ids)
                template = self.text_template
                if isinstance(template, dict):
                    template = template[language]
                texts = encoder.texts([template.format(c) for c in ds["caption"]], desc=f"eval {language}")
                image_ids = [str(i) for i in ds["image_id"]]
                gallery = list(dict.fromkeys(image_ids))
                image_key = dict(zip(image_ids, keys))
                images = torch.nn.functional.normalize(
                    torch.stack([torch.as_tensor(vectors[i]) for i in gallery]).float().cpu(), dim=-1)
                per_language[language] = retrieval_metrics(texts, keys, images, [image_key[i] for i in gallery])
            return per_language
        finally:
            model.train(was_training)


def run_metrics(per_language, prefix="eval"):
    """Flat Trainer metrics of a per-language evaluation: `{prefix}_{language}_{column}` and `{prefix}_{stat}_{column}`
    for stat in avg / avg_en / std / range (e.g. `eval_avg_t2i_R@1`, a `metric_for_best_model`)."""
    metrics = {}
    for language, values in per_language.items():
        metrics.update({f"{prefix}_{language}_{column}": value for column, value in flatten(values).items()})
    for column, stats in summarize_columns(per_language).items():
        metrics.update({f"{prefix}_{stat}_{column}": value for stat, value in stats.items() if value is not None})
    return metrics


class _RunInfoCallback(TrainerCallback):
    """Writes the run identity into every checkpoint, so that a resume can be checked against it."""

    def __init__(self, run_info):
        self.run_info = run_info

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                (checkpoint / RUN_FILE).write_text(json.dumps(self.run_info, indent=2, sort_keys=True) + "\n")


def check_resume(checkpoint, run_info):
    """A checkpoint may resume this run only if it was written by the same stage of the same model (its RUN_FILE)."""
    path = Path(checkpoint) / RUN_FILE
    if not path.is_file():
        raise ValueError(f"--resume_from_checkpoint {checkpoint}: not a checkpoint of an xclip training run "
                         f"(no {RUN_FILE})")
    saved = json.loads(path.read_text())
    differ = {key: (saved.get(key), value) for key, value in run_info.items() if saved.get(key) != value}
    if differ:
        details = "; ".join(f"{key}: checkpoint {a!r}, this run {b!r}" for key, (a, b) in differ.items())
        raise ValueError(f"--resume_from_checkpoint {checkpoint} is from another run ({details})")


class XCLIPTrainer(Trainer):
    """A `Trainer` whose subclasses define `compute_loss` with `modeling_xclip.losses`.

    - `run_info` ({"stage": ..., "model": ...}) is written to every checkpoint and checked on resume.
    - with an `evaluator` (e.g. `RetrievalEvaluator`), `evaluate()` reports per-language retrieval (see
      `run_metrics`), so `metric_for_best_model="eval_avg_t2i_R@1"` and `load_best_model_at_end` work;
      `last_evaluation` keeps the latest per-language metrics; the evaluator's datasets stand for `eval_dataset`.
    - the datasets hold the collator's own rows, so unused columns are never removed.
    """

    def __init__(self, *args, run_info=None, evaluator=None, **kwargs):
        if evaluator is not None and kwargs.get("eval_dataset") is None:
            kwargs["eval_dataset"] = evaluator.datasets  # what `evaluate()` reads (Trainer requires one to evaluate)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False
        self.run_info = dict(run_info or {})
        self.evaluator = evaluator
        self.last_evaluation = None
        self.add_callback(_RunInfoCallback(self.run_info))

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            if resume_from_checkpoint is True:
                resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"--resume_from_checkpoint: no checkpoint in {self.args.output_dir}")
            check_resume(resume_from_checkpoint, self.run_info)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if self.evaluator is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        self.last_evaluation = self.evaluator(self.model)
        metrics = run_metrics(self.last_evaluation, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def results_record(per_language, model, dataset, split, setup=None, sizes=None):
    """A results.json record in the evaluation's schema (`training_scripts.report.write_results`)."""
    return {"task": "retrieval", "model": str(model), "dataset": dataset, "split": split,
            "languages": list(per_language), "setup": setup or {},
            "sizes": sizes or {language: {} for language in per_language},
            "per_language": per_language, "summary": summarize_columns(per_language)}


def model_index(name, results, metrics=("t2i_R@1", "i2t_R@1", "r1_mean")):
    """`EvalResult`s of a results record, one per language and metric, for the card's `model-index`."""
    from huggingface_hub import EvalResult

    out = []
    for language, values in results["per_language"].items():
        flat = flatten(values)
        for metric in metrics:
            out.append(EvalResult(task_type="text-to-image-retrieval", task_name="Multilingual image-text retrieval",
                                  dataset_type=results["dataset"], dataset_name=f"{results['dataset']} ({language})",
                                  dataset_config=language, dataset_split=results["split"], metric_type=metric,
                                  metric_name=f"{metric} ({language})", metric_value=round(flat[metric], 2)))
    return out


# the TrainingArguments a model card reports (what reproduces the run's optimisation)
CARD_HYPERPARAMETERS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "world_size",
                        "num_train_epochs", "warmup_steps", "lr_scheduler_type", "weight_decay", "adam_beta1",
                        "adam_beta2", "max_grad_norm", "seed")


def card_hyperparameters(training_args, **extra):
    """{name: value} of `CARD_HYPERPARAMETERS` of `training_args`, then the script's own `extra` ones."""
    return {**{name: getattr(training_args, name) for name in CARD_HYPERPARAMETERS}, **extra}


def save_model_card(output_dir, template, model_name, results=None, languages=None, base_model=None,
                    datasets=None, library_name="transformers", tags=(), **fields):
    """README.md of a saved model or adapter set, from the Jinja template `model_cards/{template}`.

    The YAML carries the languages, library, base model, datasets, the library's tags and `tags` and, with
    `results`, the `model-index`; the template receives `fields`, `model_name` and `results_table` (results.md's
    table, or None). A card names no directory of this machine: local paths are kept by their last part.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from training_scripts.report import markdown

    model_name, results, base_model, datasets, fields = publishable((model_name, results, base_model, datasets, fields))
    data = ModelCardData(language=languages, license=fields.get("license", "apache-2.0"), library_name=library_name,
                         tags=["multilingual-clip", "xclip", "image-text-retrieval", *tags], base_model=base_model,
                         datasets=datasets, model_name=model_name,
                         eval_results=model_index(model_name, results) if results else None)
    card = ModelCard.from_template(data, template_path=str(MODEL_CARDS / template), model_name=model_name,
                                   results_table=markdown(results) if results else None, **fields)
    card.save(Path(output_dir) / "README.md")
    return card


def publish(output_dir, repo_id, token=None, private=None, commit_message="Upload with multilingual-clip-hf",
            allow_patterns=None):
    """Upload `output_dir` to the Hub model repository `repo_id`: not its checkpoints, logs, or the pickled
    `training_args.bin` (which holds this machine's paths); only `allow_patterns` where given."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, token=token, private=private, exist_ok=True)
    return upload_folder(repo_id=repo_id, folder_path=str(output_dir), token=token, commit_message=commit_message,
                         allow_patterns=allow_patterns,
                         ignore_patterns=["checkpoint-*", "checkpoint-*/**", "runs/**", "*.tmp",
                                          "training_args.bin"])


def finish(trainer, processor, output_dir, card, results=None, push_to_hub=False):
    """Save the trained model (safetensors + remote code) and its processor, results.{json,md,png} and the model card
    (`card`: the arguments of `save_model_card`; by default the template `model_card.md`, the output directory's name
    as model name, and the repository id), then upload when `push_to_hub` to the repository `hub_model_id`, else the
    output directory's name. Only the main process writes."""
    from training_scripts.report import write_results

    trainer.save_model(output_dir)
    if not trainer.is_world_process_zero():
        return
    processor.save_pretrained(output_dir)
    results = publishable(results)  # results.json names no path of this machine (the card sees to itself)
    if results is not None:
        write_results(output_dir, results)
    args = trainer.args
    repo_id = args.hub_model_id or Path(output_dir).name
    card = {"template": "model_card.md", "model_name": Path(output_dir).name, "repo_id": repo_id, **card}
    save_model_card(output_dir, results=results, **card)
    if push_to_hub:
        publish(output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
