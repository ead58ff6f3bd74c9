import shutil
from pathlib import Path

import pytest

from datasets_builders import available_languages, load
from datasets_builders.coco_cn import join_cjk

FIXTURE = Path(__file__).parent / "fixtures" / "coco_cn"


def coco_cn(tmp_path, data_dir=FIXTURE, **options):
    return load("coco_cn", "zh", split="test", data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"), **options)


def test_variants_choose_captions_by_source(tmp_path):
    assert available_languages("coco_cn", str(FIXTURE)) == ["zh"]
    everything = coco_cn(tmp_path)
    assert len(everything) == 19
    human = coco_cn(tmp_path, variant="cn")
    assert human["caption_source"] == ["cn"] * 4
    assert human["caption_index"] == [5, 6, 5, 5]
    assert human["image_id"] == ["COCO_val2014_000000000777.jpg"] * 2 + ["COCO_train2014_000000000888.jpg",
                                                                          "COCO_train2014_000000000999.jpg"]
    assert human[0]["caption"] == "一 只 白色 的 猫 坐 在 窗台 上"
    translated = coco_cn(tmp_path, variant="zhm")
    assert len(translated) == 15 and set(translated["caption_index"]) == {0, 1, 2, 3, 4}
    assert translated[6]["caption"] == "图片 8 的 第 1 个 翻译 句子"


def test_unsegmented_captions_join_cjk_characters_only(tmp_path):
    joined = coco_cn(tmp_path, variant="cn", segmented=False)
    assert joined[0]["caption"] == "一只白色的猫坐在窗台上"
    assert joined[2]["caption"] == "两个人在打网球，比分是 3 比 2"
    assert join_cjk("我 有 iPhone 手机 。") == "我有 iPhone 手机。"


def test_broken_json_names_the_file(tmp_path):
    broken = Path(shutil.copytree(FIXTURE, tmp_path / "coco_cn"))
    (broken / "merged_captions_coco-cn_test.json").write_text('{"images": [', encoding="utf-8")
    with pytest.raises(ValueError, match="merged_captions_coco-cn_test.json is not UTF-8 JSON"):
        coco_cn(tmp_path, broken)


def test_unknown_variant_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid variants: all, cn, zhm"):
        coco_cn(tmp_path, variant="mt")
