from pathlib import Path

import pytest

from datasets_builders import available_languages, load

FIXTURE = Path(__file__).parent / "fixtures" / "multi30k"
SPLITS = ["train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr"]


def multi30k(tmp_path, language, **options):
    return load("multi30k", language, data_dir=str(FIXTURE), cache_dir=str(tmp_path), **options)


def test_task1_splits_as_the_source_names_them(tmp_path):
    assert available_languages("multi30k", str(FIXTURE)) == ["en", "de", "fr", "cs"]
    for language in ("en", "de", "fr"):
        dd = multi30k(tmp_path, language)
        assert list(dd) == SPLITS and all(len(ds) == 3 for ds in dd.values())
    assert list(multi30k(tmp_path, "cs")) == ["train", "val", "test_2016_flickr", "test_2018_flickr"]


def test_task1_rows_align_with_the_image_list(tmp_path):
    de = multi30k(tmp_path, "de")
    assert de["train"][1] == {"image_id": "1000002.jpg", "image_path": None, "language": "de", "split": "train",
                              "caption": "Zwei Männer spielen Schach (train 1).", "coco_caption_id": None}
    assert multi30k(tmp_path, "cs", split="test_2018_flickr")[2]["caption"] == "Dívka s drakem (test_2018_flickr 2)."


def test_mscoco_image_names_and_caption_ids_are_split(tmp_path):
    ds = multi30k(tmp_path, "fr", split="test_2017_mscoco")
    assert ds["image_id"] == ["COCO_train2014_000000000011.jpg", "COCO_val2014_000000000022.jpg",
                              "COCO_train2014_000000000033.jpg"]
    assert ds["coco_caption_id"] == [111, 222, 333]


def test_task2_five_captions_per_image(tmp_path):
    assert available_languages("multi30k", str(FIXTURE), variant="task2") == ["en", "de"]
    ds = multi30k(tmp_path, "de", variant="task2", split="test_2016")
    assert len(ds) == 15
    assert ds["caption_index"] == [1, 2, 3, 4, 5] * 3
    assert ds["image_id"] == [image for image in ("3000001.jpg", "3000002.jpg", "3000003.jpg") for _ in range(5)]
    assert ds[7]["caption"] == "de caption 3 of image 1"
    with pytest.raises(ValueError, match="valid languages: en, de"):
        multi30k(tmp_path, "fr", variant="task2")


def test_parallel_pairs_english_with_the_same_image(tmp_path):
    assert available_languages("multi30k", variant="parallel") == ["de", "fr", "cs"]
    fr = multi30k(tmp_path, "fr", variant="parallel")
    en = multi30k(tmp_path, "en")
    for split in SPLITS:
        assert fr[split]["image_id"] == en[split]["image_id"]
        assert fr[split]["source"] == en[split]["caption"]
    assert fr["val"][0]["caption"] == "Un chien dans la neige (val 0)."
    assert fr["val"][0]["source"] == "A dog in the snow (val 0)."
    with pytest.raises(ValueError, match="valid languages: de, fr, cs"):
        multi30k(tmp_path, "en", variant="parallel")
