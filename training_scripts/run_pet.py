"""Per-language PET heads for M-CLIP with translation-based alignment (seed paper 000), one language after another.

    accelerate launch training_scripts/run_pet.py --base DIR --pet_method lora --dataset xtd --data_dir XTD \\
        --dataset_options variant=fewshot --image_features feats.parquet --languages en de ja \\
        --alignment routine3 --alignment_loss mse --alignment_weight 0.1 --translations mt.tsv --output_dir OUT

Each language gets its own adapter in OUT/{lang}/ (a language that has one is skipped unless
--overwrite_output_dir). The image tower is frozen: image vectors are encoded once (the embedding cache, or
--image_features). Defaults follow Appendix A: Adam, cosine schedule, 40 epochs at batch 10, learning rate 1e-4
(1e-5 for full fine-tuning), evaluation every 5 steps on the validation split, the best state kept for the test
split. Writes OUT/results.{json,md,png} (zero-shot base and adapters side by side, as Table 1) and OUT/README.md
(a model card); --push_to_hub REPO uploads the language folders and the card to one repository.
"""
import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoProcessor, HfArgumentParser, TrainerCallback, TrainingArguments, set_seed

from training_scripts import pet
from training_scripts.cli import run_cli
from training_scripts.data import DatasetImages, dataset_languages, dataset_option, image_features, load_language
from training_scripts.embeddings import Encoder, load_model
from training_scripts.metrics import summarize_columns
from training_scripts.report import write_results

logger = logging.getLogger(__name__)


@dataclass
class PETArguments:
    base: str = field(metadata={"help": "M-CLIP directory (published format or ours) or Hub id"})
    pet_method: str = field(default="lora", metadata={"help": f"one of {', '.join(pet.METHODS)}"})
    languages: list[str] = field(default=None, metadata={"help": "default: all the dataset has"})
    dataset: str = field(default="synthetic")
    data_dir: str = field(default=None)
    dataset_options: list[str] = field(default_factory=list, metadata={"help": "KEY=VALUE builder options"})
    train_split: str = field(default="train")
    eval_split: str = field(default="validation")
    test_split: str = field(default="test")
    image_features: str = field(default=None, metadata={"help": "Parquet of image_id, image_embeds"})
    feature_cache_dir: str = field(default=None, metadata={"help": "the embedding cache of the image vectors"})
    alignment: str = field(default="none", metadata={"help": f"one of {', '.join(pet.ROUTINES)}"})
    alignment_loss: str = field(default="mse", metadata={"help": "mse, cl_pivot_target or cl_pivot_image"})
    alignment_weight: float = field(default=0.1, metadata={"help": "λ of eq. 9 (the paper: 0.1-1 best)"})
    translations: str = field(default=None, metadata={"help": "xclip-eval --translated_captions format, with "
                                                              "caption_en (routine3) / caption_translated (routine2)"})
    hard_prompt: str = field(default=None, metadata={"help": "a template with {} for every language, or a JSON file "
                                                             "{language: template}"})
    pet_rank: int = field(default=None, metadata={"help": "LoRA r / adapter bottleneck (default per method)"})
    num_virtual_tokens: int = field(default=None, metadata={"help": "prompt: random init of N tokens (default: "
                                                                     "initialised from the hard prompt's text)"})
    push_to_hub_repo: str = field(default=None, metadata={"help": "upload the adapters and card to this repo "
                                                                   "(given as --push_to_hub REPO)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "retrain languages that have an adapter"})


# Appendix A defaults, applied where the command line does not set them
DEFAULTS = {"num_train_epochs": 40, "per_device_train_batch_size": 10, "lr_scheduler_type": "cosine",
            "optim": "adamw_torch", "weight_decay": 0.0, "eval_strategy": "steps", "eval_steps": 5,
            "save_strategy": "no", "logging_steps": 5, "report_to": "none", "remove_unused_columns": False,
            "seed": 42}


def parse(argv):
    argv = ["--push_to_hub_repo" if a == "--push_to_hub" else a for a in argv]
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    method = argv[argv.index("--pet_method") + 1] if "--pet_method" in argv[:-1] else "lora"
    defaults = {**DEFAULTS, "learning_rate": pet.DEFAULT_LEARNING_RATE.get(method, pet.PET_LEARNING_RATE)}
    argv = argv + [item for key, value in defaults.items() if key not in given for item in (f"--{key}", str(value))]
    parser = HfArgumentParser((PETArguments, TrainingArguments))
    args, training = parser.parse_args_into_dataclasses(argv)
    pet.check_method(args.pet_method)
    pet.check_alignment(args.alignment, args.alignment_loss)
    if args.alignment in pet.ROUTINE_COLUMN and not args.translations:
        raise ValueError(f"--alignment {args.alignment} needs --translations (a file with a "
                         f"{pet.ROUTINE_COLUMN[args.alignment]} column)")
    args.dataset_options = dict(dataset_option(o) for o in args.dataset_options)
    return args, training


class KeepBest(TrainerCallback):
    """Keeps a copy of the trainable state at the best validation r1_mean and restores it when training ends (the
    best checkpoint for the test split, without writing one to disk every 5 steps)."""

    def __init__(self, model, metric="eval_r1_mean"):
        self.model, self.metric, self.best, self.state = model, metric, None, None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            self.state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_train_end(self, args, state, control, **kwargs):
        if self.state is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in self.state.items():
                    params[name].copy_(value)
            logger.info("restored the best validation state (%s %.2f)", self.metric, self.best)


def split_rows(args, language, split):
    """(image_ids, captions, positive keys) of one language's split."""
    _, ds = load_language(args.dataset, language, split, args.data_dir, args.dataset_options)
    image_ids = [str(i) for i in ds["image_id"]]
    keys = [str(c) for c in ds["concept"]] if "concept" in ds.column_names else image_ids
    return image_ids, list(ds["caption"]), keys, ds


def image_vectors(args, splits):
    """{image_id: row} of the L2-normalised image vectors of every image of the splits, and the tensor."""
    rows = {}
    for _, _, _, ds in splits:
        for row, image_id in enumerate(ds["image_id"]):
            rows.setdefault(str(image_id), (ds, row))
    ids = list(rows)
    if args.image_features:
        embeds = image_features(args.image_features, ids)
    else:
        encoder = Encoder(args.base, cache_dir=args.feature_cache_dir)
        identity = {"dataset": args.dataset, "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
                    "options": args.dataset_options, "image_ids": ids}
        embeds = encoder.images(DatasetImages([rows[i] for i in ids], args.data_dir), identity)
    return {image_id: index for index, image_id in enumerate(ids)}, embeds


def retrieval_split(texts, keys, image_ids, position, embeds, template):
    gallery = list(dict.fromkeys(image_ids))
    key_of = dict(zip(image_ids, keys))
    key_ids = {}
    return pet.RetrievalSplit(texts, [key_ids.setdefault(k, len(key_ids)) for k in keys],
                              embeds[[position[i] for i in gallery]],
                              [key_ids.setdefault(key_of[i], len(key_ids)) for i in gallery], template)


def _main(argv):
    args, training = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    out = Path(training.output_dir)
    languages = args.languages or dataset_languages(args.dataset, args.data_dir, args.dataset_options)
    templates = pet.hard_prompts(args.hard_prompt, languages)
    routine3 = args.alignment == "routine3"
    column = pet.ROUTINE_COLUMN.get(args.alignment)
    translations = pet.read_translation_column(args.translations, column) if column else None
    tokenizer = AutoProcessor.from_pretrained(args.base, trust_remote_code=True)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    pivot = {split: split_rows(args, pet.PIVOT, split) for split in (args.train_split, args.eval_split, args.test_split)}
    position, embeds = image_vectors(args, list(pivot.values()))
    zero_shot, results, shares = {}, {}, {}
    base_model = load_model(args.base)
    for language in languages:
        folder = out / language
        if (folder / pet.PET_FILE).exists() and not args.overwrite_output_dir:
            meta = pet.read_pet_file(out, language)
            logger.info("%s: adapter exists in %s, skipped (--overwrite_output_dir to retrain)", language, folder)
            zero_shot[language], results[language], shares[language] = meta["zero_shot"], meta["test"], meta["share"]
            continue
        set_seed(training.seed)
        splits = {split: split_rows(args, language, split) for split in pivot}
        image_ids, captions, keys, _ = splits[args.test_split]
        zero_shot[language] = retrieval_split(captions, keys, image_ids, position, embeds, "{}").metrics(
            base_model, tokenizer)

        model = pet.add_pet(load_model(args.base), args.pet_method, language, rank=args.pet_rank,
                            num_virtual_tokens=args.num_virtual_tokens,
                            prompt_init_text=None if args.num_virtual_tokens else "a photo of",
                            tokenizer_path=args.base)
        share = pet.share_of(model, args.pet_method)

        def texts_of(split):
            ids, caps, split_keys, _ = splits[split]
            texts, pivots = pet.pair_texts(language, (ids, caps), pivot[split][:2], args.alignment, translations,
                                           args.translations)
            return ids, texts, pivots, split_keys

        train_ids, train_texts, train_pivots, _ = texts_of(args.train_split)
        rows = [{"text": t, "pivot": None if train_pivots is None else train_pivots[i], "image": position[train_ids[i]]}
                for i, t in enumerate(train_texts)]
        # routine 3 replaces the target captions by their English translations, in validation and test too
        eval_ids, eval_texts, _, eval_keys = texts_of(args.eval_split) if routine3 else (
            splits[args.eval_split][0], splits[args.eval_split][1], None, splits[args.eval_split][2])
        test_ids, test_texts, _, test_keys = texts_of(args.test_split) if routine3 else (
            image_ids, captions, None, keys)
        template = templates[language]
        validation = retrieval_split(eval_texts, eval_keys, eval_ids, position, embeds, template)
        if args.pet_method != "hard_prompt":
            trainer = pet.PETTrainer(
                model=model, args=dataclasses.replace(training, output_dir=str(out / "checkpoints" / language)),
                train_dataset=rows, eval_dataset=validation.texts, data_collator=pet.PETCollator(tokenizer, embeds, template),
                alignment_loss=args.alignment_loss, alignment_weight=args.alignment_weight,
                validation=validation, eval_tokenizer=tokenizer)
            keep = KeepBest(model)
            trainer.add_callback(keep)
            trainer.train()
            shutil.rmtree(out / "checkpoints" / language, ignore_errors=True)
        results[language] = retrieval_split(test_texts, test_keys, test_ids, position, embeds, template).metrics(
            model, tokenizer)
        shares[language] = share
        meta = {"method": args.pet_method, "language": language, "hard_prompt": template, "base_model": args.base,
                "base": pet.base_identity(base_model),
                "alignment": {"routine": args.alignment if language != pet.PIVOT else "none",
                              "loss": args.alignment_loss, "weight": args.alignment_weight},
                "translated_test": routine3 and language != pet.PIVOT,
                "share": share, "zero_shot": zero_shot[language], "test": results[language]}
        pet.save_language(model, out, language, meta)
        logger.info("%s: r1_mean zero-shot %.2f -> %s %.2f", language, zero_shot[language]["r1_mean"],
                    args.pet_method, results[language]["r1_mean"])
    shutil.rmtree(out / "checkpoints", ignore_errors=True)

    report = {"task": "retrieval", "model": f"{args.base} + {args.pet_method} adapters", "dataset": args.dataset,
              "split": args.test_split, "languages": languages,
              "setup": {"pet_method": args.pet_method, "alignment": args.alignment,
                        "alignment_loss": args.alignment_loss, "alignment_weight": args.alignment_weight,
                        "translations": args.translations, "image_features": args.image_features},
              "sizes": {language: {"texts": len(split_rows(args, language, args.test_split)[1])}
                        for language in languages},
              "per_language": results, "summary": summarize_columns(results),
              "zero_shot": {"per_language": zero_shot, "summary": summarize_columns(zero_shot)},
              "shares": shares, "total_share": pet.total_share(shares, base_model)}
    write_results(out, report)
    with (out / "results.md").open("a", encoding="utf-8") as md:
        md.write("\n" + pet.comparison_table(report) + "\n")
    pet.write_model_card(out, report)
    if args.push_to_hub_repo:
        pet.push_adapters(out, args.push_to_hub_repo, languages)
    print(pet.comparison_table(report))


def main(argv=None):
    return run_cli(_main, argv)


if __name__ == "__main__":
    main()
