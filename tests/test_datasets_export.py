import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml

from datasets_builders import load
from datasets_builders.export import export, main

FIXTURES = Path(__file__).parent / "fixtures"


def undecoded(ds):
    return ds.cast_column("image", datasets.Image(decode=False)) if "image" in ds.features else ds


def front_matter(readme: Path) -> dict:
    return yaml.safe_load(readme.read_text(encoding="utf-8").split("---\n")[1])


def test_synthetic_round_trip(tmp_path):
    cache = str(tmp_path / "cache")
    out = export("synthetic", str(tmp_path / "out"), languages=["de", "ja"], cache_dir=cache, num_images=20, seed=9)
    card = front_matter(Path(out) / "README.md")
    assert [c["config_name"] for c in card["configs"]] == ["de", "ja"]
    assert card["language"] == ["de", "ja"] and card["license"] == "cc0-1.0"
    for language in ("de", "ja"):
        exported = datasets.load_dataset(out, language, cache_dir=cache)
        built = load("synthetic", language, cache_dir=cache, num_images=20, seed=9)
        assert list(exported) == ["train", "validation", "test"]
        for split in built:
            assert exported[split].features == built[split].features
            assert undecoded(exported[split]).to_list() == undecoded(built[split]).to_list()


def test_xtd_round_trip_embeds_the_images(tmp_path):
    cache = str(tmp_path / "cache")
    options = {"data_dir": str(FIXTURES / "xtd"), "cache_dir": cache, "images_dir": str(FIXTURES / "xtd" / "images")}
    out = export("xtd", str(tmp_path / "out"), variant="fewshot", **options)
    readme = Path(out) / "README.md"
    card = front_matter(readme)
    assert [c["config_name"] for c in card["configs"]] == ["en", "es", "it", "ko", "pl", "ru", "tr", "zh", "de", "fr", "ja"]
    assert card["license"] == "other" and card["license_link"].endswith("LICENSE.md")
    assert "Aggarwal" in readme.read_text(encoding="utf-8")
    exported = datasets.load_dataset(out, "ja", cache_dir=cache)
    built = load("xtd", "ja", variant="fewshot", **options)
    for split in ("train", "validation", "test"):
        rows, built_rows = undecoded(exported[split]).to_list(), undecoded(built[split]).to_list()
        assert [{**r, "image": None} for r in rows] == [{**r, "image": None} for r in built_rows]
        images_dir = Path(options["images_dir"])
        assert [r["image"]["bytes"] for r in rows] == [(images_dir / r["image_path"]).read_bytes() for r in built_rows]


def test_nonempty_output_dir_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        export("synthetic", str(out), languages=["en"], cache_dir=str(tmp_path / "cache"), num_images=5)
    assert (out / "mine.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="valid languages"):  # a failed export leaves it as it was
        export("synthetic", str(out), languages=["xx"], overwrite=True, cache_dir=str(tmp_path / "cache"))
    assert (out / "mine.txt").exists() and not list(tmp_path.glob(".export-*"))
    export("synthetic", str(out), languages=["en"], overwrite=True, cache_dir=str(tmp_path / "cache"), num_images=5)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "en"]


def test_command_line(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    main(["coco_cn", "--data_dir", str(FIXTURES / "coco_cn"), "--output_dir", str(out), "--cache_dir", str(cache),
          "--variant", "cn", "--segmented", "false"])
    ds = datasets.load_dataset(str(out), "zh", split="test", cache_dir=str(cache))
    assert ds[0]["caption"] == "一只白色的猫坐在窗台上" and len(ds) == 4
    result = subprocess.run([sys.executable, "-m", "datasets_builders", "synthetic", "--output_dir", str(out)],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 2 and "is not empty" in result.stderr and "Traceback" not in result.stderr
