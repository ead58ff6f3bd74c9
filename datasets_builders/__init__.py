"""Dataset builders for multilingual image-text retrieval: XTD, Multi30K, COCO-CN and an embedded
synthetic dataset, all with one row schema (see `common.CaptionBuilder`)."""

from __future__ import annotations

import os
from typing import Optional, Union

import datasets

from .coco_cn import COCOCN
from .common import CaptionBuilder, quiet_progress
from .multi30k import Multi30K
from .synthetic import Synthetic, generate_synthetic, synthetic_caption
from .xtd import XTD

BUILDERS: dict[str, type[CaptionBuilder]] = {"xtd": XTD, "multi30k": Multi30K, "coco_cn": COCOCN, "synthetic": Synthetic}


def builder_class(name: str) -> type[CaptionBuilder]:
    if name not in BUILDERS:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets: {', '.join(BUILDERS)}")
    return BUILDERS[name]


def check_dirs(**dirs: Optional[str]) -> None:
    """A given data_dir or images_dir that is not a directory raises an error naming it (before any file in it is
    looked for)."""
    for option, path in dirs.items():
        if path is not None and not os.path.isdir(path):
            raise FileNotFoundError(f"{option} {os.path.abspath(path)} not found (no such directory)")


def make_builder(name: str, language: str, data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                 **options) -> CaptionBuilder:
    """The builder of dataset `name` for `language`; options left as None take their defaults."""
    options = {key: value for key, value in options.items() if value is not None}
    check_dirs(data_dir=data_dir, images_dir=options.get("images_dir"))
    return builder_class(name)(config_name=language, data_dir=data_dir, cache_dir=cache_dir, **options)


def load(name: str, language: str, split: Optional[str] = None, data_dir: Optional[str] = None,
         cache_dir: Optional[str] = None, **options) -> Union[datasets.Dataset, datasets.DatasetDict]:
    """Prepare dataset `name` in `language` (into `cache_dir`) and return one split, or all of them.

    options are config options: images_dir, image_features, on_bad_image, variant, seed, num_images, ...
    """
    builder = make_builder(name, language, data_dir, cache_dir, **options)
    with quiet_progress():
        builder.download_and_prepare()
    return builder.as_dataset(split=split)


def available_languages(name: str, data_dir: Optional[str] = None, **options) -> list[str]:
    """Languages of dataset `name` (for options["variant"]); with data_dir, those whose files are all there."""
    cls = builder_class(name)
    check_dirs(data_dir=data_dir)
    variant = options.get("variant")
    return [
        language for language in cls.languages(variant)
        if data_dir is None or all(os.path.isfile(os.path.join(data_dir, p)) for p in cls.source_files(language, variant))
    ]


__all__ = ["BUILDERS", "load", "available_languages", "make_builder", "generate_synthetic", "synthetic_caption"]
