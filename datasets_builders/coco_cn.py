"""COCO-CN test: 1000 MSCOCO 2014 images with Chinese captions, read from
`merged_captions_coco-cn_test.json` (`images` + `annotations`; annotation `source` "cn" is written
by people in Chinese, "zhm" translated by people from the English COCO captions)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import datasets

from .common import SourceBuilder, SourceConfig

ANNOTATIONS = "merged_captions_coco-cn_test.json"
CJK = "\u2e80-\u2fff\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
SPACE_BETWEEN_CJK = re.compile(f"(?<=[{CJK}])\\s+(?=[{CJK}])")


def join_cjk(text: str) -> str:
    """Remove the spaces between two CJK characters (the word segmentation of the release)."""
    return SPACE_BETWEEN_CJK.sub("", text)


@dataclass
class COCOCNConfig(SourceConfig):
    """segmented: True keeps the captions word-segmented with spaces as released; False joins them (`join_cjk`)."""

    segmented: bool = True


class COCOCN(SourceBuilder):
    """Variants select the captions by their `source`: "all" (default), "cn" (human-written, one per
    image, two for 33 images) or "zhm" (human-translated, five per image). Rows keep the order of the
    annotations, with `caption_source` and `caption_index` (the annotation's `id`)."""

    BUILDER_CONFIG_CLASS = COCOCNConfig
    BUILDER_CONFIGS = [COCOCNConfig(name="zh")]
    VARIANTS = ("all", "cn", "zhm")
    PRETTY_NAME = "COCO-CN"
    HOMEPAGE = "https://github.com/li-xirong/coco-cn"
    # The public copy of the test annotations, in the COCO-CN results viewer (MIT licence).
    BASE_URL = "https://raw.githubusercontent.com/evanmiltenburg/COCO-CN-Results-Viewer/master/Data/COCO/"
    LICENSE = "mit"
    LICENSE_LINK = "https://github.com/evanmiltenburg/COCO-CN-Results-Viewer"
    CITATION = """@article{li2019cococn,
  author = {Xirong Li and Chaoxi Xu and Xiaoxu Wang and Weiyu Lan and Zhengxiong Jia and Gang Yang and Jieping Xu},
  title = {{COCO-CN} for Cross-Lingual Image Tagging, Captioning, and Retrieval},
  journal = {IEEE Transactions on Multimedia},
  volume = {21},
  number = {9},
  pages = {2347--2360},
  year = {2019}
}"""

    @classmethod
    def _languages(cls, variant: str) -> list[str]:
        return ["zh"]

    @classmethod
    def source_files(cls, language: str, variant=None) -> list[str]:
        return [ANNOTATIONS]

    def _extra_features(self) -> dict:
        return {"caption_source": datasets.Value("string"), "caption_index": datasets.Value("int32")}

    def _description(self) -> str:
        segmentation = "word-segmented as released" if self.config.segmented else "spaces between CJK characters removed"
        return f"{super()._description()}\n\nCaptions: {self.variant}, {segmentation}."

    def _read_splits(self, paths: dict[str, str]) -> dict[str, list[dict]]:
        path = paths[ANNOTATIONS]
        try:
            with open(path, encoding="utf-8") as f:
                release = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not UTF-8 JSON: {error}") from None
        file_names = {image["id"]: image["file_name"] for image in release["images"]}
        rows = []
        for annotation in release["annotations"]:
            if self.variant not in ("all", annotation["source"]):
                continue
            if annotation["image_id"] not in file_names:
                raise ValueError(f"{path}: annotation {annotation} refers to image id {annotation['image_id']}, not in images")
            caption = annotation["caption"] if self.config.segmented else join_cjk(annotation["caption"])
            rows.append({"image_id": file_names[annotation["image_id"]], "caption": caption, "language": "zh",
                         "split": "test", "caption_source": annotation["source"], "caption_index": annotation["id"]})
        return {"test": rows}
