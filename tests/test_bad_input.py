"""Bad input and what the user gets (the README table "Bad input and what you get"), and publishing without local
paths: exports, saved models and adapters name no folder of the exporting machine."""
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from datasets.exceptions import DatasetGenerationError
from PIL import Image
from transformers import AutoModel

from datasets_builders import load
from datasets_builders.export import export
from modeling_xclip import MCLIPModel
from modeling_xclip.tiny import EMBED_DIM, MAX_LENGTH, build_tiny_model
from training_scripts import run_eval
from training_scripts.cli import load_pretrained
from training_scripts.publish import publishable_name, save_adapter
from training_scripts.embeddings import Encoder

REPO = Path(__file__).resolve().parents[1]
XTD = REPO / "tests" / "fixtures" / "xtd"
IMAGE_IDS = ["COCO_train2014_000000000101.jpg", "COCO_val2014_000000000202.jpg", "COCO_train2014_000000000303.jpg",
             "COCO_train2014_000000000404.jpg", "COCO_val2014_000000000505.jpg", "COCO_train2014_000000000606.jpg"]


@pytest.fixture(scope="module")
def tiny_mclip(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mclip"
    build_tiny_model("mclip", save_dir=path)
    return path


@pytest.fixture
def xtd_copy(tmp_path):
    return Path(shutil.copytree(XTD, tmp_path / "xtd"))


PROGRESS_BAR = re.compile(r"\|.*\[\d\d:\d\d")  # a tqdm line: "Loading weights: 100%|###| 141/141 [00:00<00:00, ...]"


def cli_error(capsys, argv):
    """run_eval's command line on argv: the exit status and the stderr lines that are not progress bars."""
    with pytest.raises(SystemExit) as exited:
        run_eval.main([str(arg) for arg in argv])
    return exited.value.code, [line for line in capsys.readouterr().err.strip().splitlines() if not PROGRESS_BAR.search(line)]


def one_line_error(capsys, argv, *fragments):
    code, lines = cli_error(capsys, argv)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), [l[:200] for l in lines]
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def truncated_jpeg(path):
    """A JPEG cut short: its headers are whole (PIL's verify passes it), its pixel data is not."""
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    with Image.open(path) as image:
        image.verify()  # passes: only the full decode finds it
    return path


# --- publishing without local paths -------------------------------------------------------------------------------
def local_paths_in(folder, paths):
    """The files under folder whose bytes, or (Parquet) whose decoded rows and metadata, hold one of paths."""
    found = []
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        texts = [file.read_bytes().decode("utf-8", errors="replace")]
        if file.suffix == ".parquet":  # strings inside may be compressed
            table = pq.read_table(file)
            rows = [{k: v["path"] if k == "image" else v for k, v in row.items()} for row in table.to_pylist()]
            texts += [json.dumps(rows), str(table.schema.metadata)]
        found += [f"{file}: {path}" for path in paths for text in texts if str(path) in text]
    return found


def test_export_publishes_no_local_path(tmp_path, monkeypatch):
    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    images_dir = Path(shutil.copytree(XTD / "images", home / "coco2014"))
    out = export("xtd", str(tmp_path / "out"), languages=["en", "ja"], data_dir=str(XTD),
                 cache_dir=str(tmp_path / "cache"), images_dir=str(images_dir), variant="fewshot")
    assert not local_paths_in(out, [images_dir, os.path.expanduser("~")])
    ja = datasets.load_dataset(out, "ja", split="test", cache_dir=str(tmp_path / "cache"))
    assert all(not os.path.isabs(p) and (images_dir / p).is_file() for p in ja["image_path"])  # relative to images_dir
    assert "'coco2014' (a local path)" in (Path(out) / "README.md").read_text()


def test_saved_models_and_adapters_name_no_local_path(tmp_path, monkeypatch, published_mclip):
    from peft import LoraConfig, get_peft_model

    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    saved = home / "models" / "mclip"
    build_tiny_model("mclip", save_dir=saved, text_template="a photo of {}")
    model = AutoModel.from_pretrained(saved, trust_remote_code=True)  # loaded from a local dir, then saved again
    model.save_pretrained(tmp_path / "out" / "again")
    published = MCLIPModel.from_pretrained(published_mclip.path)  # its modelBase is a local dir
    published.save_pretrained(tmp_path / "out" / "m-clip")
    assert json.loads((tmp_path / "out" / "m-clip" / "config.json").read_text())["modelBase"] == "base"
    assert MCLIPModel.from_pretrained(tmp_path / "out" / "m-clip").config.text_config.hidden_size == 32
    adapter = get_peft_model(published, LoraConfig(r=2, target_modules=["query", "value"]))
    save_adapter(adapter, tmp_path / "out" / "adapter", published_mclip.path)
    assert json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == "model"
    assert publishable_name("M-CLIP/XLM-Roberta-Large-Vit-L-14") == "M-CLIP/XLM-Roberta-Large-Vit-L-14"
    # assembled from a local encoder directory: the saved text_config does not keep where it was read from
    published_mclip.encoder.save_pretrained(home / "encoder")
    MCLIPModel.from_pretrained_towers(text=str(home / "encoder"), numDims=8).save_pretrained(tmp_path / "out" / "towers")
    assert not local_paths_in(saved, [home])  # config, processor files and card of the saved model
    assert not local_paths_in(tmp_path / "out", [home, tmp_path, published_mclip.path])


# --- images -------------------------------------------------------------------------------------------------------
def test_truncated_jpeg_is_caught_when_the_dataset_is_built(tmp_path, xtd_copy, caplog):
    truncated_jpeg(xtd_copy / "images" / "val2014" / IMAGE_IDS[1])
    options = dict(data_dir=str(xtd_copy), cache_dir=str(tmp_path / "cache"), images_dir=str(xtd_copy / "images"))
    with pytest.raises(DatasetGenerationError) as error:
        load("xtd", "en", split="test", **options)
    assert "unreadable" in str(error.value.__cause__) and IMAGE_IDS[1] in str(error.value.__cause__)
    with caplog.at_level(logging.WARNING, logger="datasets_builders"):
        ds = load("xtd", "en", split="test", on_bad_image="skip", **options)
    assert IMAGE_IDS[1] not in ds["image_id"] and len(ds) == 5 and IMAGE_IDS[1] in caplog.text


def test_replaced_or_removed_image_is_read_again(tmp_path, xtd_copy):
    options = dict(data_dir=str(xtd_copy), cache_dir=str(tmp_path / "cache"), images_dir=str(xtd_copy / "images"))
    assert len(load("xtd", "en", split="test", **options)) == 6
    Image.new("RGB", (16, 12), "red").save(xtd_copy / "images" / "val2014" / IMAGE_IDS[1], format="JPEG")
    assert load("xtd", "en", split="test", **options)[1]["image"].size == (16, 12)
    truncated_jpeg(xtd_copy / "images" / "train2014" / IMAGE_IDS[0])  # a cached copy would still pass
    with pytest.raises(DatasetGenerationError) as error:
        load("xtd", "en", split="test", **options)
    assert IMAGE_IDS[0] in str(error.value.__cause__)


# --- evaluation -----------------------------------------------------------------------------------------------------
def features_file(path, image_ids, dim, generator=None):
    embeds = torch.randn(len(image_ids), dim, generator=generator or torch.Generator().manual_seed(0))
    pd.DataFrame({"image_id": image_ids, "image_embeds": [row.tolist() for row in embeds]}).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_folder")
    for label, colour in enumerate(["red", "green", "blue"]):
        (root / f"n0{label}").mkdir()
        for index in range(2):
            Image.new("RGB", (32, 32), colour).save(root / f"n0{label}" / f"{index}.png")
    return root


def test_classification_takes_precomputed_image_features(tiny_mclip, image_folder, tmp_path, monkeypatch):
    def no_image_tower(*args, **kwargs):
        raise AssertionError("the image tower ran although features were given")

    monkeypatch.setattr(Encoder, "_encode_images", no_image_tower)
    image_ids = [f"n0{label}/{index}.png" for label in range(3) for index in range(2)]
    # each image's feature is the text embedding of its class's prompt: top-1 must then be 100
    prompts = Encoder(tiny_mclip).texts(["red", "red", "green", "green", "blue", "blue"])
    pd.DataFrame({"image_id": image_ids, "image_embeds": [row.tolist() for row in prompts]}).to_parquet(
        tmp_path / "features.parquet")
    (tmp_path / "names.json").write_text(json.dumps({"en": {"n00": "red", "n01": "green", "n02": "blue"}}))
    run_eval.main(["--model", str(tiny_mclip), "--task", "classification", "--dataset", str(image_folder),
                   "--class_names", str(tmp_path / "names.json"), "--image_features", str(tmp_path / "features.parquet"),
                   "--output_dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["per_language"]["en"]["top1"] == 100.0
    assert results["setup"]["image_features"] == str(tmp_path / "features.parquet")


def test_results_record_each_languages_split(tiny_mclip, tmp_path):
    """A Parquet dataset whose languages have one split each, named differently."""
    root = tmp_path / "data"
    configs = []
    for language, split in (("en", "test"), ("de", "test_2016")):
        rows = [{"image_id": f"img{i}", "image_path": None, "caption": f"{language} caption {i}",
                 "language": language, "split": split} for i in range(4)]
        (root / language).mkdir(parents=True)
        datasets.Dataset.from_list(rows).to_parquet(root / language / f"{split}-00000.parquet")
        configs.append(f"- config_name: {language}\n  data_files:\n  - split: {split}\n    path: {language}/*.parquet")
    (root / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    features = features_file(tmp_path / "features.parquet", [f"img{i}" for i in range(4)], EMBED_DIM)
    run_eval.main(["--model", str(tiny_mclip), "--dataset", str(root), "--image_features", str(features),
                   "--output_dir", str(tmp_path / "out")])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["splits"] == {"en": "test", "de": "test_2016"} and results["split"] is None
    assert "splits en `test`, de `test_2016`" in (tmp_path / "out" / "results.md").read_text()


@pytest.fixture(scope="module")
def parquet_data(tmp_path_factory):
    """One language, four rows, the second caption empty."""
    root = tmp_path_factory.mktemp("parquet_data")
    rows = [{"image_id": f"img{i}", "image_path": None, "caption": "" if i == 1 else f"caption {i}",
             "language": "en", "split": "test"} for i in range(4)]
    (root / "en").mkdir()
    datasets.Dataset.from_list(rows).to_parquet(root / "en" / "test-00000.parquet")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files:\n  - split: test\n"
                                    "    path: en/*.parquet\n---\n")
    return root


def test_empty_caption_is_named(tiny_mclip, parquet_data, tmp_path, capsys):
    features = features_file(tmp_path / "f.parquet", [f"img{i}" for i in range(4)], EMBED_DIM)
    one_line_error(capsys, ["--model", tiny_mclip, "--dataset", parquet_data, "--image_features", features,
                            "--output_dir", tmp_path / "out"], "en/test: 1 empty caption(s)", "row 1", "'img1'")


def test_image_features_of_another_dimension_are_rejected(tiny_mclip, tmp_path, capsys):
    ids = list(load("synthetic", "en", split="test", num_images=40)["image_id"])
    features = features_file(tmp_path / "f.parquet", ids, EMBED_DIM + 3)
    one_line_error(capsys, ["--model", tiny_mclip, "--dataset", "synthetic", "--languages", "en", "--dataset_options",
                            "num_images=40", "--image_features", features, "--output_dir", tmp_path / "out"],
                   f"{features}: image_embeds have {EMBED_DIM + 3} dimensions", f"have {EMBED_DIM}")
    model, processor = build_tiny_model("mclip")
    with pytest.raises(ValueError, match=f"image_embeds have 7 dimensions but this model's joint space has {EMBED_DIM}"):
        model(**processor(text=["a red circle"]), image_embeds=torch.randn(2, 7))
    ragged = tmp_path / "ragged.parquet"
    pd.DataFrame({"image_id": ids, "image_embeds": [[0.0] * EMBED_DIM] * 3 + [[0.0] * 5]}).to_parquet(ragged)
    one_line_error(capsys, ["--model", tiny_mclip, "--dataset", "synthetic", "--image_features", ragged,
                            "--output_dir", tmp_path / "out"], f"{ragged}: image_embeds differ in length", repr(ids[3]))


def test_long_texts_are_truncated_with_a_count(tiny_mclip, caplog):
    texts = ["short", "word " * MAX_LENGTH, "a bit longer", "lang " * (2 * MAX_LENGTH)]
    encoder = Encoder(tiny_mclip)
    with caplog.at_level(logging.WARNING):
        embeds = encoder.texts(texts)
    assert embeds.shape == (4, EMBED_DIM)
    assert f"2 of 4 texts are longer than {MAX_LENGTH} tokens and were truncated" in caplog.text
    caplog.clear()
    _, processor = build_tiny_model("mclip")
    with caplog.at_level(logging.WARNING):
        ids = processor(text=texts)["input_ids"]
    assert ids.shape[1] == MAX_LENGTH and "2 of 4 texts are longer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        processor(text=["x" * (MAX_LENGTH - 3)])  # exactly at the limit (with <s>, </s> and "▁"): not truncated
    assert "truncated" not in caplog.text


# --- command-line errors --------------------------------------------------------------------------------------------
def test_missing_model_or_dataset_dir_is_named_as_a_path(tiny_mclip, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    one_line_error(capsys, ["--model", missing, "--dataset", "synthetic", "--output_dir", tmp_path / "out"],
                   f"model directory {missing} not found")
    one_line_error(capsys, ["--model", "./no-such-model", "--dataset", "synthetic", "--output_dir", tmp_path / "out"],
                   f"model directory {Path.cwd() / 'no-such-model'} not found")
    one_line_error(capsys, ["--model", tiny_mclip, "--dataset", tmp_path / "no-such-data", "--output_dir",
                            tmp_path / "out"], f"dataset directory {tmp_path / 'no-such-data'} not found")
    one_line_error(capsys, ["--model", tiny_mclip, "--dataset", "xtd", "--data_dir", tmp_path / "no-xtd",
                            "--output_dir", tmp_path / "out"], f"data_dir {tmp_path / 'no-xtd'} not found")
    one_line_error(capsys, ["--model", tiny_mclip, "--dataset", "synthetic", "--dataset_options",
                            f"images_dir={tmp_path / 'no-images'}", "--output_dir", tmp_path / "out"],
                   f"images_dir {tmp_path / 'no-images'} not found")


def test_name_neither_here_nor_on_the_hub_names_both(tmp_path, monkeypatch):
    def offline(name, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        load_pretrained(offline, "tiny-mclp")
    assert str(error.value) == (f"model 'tiny-mclp': no directory {tmp_path / 'tiny-mclp'} here, and not loadable from "
                                "the Hub (We couldn't connect to 'https://huggingface.co' to load the files.)")


def test_corrupt_safetensors_is_named(tiny_mclip, tmp_path, capsys):
    broken = Path(shutil.copytree(tiny_mclip, tmp_path / "broken"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(capsys, ["--model", broken, "--dataset", "synthetic", "--output_dir", tmp_path / "out"],
                   f"{weights}: not a valid safetensors file")


@pytest.mark.parametrize("argv, fragments", [
    (["--batch_size", "many"], ["argument --batch_size: invalid int value: 'many'", "xclip-eval --help"]),
    (["--task", "ranking"], ["argument --task: invalid choice: 'ranking'"]),
    (["--dataset_options", "num_images"], ["'num_images' is not KEY=VALUE"]),
    (["--text_template", "a photo of"], ["--text_template needs a {}"]),
    (["--task", "classification", "--translated_captions", "t.tsv"], ["--translated_captions do not apply"]),
])
def test_bad_flag_values_are_one_line(tmp_path, capsys, argv, fragments):
    one_line_error(capsys, ["--model", "unused", "--dataset", "synthetic", "--output_dir", tmp_path / "out", *argv],
                   *fragments)


def test_bad_files_are_named(tiny_mclip, parquet_data, image_folder, tmp_path, capsys):
    not_parquet = tmp_path / "features.parquet"
    not_parquet.write_text("image_id,image_embeds\n")
    one_line_error(capsys, ["--model", tiny_mclip, "--dataset", "synthetic", "--image_features", not_parquet,
                            "--output_dir", tmp_path / "out"], f"{not_parquet}: not a Parquet file")
    bad_json = tmp_path / "names.json"
    bad_json.write_text('{"en": {"n00": "red",\n}}')
    one_line_error(capsys, ["--model", tiny_mclip, "--task", "classification", "--dataset", image_folder,
                            "--class_names", bad_json, "--output_dir", tmp_path / "out"], f"{bad_json}, line 2")
    bad_lines = tmp_path / "translated.jsonl"
    bad_lines.write_text('{"language": "en", "image_id": "img0", "caption_index": 0, "caption_en": "x"}\n{oops\n')
    one_line_error(capsys, ["--model", tiny_mclip, "--dataset", parquet_data, "--translated_captions", bad_lines,
                            "--output_dir", tmp_path / "out"], f"{bad_lines}, line 2: not valid JSON")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory"):
        run_eval.main(["--model", str(tmp_path / "none"), "--dataset", "synthetic", "--output_dir",
                       str(tmp_path / "out"), "--debug"])


def test_every_entry_point_reports_on_one_line(tmp_path):
    """The other command lines, as a user runs them: one line, status 2, no traceback; --debug shows it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = {
        "export": ([sys.executable, "-m", "datasets_builders", "xtd", "--output_dir", str(tmp_path / "out"),
                    "--data_dir", str(tmp_path / "no-xtd")], f"data_dir {tmp_path / 'no-xtd'} not found"),
        "tiny": ([sys.executable, "-m", "modeling_xclip.tiny", "clip", str(tmp_path / "m")],
                 "argument family: invalid choice: 'clip'"),
    }
    for name, (command, message) in commands.items():
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
        lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_BAR.search(line)]
        assert result.returncode == 2 and lines == [f"error: {lines[0][7:]}"] and message in lines[0], (name, lines)
