"""Per-language retrieval or zero-shot classification, with Avg / Avg-en / Std / Range across languages.

    xclip-eval --model DIR --dataset xtd --data_dir /data/xtd --output_dir out/
    xclip-eval --model DIR --task classification --dataset /data/imagenet-val \\
        --class_names names.json --prompts prompts.json --output_dir out/

Writes results.json, results.md and results.png in --output_dir (refusing to overwrite them without
--overwrite). The conventions (directions, ties, summary statistics) are in training_scripts.metrics
and are written into results.md.

File formats:
  --image_features      Parquet with columns image_id and image_embeds (a list of floats per image); for
                        classification, image_id is the image's path relative to the dataset folder.
  --translated_captions Parquet (.parquet), JSON lines (.jsonl) or tab-separated (.tsv, with a header) with
                        columns language, image_id, caption_index, caption_en; caption_index is the 0-based
                        position of the caption among that image's captions of that language, in dataset
                        order. A language with no rows in the file keeps its own captions; a language with
                        some rows must have them all.
  --class_names         JSON {language: {class_folder: class name}}; default: {"en": folder names}.
  --prompts             JSON {language: [template with {}]}; default: the text template (see --text_template) for every language.
"""
import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets
import torch
import torch.nn.functional as F

from datasets_builders import BUILDERS
from datasets_builders.common import quiet_progress
from training_scripts.cli import check_local_path, run_cli
from training_scripts.data import (DatasetImages, dataset_languages, dataset_option, image_features, load_language,
                                   pick_split, read_json, read_translations, translate)
from training_scripts.embeddings import Encoder
from training_scripts.pet import use_language
from training_scripts.metrics import classification_metrics, retrieval_metrics, summarize_columns
from training_scripts.report import existing_results, write_results

logger = logging.getLogger(__name__)


def evaluate_retrieval(args, encoder):
    translations = read_translations(args.translated_captions) if args.translated_captions else {}
    languages = args.languages or dataset_languages(args.dataset, args.data_dir, args.dataset_options)
    loaded = {language: load_language(args.dataset, language, args.split, args.data_dir, args.dataset_options)
              for language in languages}
    splits = {language: split for language, (split, _) in loaded.items()}

    # Positive keys (concept, else image id) as ints; each image is encoded once for all languages.
    key_ids, image_key, image_row, per_rows = {}, {}, {}, {}
    for language, (_, ds) in loaded.items():
        image_ids = [str(i) for i in ds["image_id"]]
        concepts = ds["concept"] if "concept" in ds.column_names else image_ids
        keys = [key_ids.setdefault(str(concept), len(key_ids)) for concept in concepts]
        for row, (image_id, key) in enumerate(zip(image_ids, keys)):
            image_key.setdefault(image_id, key)
            image_row.setdefault(image_id, (ds, row))
        per_rows[language] = (image_ids, keys)
    all_ids = list(image_row)
    if args.image_features:
        image_embeds = image_features(args.image_features, all_ids, embedding_dim(encoder))
    else:
        data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
        identity = {"dataset": args.dataset, "data_dir": data_dir, "options": args.dataset_options,
                    "splits": sorted(set(splits.values())), "image_ids": all_ids}
        images_dir = args.dataset_options.get("images_dir") or args.data_dir
        image_embeds = encoder.images(DatasetImages([image_row[i] for i in all_ids], images_dir), identity)
    position = {image_id: index for index, image_id in enumerate(all_ids)}

    per_language, sizes = {}, {}
    for language in languages:
        image_ids, keys = per_rows[language]
        captions = loaded[language][1]["caption"]
        if language in translations:
            captions = translate(image_ids, translations[language])
        elif translations:
            logger.info("%s: no translations in %s, its own captions are used", language, args.translated_captions)
        template = args.text_template
        if args.adapters:  # the language's own PET adapter and hard prompt
            template = use_language(encoder, args.adapters, language, language in translations)
        text_embeds = encoder.texts([template.format(c) for c in captions], desc=f"{language} texts")
        gallery = list(dict.fromkeys(image_ids))
        per_language[language] = retrieval_metrics(text_embeds, keys, image_embeds[[position[i] for i in gallery]],
                                                   [image_key[i] for i in gallery])
        sizes[language] = {"texts": len(captions), "images": len(gallery)}
        logger.info("%s: r1_mean %.2f, mean_recall %.2f", language, per_language[language]["r1_mean"],
                    per_language[language]["mean_recall"])
    setup = {"text_template": args.text_template, "adapters": args.adapters, "image_features": args.image_features,
             "translated_captions": args.translated_captions,
             "translated_languages": [language for language in languages if language in translations]}
    return splits, setup, sizes, per_language


def embedding_dim(encoder):
    """Width of the model's joint embedding space (what precomputed image features must have), or None."""
    return getattr(encoder.model.config, "projection_dim", None)


def evaluate_classification(args, encoder):
    folder = args.data_dir if args.dataset == "imagefolder" else args.dataset
    folder = check_local_path(folder, "dataset")
    with quiet_progress():
        split, ds = pick_split(datasets.load_dataset("imagefolder", data_dir=folder, split=args.split), args.split)
    ds = ds.cast_column("image", datasets.Image(decode=False))
    folders = ds.features["label"].names
    class_names = read_json(args.class_names) if args.class_names else {"en": {f: f for f in folders}}
    prompts = read_json(args.prompts) if args.prompts else None
    languages = args.languages or list(class_names)
    for language in languages:
        missing = [f for f in folders if f not in class_names.get(language, {})]
        if missing or (prompts is not None and language not in prompts):
            raise ValueError(f"{language}: no prompts, or no class name for folders {missing[:5]}")

    entries = ds["image"]
    if args.image_features:  # image ids: the paths relative to the folder, e.g. n01440764/ILSVRC2012_val_00000293.JPEG
        image_ids = [Path(entry["path"]).resolve().relative_to(Path(folder).resolve()).as_posix() for entry in entries]
        image_embeds = image_features(args.image_features, image_ids, embedding_dim(encoder))
    else:
        identity = {"dataset": "imagefolder", "split": split, "image_ids": [entry["path"] for entry in entries]}
        image_embeds = encoder.images(entries, identity)
    labels = list(ds["label"])
    per_language, sizes = {}, {}
    for language in languages:
        templates = prompts[language] if prompts else [args.text_template]
        texts = [template.format(class_names[language][f]) for f in folders for template in templates]
        class_embeds = encoder.texts(texts, desc=f"{language} prompts").view(len(folders), len(templates), -1)
        per_language[language] = classification_metrics(image_embeds, labels, F.normalize(class_embeds.mean(1), dim=-1))
        sizes[language] = {"images": len(labels), "classes": len(folders), "templates": len(templates)}
    setup = {"class_names": args.class_names, "prompts": args.prompts or args.text_template,
             "image_features": args.image_features}
    return {language: split for language in languages}, setup, sizes, per_language


def build_parser():
    parser = argparse.ArgumentParser(prog="xclip-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="Hub id or local dir: one of our families, a published M-CLIP dir, or a CLIP/AltCLIP model")
    parser.add_argument("--task", choices=("retrieval", "classification"), default="retrieval")
    parser.add_argument("--dataset", required=True,
                        help=f"retrieval: {', '.join(BUILDERS)}, or a local Parquet dir / Hub dataset in our "
                             "schema; classification: imagefolder (with --data_dir) or a dir of class subfolders")
    parser.add_argument("--data_dir", help="where the dataset's files are")
    parser.add_argument("--dataset_options", nargs="+", default=[], metavar="KEY=VALUE", type=dataset_option,
                        help="options of our dataset builders, e.g. images_dir=/data/coco num_images=200 "
                             "(values are read as JSON where they parse, else as strings)")
    parser.add_argument("--languages", nargs="+", help="default: all the dataset has (retrieval), all in --class_names")
    parser.add_argument("--split", help="default: the only split, else test")
    parser.add_argument("--image_features", help="Parquet of precomputed image_id, image_embeds (classification: "
                                                  "image_id is the image's path relative to the dataset folder)")
    parser.add_argument("--text_template", help='e.g. "a photo of {}" or "query: {}"; default: the template saved '
                                                 "with the model's processor, else none")
    parser.add_argument("--translated_captions", help="retrieval, translate-test: captions translated into English")
    parser.add_argument("--adapters", help="retrieval: a run_pet output dir; each language uses its own adapter")
    parser.add_argument("--class_names", help="classification: JSON {language: {class_folder: name}}")
    parser.add_argument("--prompts", help="classification: JSON {language: [templates]}")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache_dir", help="reuse embeddings across runs (safetensors files keyed by model and inputs)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace existing results files in --output_dir")
    return parser


def main(argv=None):
    """The command line; a user error ends in one line, `error: ...`, exit status 2 (`--debug`: the traceback)."""
    return run_cli(_main, argv)


def _main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.dataset_options = dict(args.dataset_options)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.text_template is not None and "{}" not in args.text_template:
        parser.error("--text_template needs a {} where the text goes")
    retrieval_only = [o for o in ("translated_captions",) if getattr(args, o)]
    classification_only = [o for o in ("class_names", "prompts") if getattr(args, o)]
    if wrong := (classification_only if args.task == "retrieval" else retrieval_only):
        parser.error(f"--{', --'.join(wrong)} do not apply to --task {args.task}")
    existing = existing_results(args.output_dir)
    if existing and not args.overwrite:
        parser.error(f"{', '.join(map(str, existing))} exist: pass --overwrite to replace them")

    encoder = Encoder(args.model, device=args.device, batch_size=args.batch_size, cache_dir=args.cache_dir)
    args.text_template = args.text_template or encoder.text_template
    evaluate = evaluate_retrieval if args.task == "retrieval" else evaluate_classification
    splits, setup, sizes, per_language = evaluate(args, encoder)
    common_split = set(splits.values())
    results = {"task": args.task, "model": args.model, "dataset": args.dataset,
               "split": common_split.pop() if len(common_split) == 1 else None, "splits": splits,
               "languages": list(per_language), "setup": setup, "sizes": sizes,
               "per_language": per_language, "summary": summarize_columns(per_language)}
    write_results(args.output_dir, results)


if __name__ == "__main__":
    main()
