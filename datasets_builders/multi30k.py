"""Multi30K: Flickr30K images with English captions and their German, French and Czech translations,
read from the layout of https://github.com/multi30k/dataset (`data/task1/raw/{split}.{lang}.gz`, line i
describing line i of `data/task1/image_splits/{split}.txt`)."""

from __future__ import annotations

import datasets

from .common import SourceBuilder, SourceConfig, check_counts, read_lines

LANGUAGES = ("en", "de", "fr", "cs")
TASK1_SPLITS = {  # split: the languages the release has it in
    "train": LANGUAGES,
    "val": LANGUAGES,
    "test_2016_flickr": LANGUAGES,
    "test_2017_flickr": ("en", "de", "fr"),
    "test_2017_mscoco": ("en", "de", "fr"),
    "test_2018_flickr": LANGUAGES,
}
TASK2_LANGUAGES = ("en", "de")
TASK2_CAPTIONS = range(1, 6)  # five independent captions per image
TASK2_IMAGE_LIST = "data/task2/image_splits/test_2016_images.txt"


def task1_splits(language: str) -> list[str]:
    return [split for split, languages in TASK1_SPLITS.items() if language in languages]


def task1_files(split: str, language: str) -> tuple[str, str]:
    return f"data/task1/image_splits/{split}.txt", f"data/task1/raw/{split}.{language}.gz"


def task2_file(index: int, language: str) -> str:
    return f"data/task2/raw/test_2016.{index}.{language}.gz"


class Multi30K(SourceBuilder):
    """Variants:
    "task1" (default): one caption per image (English, or its translation); splits as the source
        names them: train, val, test_2016_flickr, test_2017_flickr, test_2017_mscoco, test_2018_flickr
        (Czech has no 2017 tests). test_2017_mscoco lists COCO images as `NAME.jpg#ID`: image_id is
        NAME.jpg and ID goes to `coco_caption_id` (None in the other splits).
    "task2": test_2016 with five independent captions per image (en, de), `caption_index` 1-5.
    "parallel": the task1 rows of de/fr/cs with `source`, the English caption of the same image,
        for teacher learning and alignment losses (`caption` is the target-language side).
    """

    BUILDER_CONFIGS = [SourceConfig(name=language) for language in LANGUAGES]
    VARIANTS = ("task1", "task2", "parallel")
    PRETTY_NAME = "Multi30K"
    HOMEPAGE = "https://github.com/multi30k/dataset"
    BASE_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/"
    LICENSE = "other"  # non-commercial research and education; images under the Flickr terms of use
    LICENSE_LINK = HOMEPAGE + "#use-of-the-data"
    CITATION = """@InProceedings{W16-3210,
  author = {Elliott, Desmond and Frank, Stella and Sima'an, Khalil and Specia, Lucia},
  title = {Multi30K: Multilingual English-German Image Descriptions},
  booktitle = {Proceedings of the 5th Workshop on Vision and Language},
  year = {2016},
  pages = {70--74},
  doi = {10.18653/v1/W16-3210}
}
@InProceedings{elliott-EtAl:2017:WMT,
  author = {Elliott, Desmond and Frank, Stella and Barrault, Lo\\"{i}c and Bougares, Fethi and Specia, Lucia},
  title = {Findings of the Second Shared Task on Multimodal Machine Translation and Multilingual Image Description},
  booktitle = {Proceedings of the Second Conference on Machine Translation, Volume 2: Shared Task Papers},
  year = {2017},
  pages = {215--233}
}
@inproceedings{barrault2018findings,
  title = {Findings of the Third Shared Task on Multimodal Machine Translation},
  author = {Barrault, Lo{\\"\\i}c and Bougares, Fethi and Specia, Lucia and Lala, Chiraag and Elliott, Desmond and Frank, Stella},
  booktitle = {Proceedings of the Third Conference on Machine Translation: Shared Task Papers},
  pages = {304--323},
  year = {2018}
}"""

    @classmethod
    def _languages(cls, variant: str) -> list[str]:
        return {"task1": list(LANGUAGES), "task2": list(TASK2_LANGUAGES), "parallel": list(LANGUAGES[1:])}[variant]

    @classmethod
    def source_files(cls, language: str, variant=None) -> list[str]:
        variant = cls.variant_name(variant)
        if variant == "task2":
            return [TASK2_IMAGE_LIST] + [task2_file(index, language) for index in TASK2_CAPTIONS]
        sides = [language] + (["en"] if variant == "parallel" else [])
        return sorted({path for split in task1_splits(language) for side in sides for path in task1_files(split, side)})

    def _extra_features(self) -> dict:
        if self.variant == "task2":
            return {"caption_index": datasets.Value("int32")}
        features = {"coco_caption_id": datasets.Value("int64")}
        if self.variant == "parallel":
            features["source"] = datasets.Value("string")
        return features

    def _read_splits(self, paths: dict[str, str]) -> dict[str, list[dict]]:
        language = self.config.name
        if self.variant == "task2":
            return {"test_2016": self._task2_rows(paths, language)}
        splits = {split: self._task1_rows(paths, split, language) for split in task1_splits(language)}
        if self.variant == "parallel":
            for split, rows in splits.items():
                for row, english in zip(rows, self._task1_rows(paths, split, "en")):
                    row["source"] = english["caption"]
        return splits

    @staticmethod
    def _task1_rows(paths: dict[str, str], split: str, language: str) -> list[dict]:
        image_list, caption_file = (paths[p] for p in task1_files(split, language))
        images = read_lines(image_list)
        captions = read_lines(caption_file)
        check_counts(caption_file, captions, len(images), image_list)
        rows = []
        for image, caption in zip(images, captions):
            image_id, _, coco_caption_id = image.partition("#")
            rows.append({"image_id": image_id, "caption": caption, "language": language, "split": split,
                         "coco_caption_id": int(coco_caption_id) if coco_caption_id else None})
        return rows

    @staticmethod
    def _task2_rows(paths: dict[str, str], language: str) -> list[dict]:
        images = read_lines(paths[TASK2_IMAGE_LIST])
        captions = {}
        for index in TASK2_CAPTIONS:
            path = paths[task2_file(index, language)]
            captions[index] = read_lines(path)
            check_counts(path, captions[index], len(images), paths[TASK2_IMAGE_LIST])
        return [{"image_id": image_id, "caption": captions[index][i], "language": language, "split": "test_2016",
                 "caption_index": index}
                for i, image_id in enumerate(images) for index in TASK2_CAPTIONS]
