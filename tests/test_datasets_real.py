"""The real releases in ../shared/data (the conftest's `shared_dir`; skipped without it).
Only the few strings asserted here are copied from them."""

import datasets
import pytest

from datasets_builders import available_languages, load
from datasets_builders.export import export

pytestmark = pytest.mark.slow

MULTI30K_COUNTS = {"train": 29000, "val": 1014, "test_2016_flickr": 1000, "test_2017_flickr": 1000,
                   "test_2017_mscoco": 461, "test_2018_flickr": 1071}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def data(shared_dir):
    return shared_dir / "data"


def test_multi30k_every_split_and_language(data, cache):
    data_dir = str(data / "multi30k")
    assert available_languages("multi30k", data_dir) == ["en", "de", "fr", "cs"]
    first_val = {}
    for language in ("en", "de", "fr", "cs"):
        dd = load("multi30k", language, data_dir=data_dir, cache_dir=cache)
        expected = {s: n for s, n in MULTI30K_COUNTS.items() if language != "cs" or not s.startswith("test_2017")}
        assert {split: len(ds) for split, ds in dd.items()} == expected
        assert not any("\n" in c or "\r" in c for ds in dd.values() for c in ds["caption"])
        assert dd["val"][0]["image_id"] == "1018148011.jpg"
        first_val[language] = dd["val"][0]["caption"]
    assert first_val == {"en": "A group of men are loading cotton onto a truck",
                         "de": "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen",
                         "fr": "Un groupe d'hommes chargent du coton dans un camion",
                         "cs": "Skupina mužů nakládá bavlnu na náklaďák."}
    cs_2018 = load("multi30k", "cs", split="test_2018_flickr", data_dir=data_dir, cache_dir=cache)
    assert cs_2018[0]["caption"].endswith("se usmívá. ")  # trailing spaces kept as published
    mscoco = load("multi30k", "en", split="test_2017_mscoco", data_dir=data_dir, cache_dir=cache)
    assert (mscoco[0]["image_id"], mscoco[0]["coco_caption_id"]) == ("COCO_train2014_000000117071.jpg", 367178)
    assert mscoco[0]["caption"] == "I cannot see where the green arrow is pointing."


def test_multi30k_task2_and_parallel(data, cache):
    data_dir = str(data / "multi30k")
    task2 = load("multi30k", "de", split="test_2016", variant="task2", data_dir=data_dir, cache_dir=cache)
    assert len(task2) == 5000 and task2[2]["image_id"] == "1007129816.jpg" and task2[2]["caption_index"] == 3
    assert task2[2]["caption"] == "Ein Mann mit Brille trägt einen auffälligen, orangefarbenen Hut."
    assert len(load("multi30k", "en", split="test_2016", variant="task2", data_dir=data_dir, cache_dir=cache)) == 5000
    parallel = load("multi30k", "de", split="val", variant="parallel", data_dir=data_dir, cache_dir=cache)
    assert len(parallel) == 1014
    assert parallel[0]["source"] == "A group of men are loading cotton onto a truck"
    assert parallel[0]["caption"] == "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"


def test_xtd_sample_in_the_release_layout(data, cache):
    data_dir = str(data / "xtd-sample")
    languages = available_languages("xtd", data_dir)
    assert languages == ["en", "es", "it", "ko", "pl", "ru", "tr", "zh", "de", "fr", "ja"]
    for language in languages:
        ds = load("xtd", language, split="test", data_dir=data_dir, cache_dir=cache)
        assert len(ds) == 100 and not any("\r" in c or "\n" in c for c in ds["caption"])
        assert (ds[0]["image_id"], ds[99]["image_id"]) == ("COCO_train2014_000000061844.jpg", "COCO_train2014_000000062481.jpg")
    en = load("xtd", "en", split="test", data_dir=data_dir, cache_dir=cache)
    assert en[1]["caption"] == "a cat with its paws on a computer mouse at a desk"
    zh = load("xtd", "zh", split="test", data_dir=data_dir, cache_dir=cache)  # CRLF, no final newline
    assert zh[99]["caption"] == "一只可爱的泰迪小熊坐在石头上，背后是一片灌木丛"
    assert load("xtd", "jp", split="test", data_dir=data_dir, cache_dir=cache)[1]["caption"] == "マウスの上に猫の手が乗っている"
    fewshot = load("xtd", "tr", variant="fewshot", data_dir=data_dir, cache_dir=cache)
    assert {split: len(ds) for split, ds in fewshot.items()} == {"train": 5, "validation": 5, "test": 90}
    assert load("xtd", "ko", split="train", variant="fewshot", data_dir=data_dir, cache_dir=cache)["image_id"] == fewshot["train"]["image_id"]


def test_coco_cn_test_release(data, cache):
    data_dir = str(data / "coco-cn")
    everything = load("coco_cn", "zh", split="test", data_dir=data_dir, cache_dir=cache)
    assert len(everything) == 6033 and len(set(everything["image_id"])) == 1000
    human = load("coco_cn", "zh", split="test", variant="cn", data_dir=data_dir, cache_dir=cache)
    assert len(human) == 1033 and set(human["caption_source"]) == {"cn"}
    assert len(load("coco_cn", "zh", split="test", variant="zhm", data_dir=data_dir, cache_dir=cache)) == 5000
    assert human[1]["caption"] == "一 辆 长途汽车 停 在 路边"
    joined = load("coco_cn", "zh", split="test", variant="cn", segmented=False, data_dir=data_dir, cache_dir=cache)
    assert joined[1]["caption"] == "一辆长途汽车停在路边" and joined["image_id"] == human["image_id"]


@pytest.mark.parametrize("name, folder", [("xtd", "xtd-sample"), ("coco_cn", "coco-cn")])
def test_export_round_trip(tmp_path, data, cache, name, folder):
    data_dir = str(data / folder)
    out = export(name, str(tmp_path / "out"), data_dir=data_dir, cache_dir=cache)
    for language in available_languages(name, data_dir):
        exported = datasets.load_dataset(out, language, cache_dir=cache)
        built = load(name, language, data_dir=data_dir, cache_dir=cache)
        assert {s: ds.to_list() for s, ds in exported.items()} == {s: ds.to_list() for s, ds in built.items()}
