import time
from collections import defaultdict

import datasets
import numpy as np
import pytest

from datasets_builders import available_languages, generate_synthetic, load, synthetic_caption
from datasets_builders.synthetic import COLOURS, SCENES, SYNTHETIC_LANGUAGES, TEMPLATES, Scene


def undecoded(ds):
    return ds.cast_column("image", datasets.Image(decode=False))


def test_test_split_rows(tmp_path):
    ds = load("synthetic", "de", split="test", cache_dir=str(tmp_path), num_images=40)
    assert len(ds) == 4
    assert ds.column_names == ["image_id", "image_path", "image", "caption", "language", "split", "concept"]
    row = ds[0]
    assert row["image_id"] == "synthetic_000036.png"
    assert (row["language"], row["split"], row["image_path"]) == ("de", "test", None)
    assert row["image"].size == (64, 64)
    scene = Scene(*row["concept"].split("-"))
    assert row["caption"] in {synthetic_caption(scene, "de", t) for t in range(TEMPLATES)}


def test_splits_are_80_10_10(tmp_path):
    dd = load("synthetic", "en", cache_dir=str(tmp_path), num_images=1000)
    assert {split: len(ds) for split, ds in dd.items()} == {"train": 800, "validation": 100, "test": 100}
    assert len(set(dd["train"]["image_id"]) | set(dd["test"]["image_id"])) == 900


def test_same_seed_same_bytes_and_another_seed_differs(tmp_path):
    def build(cache, seed):
        return undecoded(load("synthetic", "ru", split="train", cache_dir=str(tmp_path / cache), num_images=20, seed=seed))

    first, again, other = build("a", 3), build("b", 3), build("c", 4)
    assert first.to_list() == again.to_list()
    assert first["image"] != other["image"]
    assert first["caption"] != other["caption"]


def test_options_get_their_own_cache(tmp_path):
    cache = str(tmp_path)
    assert len(load("synthetic", "fr", split="train", cache_dir=cache, num_images=20)) == 16
    assert len(load("synthetic", "fr", split="train", cache_dir=cache, num_images=30)) == 24
    small = load("synthetic", "fr", split="train", cache_dir=cache, num_images=20, image_size=32)
    assert small[0]["image"].size == (32, 32)


def test_every_language_has_the_same_images(tmp_path):
    assert available_languages("synthetic") == list(SYNTHETIC_LANGUAGES)
    reference = undecoded(load("synthetic", "en", split="validation", cache_dir=str(tmp_path), num_images=30))
    for language in SYNTHETIC_LANGUAGES[1:]:
        ds = undecoded(load("synthetic", language, split="validation", cache_dir=str(tmp_path), num_images=30))
        assert ds["image_id"] == reference["image_id"]
        assert ds["concept"] == reference["concept"]
        assert ds["image"] == reference["image"]
        assert set(ds["language"]) == {language}


def test_generator_without_builder_matches_builder(tmp_path):
    examples = list(generate_synthetic(num_images=10, seed=5, languages=["it"]))
    ds = load("synthetic", "it", split="train", cache_dir=str(tmp_path), num_images=10, seed=5)
    train = [e for e in examples if e["split"] == "train"]
    assert [e["image_id"] for e in train] == ds["image_id"]
    assert [e["captions"]["it"] for e in train] == ds["caption"]
    assert [np.asarray(e["image"]).tolist() for e in train[:2]] == [np.asarray(i).tolist() for i in ds[:2]["image"]]


def test_thousand_images_in_a_few_seconds(tmp_path):
    start = time.perf_counter()
    load("synthetic", "zh", cache_dir=str(tmp_path), num_images=1000)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    "scene, language, template, expected",
    [
        (("small", "red", "circle", "left"), "en", 0, "a small red circle on the left"),
        (("large", "white", "heart", "top"), "en", 1, "a picture of a large white heart at the top"),
        (("small", "red", "circle", "left"), "de", 0, "ein kleiner roter Kreis links"),
        (("large", "orange", "square", "right"), "de", 0, "ein großes orangefarbenes Quadrat rechts"),
        (("small", "blue", "diamond", "bottom"), "de", 0, "eine kleine blaue Raute unten"),
        (("large", "white", "heart", "top"), "de", 1, "ein Bild mit einem großen weißen Herzen oben"),
        (("small", "purple", "diamond", "left"), "de", 1, "ein Bild mit einer kleinen violetten Raute links"),
        (("small", "green", "star", "right"), "fr", 0, "une petite étoile verte à droite"),
        (("large", "purple", "star", "top"), "fr", 0, "une grande étoile violette en haut"),
        (("large", "white", "circle", "bottom"), "fr", 1, "une image avec un grand cercle blanc en bas"),
        (("large", "red", "star", "left"), "es", 0, "una gran estrella roja a la izquierda"),
        (("small", "white", "heart", "bottom"), "es", 1, "una imagen con un pequeño corazón blanco abajo"),
        (("large", "black", "heart", "right"), "it", 0, "un grande cuore nero a destra"),
        (("small", "yellow", "star", "top"), "it", 1, "un'immagine con una piccola stella gialla in alto"),
        (("small", "red", "circle", "left"), "pl", 0, "małe czerwone koło po lewej"),
        (("large", "blue", "star", "top"), "pl", 1, "obrazek z dużą niebieską gwiazdą na górze"),
        (("small", "white", "triangle", "bottom"), "pl", 1, "obrazek z małym białym trójkątem na dole"),
        (("small", "blue", "heart", "left"), "ru", 0, "маленькое синее сердце слева"),
        (("large", "red", "star", "top"), "ru", 1, "картинка с большой красной звездой сверху"),
        (("large", "black", "circle", "right"), "ru", 1, "картинка с большим чёрным кругом справа"),
        (("small", "red", "star", "left"), "zh", 0, "左边有一颗红色的小星星"),
        (("large", "white", "square", "bottom"), "zh", 1, "图片的下边是一个白色的大正方形"),
        (("small", "green", "circle", "left"), "ja", 0, "左に小さい緑の丸があります"),
        (("large", "red", "star", "top"), "ja", 1, "上にある大きい赤い星"),
        (("small", "red", "heart", "left"), "ko", 0, "왼쪽에 작은 빨간 하트가 있습니다"),
        (("large", "blue", "circle", "right"), "ko", 0, "오른쪽에 큰 파란 원이 있습니다"),
        (("small", "white", "star", "bottom"), "ko", 1, "아래쪽에 있는 작은 흰 별"),
    ],
)
def test_captions_are_grammatical(scene, language, template, expected):
    assert synthetic_caption(Scene(*scene), language, template) == expected


@pytest.mark.parametrize("language", SYNTHETIC_LANGUAGES)
def test_every_concept_has_its_own_caption(language):
    assert len({scene.concept for scene in SCENES}) == len(SCENES) == 384
    for template in range(TEMPLATES):
        assert len({synthetic_caption(scene, language, template) for scene in SCENES}) == len(SCENES)


def test_rows_sharing_a_concept_share_its_description(tmp_path):
    ds = load("synthetic", "en", split="train", cache_dir=str(tmp_path), num_images=1000)
    descriptions = defaultdict(set)
    for concept, caption in zip(ds["concept"], ds["caption"]):
        descriptions[concept].add(caption.removeprefix("a picture of "))
    assert len(descriptions) > 300  # a few hundred concepts, several images each
    assert all(len(d) == 1 for d in descriptions.values())


def test_images_show_their_concept():
    """What a small model has to learn is in the pixels: colour, position and size of the shape."""
    areas = defaultdict(list)
    for example in generate_synthetic(num_images=200, languages=["en"]):
        pixels = np.asarray(example["image"], dtype=int)
        mask = np.abs(pixels - pixels[0, 0]).sum(-1) > 60
        ys, xs = np.nonzero(mask)
        scene = example["scene"]
        side = pixels.shape[0]
        centre = {"left": xs.mean() < side * 0.4, "right": xs.mean() > side * 0.6,
                  "top": ys.mean() < side * 0.4, "bottom": ys.mean() > side * 0.6}
        assert centre[scene.position], example["concept"]
        mean = pixels[mask].mean(0)
        nearest = min(COLOURS, key=lambda name: np.abs(mean - COLOURS[name]).sum())
        assert nearest == scene.colour, example["concept"]
        areas[scene.shape, scene.size].append(mask.sum())
    for shape in {shape for shape, _ in areas}:
        assert max(areas[shape, "small"]) < min(areas[shape, "large"]), shape


def test_bad_options_are_errors(tmp_path):
    with pytest.raises(ValueError, match="valid languages: en, de, fr, es, it, pl, ru, zh, ja, ko"):
        load("synthetic", "xx", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num_images must be at least 3"):
        load("synthetic", "en", cache_dir=str(tmp_path), num_images=2)
    with pytest.raises(ValueError, match="images_dir"):
        load("synthetic", "en", cache_dir=str(tmp_path), images_dir=str(tmp_path))
