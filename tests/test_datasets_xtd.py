import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets.exceptions import DatasetGenerationError

from datasets_builders import available_languages, load, make_builder

FIXTURE = Path(__file__).parent / "fixtures" / "xtd"
IMAGE_IDS = ["COCO_train2014_000000000101.jpg", "COCO_val2014_000000000202.jpg", "COCO_train2014_000000000303.jpg",
             "COCO_train2014_000000000404.jpg", "COCO_val2014_000000000505.jpg", "COCO_train2014_000000000606.jpg"]
LANGUAGES = ["en", "es", "it", "ko", "pl", "ru", "tr", "zh", "de", "fr", "ja"]


def xtd(tmp_path, language, data_dir=FIXTURE, **options):
    return load("xtd", language, data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), **options)


@pytest.fixture
def copy(tmp_path):
    """A copy of the fixture to break."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "xtd"))


def test_every_language_parses_to_aligned_rows(tmp_path):
    assert available_languages("xtd", str(FIXTURE)) == LANGUAGES
    for language in LANGUAGES:
        ds = xtd(tmp_path, language, split="test")
        assert ds["image_id"] == IMAGE_IDS
        assert set(ds["language"]) == {language} and set(ds["split"]) == {"test"}
        assert not any("\r" in caption or "\n" in caption or not caption for caption in ds["caption"])
    # CRLF files without a final newline: the first and the last row are whole
    zh = xtd(tmp_path, "zh", split="test")
    assert zh["caption"][0] == "街上的一辆红色公共汽车" and zh["caption"][-1] == "夜晚的钟楼"
    assert xtd(tmp_path, "es", split="test")[4]["caption"] == "un perro corre en la playa"
    assert xtd(tmp_path, "en", split="test")[4]["caption"] == "a dog runs on the beach"


def test_japanese_is_ja_and_jp_is_accepted(tmp_path):
    ds = xtd(tmp_path, "jp", split="test")
    assert ds[0]["caption"] == "通りの赤いバス" and set(ds["language"]) == {"ja"}
    assert xtd(tmp_path, "ja", split="test")["caption"] == ds["caption"]


def test_fewshot_splits_share_images_across_languages(tmp_path):
    en = xtd(tmp_path, "en", variant="fewshot")
    assert {split: len(ds) for split, ds in en.items()} == {"train": 1, "validation": 1, "test": 4}
    assert sorted(image for ds in en.values() for image in ds["image_id"]) == sorted(IMAGE_IDS)
    assert "seed=42" in en["train"].info.description
    ko = xtd(tmp_path, "ko", variant="fewshot")
    for split in en:
        assert ko[split]["image_id"] == en[split]["image_id"]
        assert set(ko[split]["split"]) == {split}
    other_seed = xtd(tmp_path, "en", variant="fewshot", seed=1)
    assert other_seed["train"]["image_id"] != en["train"]["image_id"]
    assert "seed=1" in other_seed["train"].info.description


def test_caption_count_must_match_the_image_list(tmp_path, copy):
    de = copy / "MIC" / "test_1kcaptions_de.txt"
    de.write_text("".join(de.read_text(encoding="utf-8").splitlines(keepends=True)[:5]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"test_1kcaptions_de\.txt has 5 lines but .*test_image_names\.txt has 6"):
        xtd(tmp_path, "de", copy)


def test_non_utf8_line_names_file_and_line(tmp_path, copy):
    ru = copy / "XTD10" / "test_1kcaptions_ru.txt"
    lines = ru.read_bytes().split(b"\r\n")
    lines[2] = b"\xff\xfe broken"
    ru.write_bytes(b"\r\n".join(lines))
    with pytest.raises(ValueError, match=r"test_1kcaptions_ru\.txt, line 3: not valid UTF-8"):
        xtd(tmp_path, "ru", copy)


def test_missing_file_is_named(tmp_path, copy):
    (copy / "MIC" / "test_1kcaptions_fr.txt").unlink()
    assert "fr" not in available_languages("xtd", str(copy))
    with pytest.raises(FileNotFoundError, match=r"MIC/test_1kcaptions_fr\.txt"):
        xtd(tmp_path, "fr", copy)


def test_unknown_language_or_variant_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid languages: " + ", ".join(LANGUAGES)):
        xtd(tmp_path, "xx")
    with pytest.raises(ValueError, match="valid variants: full, fewshot"):
        xtd(tmp_path, "en", variant="few")


def test_images_from_coco_folders_or_flat(tmp_path, copy):
    ds = xtd(tmp_path, "de", split="test", images_dir=str(FIXTURE / "images"))
    assert ds.column_names == ["image_id", "image_path", "image", "caption", "language", "split"]
    assert ds[1]["image_path"] == f"val2014/{IMAGE_IDS[1]}"  # relative to images_dir
    assert ds[1]["image"].size == (8, 8)
    flat = copy / "flat"
    flat.mkdir()
    for image in (copy / "images").glob("*/*.jpg"):
        shutil.move(image, flat / image.name)
    ds = xtd(tmp_path, "de", split="test", images_dir=str(flat))
    assert ds["image_path"] == IMAGE_IDS


def test_missing_image_is_an_error_or_skipped_with_a_warning(tmp_path, copy, caplog):
    (copy / "images" / "train2014" / IMAGE_IDS[2]).unlink()
    with pytest.raises(DatasetGenerationError) as error:
        xtd(tmp_path, "en", split="test", images_dir=str(copy / "images"))
    assert f"train2014/{IMAGE_IDS[2]} not found" in str(error.value.__cause__)
    with caplog.at_level(logging.WARNING, logger="datasets_builders"):
        ds = xtd(tmp_path, "en", split="test", images_dir=str(copy / "images"), on_bad_image="skip")
    assert ds["image_id"] == IMAGE_IDS[:2] + IMAGE_IDS[3:]
    assert IMAGE_IDS[2] in caplog.text


def test_corrupt_image_is_an_error(tmp_path, copy):
    (copy / "images" / "val2014" / IMAGE_IDS[4]).write_bytes(b"not a jpeg")
    with pytest.raises(DatasetGenerationError) as error:
        xtd(tmp_path, "en", split="test", images_dir=str(copy / "images"))
    assert "unreadable" in str(error.value.__cause__) and IMAGE_IDS[4] in str(error.value.__cause__)


def test_precomputed_image_features(tmp_path):
    path = tmp_path / "features.parquet"
    embeds = [[float(i), 0.5, -1.0] for i in range(len(IMAGE_IDS))]
    pq.write_table(pa.table({"image_id": IMAGE_IDS[::-1], "image_embeds": embeds[::-1]}), path)
    ds = xtd(tmp_path, "pl", split="test", image_features=str(path))
    assert ds["image_embeds"] == embeds
    pq.write_table(pa.table({"image_id": IMAGE_IDS[:-1], "image_embeds": embeds[:-1]}), path)
    with pytest.raises(DatasetGenerationError) as error:
        xtd(tmp_path, "pl", split="test", image_features=str(path))
    assert f"no image_embeds for image_id '{IMAGE_IDS[-1]}'" in str(error.value.__cause__)


def test_changed_options_and_files_get_their_own_cache(tmp_path, copy):
    assert "image" not in xtd(tmp_path, "it", copy, split="test").column_names
    assert "image" in xtd(tmp_path, "it", copy, split="test", images_dir=str(copy / "images")).column_names
    it = copy / "XTD10" / "test_1kcaptions_it.txt"
    it.write_bytes(it.read_bytes().replace("un piatto di pasta".encode(), "un piatto di riso".encode()))
    assert xtd(tmp_path, "it", copy, split="test")[3]["caption"] == "un piatto di riso"


def test_streaming_reads_every_row_each_time(tmp_path):
    builder = make_builder("xtd", "fr", data_dir=str(FIXTURE), cache_dir=str(tmp_path), images_dir=str(FIXTURE / "images"))
    stream = builder.as_streaming_dataset(split="test")
    first, second = [row["image_id"] for row in stream], [row["image_id"] for row in stream]
    assert first == second == IMAGE_IDS
