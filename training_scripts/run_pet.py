"""Per-language PET heads for M-CLIP with translation-based alignment (seed paper 000), one language after another.

    accelerate launch training_scripts/run_pet.py --base DIR --pet_method lora --dataset xtd --data_dir XTD \\
        --dataset_options variant=fewshot --image_features feats.parquet --languages en de ja \\
        --alignment routine3 --alignment_loss mse --alignment_weight 0.1 --translations mt.tsv --output_dir OUT

Each language gets its own adapter in OUT/{lang}/ (a language that has one is skipped unless
--overwrite_output_dir). The image tower is frozen: image vectors are encoded once (the embedding cache, or
--image_features). Defaults follow Appendix A: Adam, cosine schedule, 40 epochs at batch 10, learning rate 1e-4
(1e-5 for full fine-tuning), evaluation every 5 steps on the validation split, the best checkpoint (validation
r1_mean) kept for the test split. Checkpoints go to OUT/checkpoints/{lang}/ and are removed once the language is
saved; --resume_from_checkpoint continues an interrupted language (checked against this run's identity).
Writes OUT/results.{json,md,png} (zero-shot base and adapters side by side, as Table 1) and OUT/README.md (a model
card); --push_to_hub REPO (or --push_to_hub --hub_model_id REPO) uploads the language folders and the card to one
repository.
"""
import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoProcessor, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from training_scripts import pet
from training_scripts.cli import run_cli
from training_scripts.data import DatasetImages, image_features
from training_scripts.embeddings import Encoder, load_model
from training_scripts.publish import publishable_name
from training_scripts.report import write_results
from training_scripts.training import (DataArguments, RetrievalEvaluator, check_images, check_output_dir,
                                       load_languages, parse_args, publish, results_record)

logger = logging.getLogger(__name__)


@dataclass
class PETArguments:
    """The PET-only flags; the data flags are `DataArguments`, the rest `TrainingArguments`."""

    base: str = field(metadata={"help": "M-CLIP directory (published format or ours) or Hub id"})
    pet_method: str = field(default="lora", metadata={"help": f"one of {', '.join(pet.METHODS)}"})
    alignment: str = field(default="none", metadata={"help": f"one of {', '.join(pet.ROUTINES)}"})
    alignment_loss: str = field(default="mse", metadata={"help": "mse, cl_pivot_target or cl_pivot_image"})
    alignment_weight: float = field(default=0.1, metadata={"help": "λ of eq. 9 (the paper: 0.1-1 best)"})
    translations: Optional[str] = field(default=None, metadata={
        "help": "xclip-eval --translated_captions format, with caption_en (routine3) / caption_translated (routine2)"})
    hard_prompt: Optional[str] = field(default=None, metadata={
        "help": "a template with {} for every language, or a JSON file {language: template}"})
    pet_rank: Optional[int] = field(default=None, metadata={"help": "LoRA r / adapter bottleneck (default per method)"})
    num_virtual_tokens: Optional[int] = field(default=None, metadata={
        "help": "prompt: random init of N tokens (default: initialised from the hard prompt's text)"})


# Appendix A defaults, applied where the command line does not set them; the best checkpoint is chosen on the
# validation r1_mean of the language being trained
DEFAULTS = {"num_train_epochs": 40, "per_device_train_batch_size": 10, "lr_scheduler_type": "cosine",
            "optim": "adamw_torch", "weight_decay": 0.0, "eval_strategy": "steps", "eval_steps": 5,
            "save_strategy": "steps", "save_total_limit": 1, "load_best_model_at_end": True,
            "metric_for_best_model": "avg_r1_mean", "logging_steps": 5, "report_to": "none", "seed": 42}
BOOLEANS = {"true", "false", "yes", "no", "1", "0"}


def flag(argv, name, default=None):
    """The value given to --name on the command line, else `default`."""
    for index, arg in enumerate(argv):
        if arg == f"--{name}" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return default


def parse(argv):
    """(PETArguments, DataArguments, TrainingArguments) with Appendix A's defaults; `--push_to_hub REPO` is
    `--push_to_hub --hub_model_id REPO`."""
    argv = list(argv)
    if "--push_to_hub" in argv[:-1]:
        index = argv.index("--push_to_hub")
        value = argv[index + 1]
        if not value.startswith("--") and value.lower() not in BOOLEANS:
            argv[index:index + 2] = ["--push_to_hub", "true", "--hub_model_id", value]
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    method = flag(argv, "pet_method", "lora")
    defaults = {**DEFAULTS, "learning_rate": pet.DEFAULT_LEARNING_RATE.get(method, pet.PET_LEARNING_RATE),
                "save_steps": flag(argv, "eval_steps", DEFAULTS["eval_steps"])}  # a checkpoint at every evaluation
    argv += [item for key, value in defaults.items() if key not in given for item in (f"--{key}", str(value))]
    args, data_args, training = parse_args((PETArguments, DataArguments, TrainingArguments), argv)
    pet.check_method(args.pet_method)
    pet.check_alignment(args.alignment, args.alignment_loss)
    if args.alignment in pet.ROUTINE_COLUMN and not args.translations:
        raise ValueError(f"--alignment {args.alignment} needs --translations (a file with a "
                         f"{pet.ROUTINE_COLUMN[args.alignment]} column)")
    if data_args.eval_split is None and args.pet_method not in ("hard_prompt",):
        raise ValueError("--eval_split none: PET keeps the best checkpoint on the validation split; name one")
    if data_args.test_split is None:
        raise ValueError("--test_split none: PET reports each language's adapter on the test split; name one")
    return args, data_args, training


def image_vectors(args, data_args, datasets):
    """{image_id: L2-normalised image vector} of every image of `datasets` (a list of {language: Dataset}), from
    --image_features or the base's frozen image tower (encoded once: the library's feature cache)."""
    rows = {}
    for by_language in datasets:
        for ds in by_language.values():
            for row, image_id in enumerate(ds["image_id"]):
                rows.setdefault(str(image_id), (ds, row))
    ids = list(rows)
    if data_args.image_features:
        embeds = image_features(data_args.image_features, ids)
    else:
        encoder = Encoder(args.base, cache_dir=data_args.cache_dir)
        identity = {"dataset": data_args.dataset, "data_dir": str(Path(data_args.data_dir).resolve())
                    if data_args.data_dir else None, "options": data_args.options, "image_ids": ids}
        embeds = encoder.images(DatasetImages([rows[i] for i in ids], data_args.data_dir), identity)
    return {image_id: index for index, image_id in enumerate(ids)}, embeds


def rows_of(ds):
    """(image_ids, captions) of a dataset, or None."""
    return None if ds is None else ([str(i) for i in ds["image_id"]], list(ds["caption"]))


def resume_point(resume, checkpoints):
    """The checkpoint a language resumes from (None: it starts afresh). --resume_from_checkpoint true: the language's
    last checkpoint; a path OUT/checkpoints/{lang}/checkpoint-N: that one for its language, the last one for others."""
    if not resume:
        return None
    if str(resume).lower() not in BOOLEANS and Path(resume).parent.resolve() == checkpoints.resolve():
        return str(resume)
    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def _main(argv):
    args, data_args, training = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(training.output_dir)
    check_output_dir(out, data_args.overwrite_output_dir)  # OUT holds adapters, never a model
    columns = ["image_id", "caption"]
    train = load_languages(data_args, data_args.train_split, columns, max_samples=data_args.max_train_samples)
    languages = list(train)
    evaluation = (load_languages(data_args, data_args.eval_split, columns, "validation",
                                 data_args.max_eval_samples) if data_args.eval_split else {})
    test = load_languages(data_args, data_args.test_split, columns, "the test evaluation")
    check_images(test, data_args, "the image vectors")
    pivot = {}  # English, on the same images: routines 1 and 3 pair each caption with it
    if args.alignment in ("routine1", "routine3"):
        english = dataclasses.replace(data_args, languages=[pet.PIVOT])
        pivot = {split: load_languages(english, split, columns, f"--alignment {args.alignment}")[pet.PIVOT]
                 for split in {data_args.train_split, data_args.eval_split, data_args.test_split} - {None}}
    templates = pet.hard_prompts(args.hard_prompt, languages)
    routine3 = args.alignment == "routine3"
    column = pet.ROUTINE_COLUMN.get(args.alignment)
    translations = pet.read_translation_column(args.translations, column) if column else None
    processor = AutoProcessor.from_pretrained(args.base, trust_remote_code=True)
    tokenizer = getattr(processor, "tokenizer", processor)

    position, embeds = image_vectors(args, data_args, [train, evaluation, test, pivot])
    vectors = {image_id: embeds[index] for image_id, index in position.items()}
    base_model = load_model(args.base)
    base_name = publishable_name(args.base)  # what is saved names no path of this machine
    zero_shot, results, shares = {}, {}, {}
    for language in languages:
        folder = out / language
        if (folder / pet.PET_FILE).exists() and not data_args.overwrite_output_dir:
            meta = pet.read_pet_file(out, language)
            logger.info("%s: adapter exists in %s, skipped (--overwrite_output_dir to retrain)", language, folder)
            zero_shot[language], results[language], shares[language] = meta["zero_shot"], meta["test"], meta["share"]
            continue
        set_seed(training.seed)

        def translated(split, ds):
            """Routine 3 reads the target captions translated into English, in validation and test too."""
            if not routine3 or language == pet.PIVOT:
                return ds
            texts, _ = pet.pair_texts(language, rows_of(ds), rows_of(pivot.get(split)), args.alignment, translations,
                                      args.translations)
            return ds.remove_columns("caption").add_column("caption", texts)

        test_ds = {language: translated(data_args.test_split, test[language])}
        zero_shot[language] = RetrievalEvaluator({language: test[language]}, processor, lambda m: vectors)(
            base_model)[language]

        model = pet.add_pet(load_model(args.base), args.pet_method, "default", rank=args.pet_rank,
                            num_virtual_tokens=args.num_virtual_tokens,
                            prompt_init_text=None if args.num_virtual_tokens else "a photo of",
                            tokenizer_path=args.base)
        share = pet.share_of(model, args.pet_method)
        template = templates[language]
        if args.pet_method != "hard_prompt":
            texts, pivots = pet.pair_texts(language, rows_of(train[language]),
                                           rows_of(pivot.get(data_args.train_split)), args.alignment, translations,
                                           args.translations)
            image_ids = rows_of(train[language])[0]
            rows = [{"text": text, "pivot": None if pivots is None else pivots[i], "image": position[image_ids[i]]}
                    for i, text in enumerate(texts)]
            checkpoints = out / "checkpoints" / language
            resume = resume_point(training.resume_from_checkpoint, checkpoints)
            if checkpoints.is_dir() and any(checkpoints.iterdir()) and not resume:
                if not data_args.overwrite_output_dir:
                    raise FileExistsError(f"{checkpoints} holds checkpoints of an unfinished {language} run: pass "
                                          "--resume_from_checkpoint to continue it, or --overwrite_output_dir")
                shutil.rmtree(checkpoints)
            trainer = pet.PETTrainer(
                model=model, args=dataclasses.replace(training, output_dir=str(checkpoints), push_to_hub=False,
                                                      resume_from_checkpoint=None),
                train_dataset=rows, data_collator=pet.PETCollator(tokenizer, embeds, template),
                evaluator=RetrievalEvaluator({language: translated(data_args.eval_split, evaluation[language])},
                                             processor, lambda m: vectors, template),
                run_info={"stage": "pet", "model": args.base, "language": language, "pet_method": args.pet_method,
                          "alignment": args.alignment, "alignment_loss": args.alignment_loss,
                          "alignment_weight": args.alignment_weight, "hard_prompt": template},
                alignment_loss=args.alignment_loss, alignment_weight=args.alignment_weight)
            trainer.train(resume_from_checkpoint=resume)  # ends with the best validation checkpoint loaded
        results[language] = RetrievalEvaluator(test_ds, processor, lambda m: vectors, template)(model)[language]
        shares[language] = share
        meta = {"method": args.pet_method, "language": language, "hard_prompt": template, "base_model": base_name,
                "base": pet.base_identity(base_model),
                "alignment": {"routine": args.alignment if language != pet.PIVOT else "none",
                              "loss": args.alignment_loss, "weight": args.alignment_weight},
                "translated_test": routine3 and language != pet.PIVOT,
                "share": share, "zero_shot": zero_shot[language], "test": results[language]}
        pet.save_language(model, out, language, meta)
        shutil.rmtree(out / "checkpoints" / language, ignore_errors=True)
        logger.info("%s: r1_mean zero-shot %.2f -> %s %.2f", language, zero_shot[language]["r1_mean"],
                    args.pet_method, results[language]["r1_mean"])
    if (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
        (out / "checkpoints").rmdir()

    setup = {"base_model": base_name, "pet_method": args.pet_method, "alignment": args.alignment,
             "alignment_loss": args.alignment_loss, "alignment_weight": args.alignment_weight,
             "translations": args.translations and publishable_name(args.translations),
             "image_features": data_args.image_features and publishable_name(data_args.image_features)}
    report = results_record(results, f"{base_name} + {args.pet_method} adapters", data_args.dataset, data_args.test_split,
                            setup, {language: {"texts": len(test[language])} for language in languages})
    report.update(zero_shot=results_record(zero_shot, base_name, data_args.dataset, data_args.test_split),
                  shares=shares, total_share=pet.total_share(shares, base_model))
    write_results(out, report)
    with (out / "results.md").open("a", encoding="utf-8") as md:
        md.write("\n" + pet.comparison_table(report) + "\n")
    pet.save_card(out, report)
    if training.push_to_hub:
        publish(out, training.hub_model_id or out.name, token=training.hub_token, private=training.hub_private_repo,
                commit_message=f"Per-language {args.pet_method} adapters: {', '.join(languages)}",
                allow_patterns=pet.upload_patterns(languages))
    print(pet.comparison_table(report))


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
