"""The one loader of datasets for evaluation and training: any dataset of ours (a builder of
``datasets_builders``, or a local Parquet dir / Hub dataset in our schema), one language at a time, with its
images left undecoded; precomputed image features; translated captions; ``KEY=VALUE`` builder options."""
import argparse
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F

from datasets_builders import BUILDERS, available_languages, load
from datasets_builders.common import quiet_progress, read_image_features
from training_scripts.cli import check_local_path

logger = logging.getLogger(__name__)

TRANSLATION_COLUMNS = ["language", "image_id", "caption_index", "caption_en"]


def dataset_languages(dataset, data_dir=None, options=None):
    if dataset in BUILDERS:
        languages = list(available_languages(dataset, data_dir=data_dir, **(options or {})))
        if not languages:
            raise FileNotFoundError(f"no language of {dataset} has all its files under data_dir {data_dir}")
        return languages
    return datasets.get_dataset_config_names(check_local_path(dataset, "dataset"))


def pick_split(loaded, split):
    """(split name, Dataset): the one asked for, else the only one, else "test"."""
    if isinstance(loaded, datasets.Dataset):
        return split, loaded
    if split is None:
        split = next(iter(loaded)) if len(loaded) == 1 else "test"
    if split not in loaded:
        raise ValueError(f"no split {split!r} among {list(loaded)}: choose one with --split")
    return split, loaded[split]


def load_language(dataset, language, split=None, data_dir=None, options=None):
    """(split name, Dataset) of one language in our schema, images left undecoded; ``options`` go to the builder."""
    if dataset in BUILDERS:
        loaded = load(dataset, language, split=split, data_dir=data_dir, **(options or {}))
    else:
        with quiet_progress():
            loaded = datasets.load_dataset(check_local_path(dataset, "dataset"), language, split=split)
    split, ds = pick_split(loaded, split)
    empty = [row for row, caption in enumerate(ds["caption"]) if not (caption or "").strip()]
    if empty:
        raise ValueError(f"{dataset} {language}/{split}: {len(empty)} empty caption(s), the first in row {empty[0]} "
                         f"(image_id {ds[empty[0]]['image_id']!r})")
    if "image" in ds.column_names:
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return split, ds


class DatasetImages(Sequence):
    """Images read lazily from (dataset, row) pairs: the ``image`` column, else ``images_dir / image_path``."""

    def __init__(self, rows, images_dir=None):
        self.rows = rows
        self.images_dir = Path(images_dir or "")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        ds, row = self.rows[index]
        record = ds[row]
        if record.get("image"):
            return record["image"]
        if record.get("image_path"):
            return self.images_dir / record["image_path"]
        raise ValueError(f"image {record['image_id']!r} has no pixels: pass precomputed --image_features")


def read_json(path):
    """A JSON file; a missing file or bad JSON raises an error that names the file (and line)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg})") from None


def read_table(path):
    path = Path(path)
    if path.suffix not in (".parquet", ".jsonl", ".tsv"):
        raise ValueError(f"{path}: expected a .parquet, .jsonl or .tsv file")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg})") from None
        return pd.DataFrame(rows)
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (ValueError, pa.ArrowException) as error:  # pandas and pyarrow do not name the file
        raise ValueError(f"{path}: not a valid {path.suffix} file ({error})") from None


def image_features(path, image_ids, dim=None):
    """(len(image_ids), d) L2-normalised image embeddings from a Parquet of image_id, image_embeds; with ``dim``
    (the model's embedding width), embeddings of another width raise an error that names the file."""
    lookup = {str(image_id): embeds for image_id, embeds in read_image_features(path).items()}
    missing = [image_id for image_id in image_ids if image_id not in lookup]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} image ids, e.g. {missing[:3]}")
    embeds = torch.tensor([lookup[image_id] for image_id in image_ids], dtype=torch.float32)
    if dim is not None and embeds.shape[1] != dim:
        raise ValueError(f"{path}: image_embeds have {embeds.shape[1]} dimensions but the model's embeddings have "
                         f"{dim}: encode the images with the image tower the model was trained with")
    return F.normalize(embeds, dim=-1)


def read_translations(path):
    """{language: {(image_id, caption_index): caption_en}} from a --translated_captions file."""
    table = read_table(path)
    missing = set(TRANSLATION_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}")
    translations = {}
    for language, image_id, index, caption in table[TRANSLATION_COLUMNS].itertuples(index=False):
        translations.setdefault(str(language), {})[str(image_id), int(index)] = caption
    return translations


def translate(image_ids, table):
    """The English captions of rows with these image ids, looked up by (image_id, caption_index)."""
    seen = Counter()
    keys = []
    for image_id in image_ids:
        keys.append((image_id, seen[image_id]))
        seen[image_id] += 1
    missing = [key for key in keys if key not in table]
    if missing:
        raise ValueError(f"no translation for {len(missing)} captions, e.g. (image_id, caption_index) {missing[0]}")
    return [table[key] for key in keys]


def dataset_option(text):
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
