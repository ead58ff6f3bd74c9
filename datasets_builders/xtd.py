"""XTD: 1000 MSCOCO 2014 images with one caption each in 11 languages, read from the layout of
https://github.com/adobe-research/Cross-lingual-Test-Dataset-XTD10 (caption line i belongs to line i
of XTD10/test_image_names.txt)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .common import SourceBuilder, SourceConfig, check_counts, held_out_size, read_lines

IMAGE_LIST = "XTD10/test_image_names.txt"
CAPTION_FILES = {
    **{language: f"XTD10/test_1kcaptions_{language}.txt" for language in ("en", "es", "it", "ko", "pl", "ru", "tr", "zh")},
    "de": "MIC/test_1kcaptions_de.txt",
    "fr": "MIC/test_1kcaptions_fr.txt",
    "ja": "STAIR/test_1kcaptions_jp.txt",  # the release files Japanese as "jp"
}
FEWSHOT_FRACTION = 0.05  # of the rows, for train and for validation each: 50/50/900 of 1000


def fewshot_splits(num_rows: int, seed: int) -> dict[str, list[int]]:
    """Row indices of the few-shot splits (seed paper 000: train/dev/test = 50/50/900 of 1000):
    5% train, 5% validation (at least one each), the rest test, drawn by a seeded permutation that
    depends only on the number of rows, so every language gets the same images. Each split keeps
    the source order."""
    held = held_out_size(num_rows, FEWSHOT_FRACTION, "the number of rows of a few-shot split")
    order = list(range(num_rows))
    random.Random(seed).shuffle(order)
    return {"train": sorted(order[:held]), "validation": sorted(order[held:2 * held]), "test": sorted(order[2 * held:])}


@dataclass
class XTDConfig(SourceConfig):
    """seed: the permutation of the "fewshot" variant."""

    seed: int = 42


class XTD(SourceBuilder):
    """Variants: "full" (default), every row in one `test` split; "fewshot", the rows split
    train/validation/test by `fewshot_splits` (50/50/900 for the 1000 rows of the release)."""

    BUILDER_CONFIG_CLASS = XTDConfig
    BUILDER_CONFIGS = [XTDConfig(name=language) for language in CAPTION_FILES]
    VARIANTS = ("full", "fewshot")
    LANGUAGE_ALIASES = {"jp": "ja"}
    PRETTY_NAME = "XTD"
    HOMEPAGE = "https://github.com/adobe-research/Cross-lingual-Test-Dataset-XTD10"
    BASE_URL = "https://raw.githubusercontent.com/adobe-research/Cross-lingual-Test-Dataset-XTD10/main/"
    LICENSE = "other"  # the Adobe Research License: noncommercial research only
    LICENSE_LINK = HOMEPAGE + "/blob/main/LICENSE.md"
    CITATION = """@misc{aggarwal2020zeroshot,
  title={Towards Zero-shot Cross-lingual Image Retrieval},
  author={Pranav Aggarwal and Ajinkya Kale},
  year={2020},
  eprint={2012.05107},
  archivePrefix={arXiv},
  primaryClass={cs.CL}
}"""

    @classmethod
    def _languages(cls, variant: str) -> list[str]:
        return list(CAPTION_FILES)

    @classmethod
    def source_files(cls, language: str, variant=None) -> list[str]:
        return [IMAGE_LIST, CAPTION_FILES[language]]

    def _description(self) -> str:
        description = super()._description()
        if self.variant == "fewshot":
            description += (f"\n\nFew-shot split: seed={self.config.seed}; train and validation "
                            f"{FEWSHOT_FRACTION:.0%} of the rows each (at least one), test the rest.")
        return description

    def _read_splits(self, paths: dict[str, str]) -> dict[str, list[dict]]:
        caption_file = CAPTION_FILES[self.config.name]
        image_ids = read_lines(paths[IMAGE_LIST])
        captions = read_lines(paths[caption_file])
        check_counts(paths[caption_file], captions, len(image_ids), paths[IMAGE_LIST])
        if self.variant == "full":
            splits = {"test": range(len(image_ids))}
        else:
            splits = fewshot_splits(len(image_ids), self.config.seed)
        return {
            split: [{"image_id": image_ids[i], "caption": captions[i], "language": self.config.name, "split": split}
                    for i in indices]
            for split, indices in splits.items()
        }
