"""run_eval end to end: every family, local Parquet data, precomputed image features, translate-test,
classification, the embedding cache, and the real xlmr-me5-small on the XTD sample (slow)."""
import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, XLMRobertaModel

from datasets_builders import load
from modeling_xclip.tiny import (EMBED_DIM, build_tiny_model, tiny_clip_text_config, tiny_image_processor,
                                 tiny_tokenizer, tiny_vision_config)
from training_scripts import run_eval
from training_scripts.embeddings import Encoder, open_image

REPO = Path(__file__).resolve().parents[1]
LANGUAGES = ["en", "de", "fr"]
WORDS = {"en": ["red", "green", "blue", "circle", "square", "star"],
         "de": ["rot", "grün", "blau", "Kreis", "Quadrat", "Stern"],
         "fr": ["rouge", "vert", "bleu", "cercle", "carré", "étoile"]}
RGB = [(220, 30, 30), (30, 160, 60), (40, 80, 220)]
PER_LANGUAGE_KEYS = {"t2i", "i2t", "mean_recall", "r1_mean"}
RETRIEVAL_COLUMNS = {f"{d}_R@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)} | {"mean_recall", "r1_mean"}


# --- models -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Tiny random model dirs: our three families (factory) and a transformers CLIPModel."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family in ("altclip", "mclip", "m-clip"):
        build_tiny_model(family, save_dir=root / family)
        dirs[family] = root / family
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(text_config=tiny_clip_text_config(len(tokenizer)).to_dict(),
                        vision_config=tiny_vision_config().to_dict(), projection_dim=EMBED_DIM)
    CLIPModel(config).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    tiny_image_processor().save_pretrained(root / "clip")
    dirs["clip"] = root / "clip"
    return dirs


# --- data ---------------------------------------------------------------------------------------------------------
def png(rgb, size=32):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def caption(language, image, variant):
    colour, shape = WORDS[language][image % 3], WORDS[language][3 + image // 3 % 3]
    return f"{colour} {shape}" if variant == 0 else f"{shape} {colour} {variant}"


@pytest.fixture(scope="session")
def parquet_dataset(tmp_path_factory):
    """A local Parquet dataset in our schema (one config per language, a test split): 6 images in 3 concepts
    (2 images each), 2 captions per image and language."""
    root = tmp_path_factory.mktemp("parquet_dataset")
    features = datasets.Features({name: datasets.Value("string") for name in
                                  ("image_id", "image_path", "caption", "language", "split", "concept")})
    features["image"] = datasets.Image()
    configs = []
    for language in LANGUAGES:
        rows = [{"image_id": f"img{image}", "image_path": None, "image": {"bytes": png(RGB[image % 3]), "path": None},
                 "caption": caption(language, image, variant), "language": language, "split": "test",
                 "concept": f"c{image // 2}"} for image in range(6) for variant in range(2)]
        (root / language).mkdir()
        datasets.Dataset.from_list(rows, features=features).to_parquet(root / language / "test-00000.parquet")
        configs.append(f"- config_name: {language}\n  data_files:\n  - split: test\n    path: {language}/test-*.parquet")
    (root / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    return root


def run(tmp_path, *argv):
    """run_eval.main in this process; returns results.json. With "--debug" among argv, a user error raises as is
    (without, it ends in one line and exit status 2)."""
    output_dir = tmp_path / "out"
    run_eval.main(["--output_dir", str(output_dir), *map(str, argv)])
    return json.loads((output_dir / "results.json").read_text())


def check_retrieval_results(results, output_dir, languages):
    assert results["task"] == "retrieval" and results["languages"] == languages
    assert list(results["per_language"]) == languages
    for metrics in results["per_language"].values():
        assert set(metrics) == PER_LANGUAGE_KEYS
        for direction in ("t2i", "i2t"):
            assert list(metrics[direction]) == ["R@1", "R@5", "R@10"]
            values = list(metrics[direction].values())
            assert all(0 <= v <= 100 for v in values) and values == sorted(values)
        assert metrics["r1_mean"] == pytest.approx((metrics["t2i"]["R@1"] + metrics["i2t"]["R@1"]) / 2)
    assert set(results["summary"]) == RETRIEVAL_COLUMNS
    for column, stats in results["summary"].items():
        assert set(stats) == {"avg", "avg_en", "std", "range"}
        values = [m["r1_mean"] for m in results["per_language"].values()] if column == "r1_mean" else None
        if values:
            assert stats["avg"] == pytest.approx(sum(values) / len(values))
            assert stats["range"] == pytest.approx(max(values) - min(values))
    markdown = (output_dir / "results.md").read_text()
    assert "t2i = text→image" in markdown and "i2t = image→text" in markdown and "n − 1" in markdown
    for row in (*languages, "**Avg**", "**Avg-en**", "**Std**", "**Range**"):
        assert f"| {row} |" in markdown
    with Image.open(output_dir / "results.png") as image:
        assert image.size[0] > 100 and image.size[1] > 100


# --- retrieval ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["altclip", "mclip", "m-clip", "clip"])
def test_every_family_on_local_parquet(models, parquet_dataset, tmp_path, family):
    results = run(tmp_path, "--model", models[family], "--dataset", parquet_dataset, "--batch_size", 5)
    check_retrieval_results(results, tmp_path / "out", LANGUAGES)
    assert results["split"] == "test"
    assert results["sizes"] == {language: {"texts": 12, "images": 6} for language in LANGUAGES}


@pytest.mark.parametrize("family", ["altclip", "mclip", "m-clip"])
def test_every_family_on_synthetic(models, tmp_path, family):
    results = run(tmp_path, "--model", models[family], "--dataset", "synthetic", "--languages", "en", "de", "ja",
                  "--dataset_options", "num_images=60", "seed=3")
    check_retrieval_results(results, tmp_path / "out", ["en", "de", "ja"])
    assert results["split"] == "test"


def test_script_entry_points(models, parquet_dataset, tmp_path):
    """`python training_scripts/run_eval.py` runs from anywhere; `python -m training_scripts.run_eval` too."""
    command = [sys.executable, str(REPO / "training_scripts" / "run_eval.py"), "--model", str(models["clip"]),
               "--dataset", str(parquet_dataset), "--languages", "de", "--output_dir", str(tmp_path / "out")]
    subprocess.run(command, check=True, cwd=tmp_path, capture_output=True)
    check_retrieval_results(json.loads((tmp_path / "out" / "results.json").read_text()), tmp_path / "out", ["de"])
    help_text = subprocess.run([sys.executable, "-m", "training_scripts.run_eval", "--help"], check=True, cwd=REPO,
                               capture_output=True, text=True).stdout
    assert "--translated_captions" in help_text and "caption_index" in help_text


def test_refuses_to_overwrite_results(models, parquet_dataset, tmp_path):
    argv = ["--model", models["clip"], "--dataset", parquet_dataset, "--languages", "en"]
    run(tmp_path, *argv)
    before = (tmp_path / "out" / "results.md").read_text()
    with pytest.raises(SystemExit) as refused:
        run(tmp_path, *argv, "--text_template", "a photo of {}")
    assert refused.value.code == 2
    assert (tmp_path / "out" / "results.md").read_text() == before
    assert run(tmp_path, *argv, "--text_template", "a photo of {}", "--overwrite")["setup"]["text_template"] == \
        "a photo of {}"


@pytest.mark.parametrize("argv", [["--text_template", "a photo of"], ["--class_names", "names.json"],
                                  ["--task", "classification", "--translated_captions", "translated.tsv"]])
def test_rejects_bad_or_misplaced_options(tmp_path, argv):
    with pytest.raises(SystemExit) as refused:
        run(tmp_path, "--model", "unused", "--dataset", "unused", *argv)
    assert refused.value.code == 2


def test_cache_is_reused_and_keyed_by_template(models, parquet_dataset, tmp_path, monkeypatch):
    argv = ["--model", models["altclip"], "--dataset", parquet_dataset, "--cache_dir", tmp_path / "cache",
            "--overwrite"]
    first = run(tmp_path, *argv)
    cached = sorted((tmp_path / "cache").iterdir())
    assert len(cached) == 1 + len(LANGUAGES) and all(p.suffix == ".safetensors" for p in cached)

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although cached")

    monkeypatch.setattr(Encoder, "_encode_texts", no_encoding)
    monkeypatch.setattr(Encoder, "_encode_images", no_encoding)
    assert run(tmp_path, *argv)["per_language"] == first["per_language"]
    with pytest.raises(AssertionError, match="encoded although cached"):
        run(tmp_path, *argv, "--text_template", "a photo of {}")


@pytest.mark.parametrize("family", ["mclip", "m-clip", "clip"])  # the tiny altclip's text features hardly vary
def test_sorted_dynamically_padded_batches_match_one_text_at_a_time(models, family):
    encoder = Encoder(models[family], batch_size=4)
    texts = [caption(language, image, 0) + " extra words" * (image % 3) for language in LANGUAGES for image in range(4)]
    batched = encoder.texts(texts)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    one_at_a_time = torch.cat([encoder.texts([text]) for text in texts])
    assert torch.allclose(batched, one_at_a_time, atol=1e-5)


def image_features_file(path, image_ids, embeds):
    pd.DataFrame({"image_id": image_ids, "image_embeds": [row.tolist() for row in embeds]}).to_parquet(path)
    return path


def test_text_only_published_mclip_with_image_features(published_mclip, parquet_dataset, tmp_path):
    # Image features = the model's own embedding of each image's first English caption: every image then finds one of
    # its English captions first (i2t R@1 = 100 for en), which fails if features and image ids are misaligned.
    encoder = Encoder(published_mclip.path)
    english = datasets.load_dataset(str(parquet_dataset), "en", split="test")
    first = {}
    for row in english:
        first.setdefault(row["image_id"], row["caption"])
    features = image_features_file(tmp_path / "features.parquet", list(first), encoder.texts(first.values()))
    results = run(tmp_path, "--model", published_mclip.path, "--dataset", parquet_dataset, "--image_features", features)
    check_retrieval_results(results, tmp_path / "out", LANGUAGES)
    assert results["per_language"]["en"]["i2t"]["R@1"] == 100.0

    with pytest.raises(ValueError, match="no image processor"):
        run(tmp_path, "--model", published_mclip.path, "--dataset", parquet_dataset, "--overwrite", "--debug")


@pytest.mark.parametrize("suffix", [".jsonl", ".tsv", ".parquet"])
def test_translate_test_replaces_captions(models, parquet_dataset, tmp_path, suffix):
    # "Translations" of de and fr that are exactly the English captions: de and fr must then score as en.
    english = datasets.load_dataset(str(parquet_dataset), "en", split="test")
    table = pd.DataFrame([{"language": language, "image_id": row["image_id"], "caption_index": index % 2,
                           "caption_en": row["caption"]}
                          for language in ("de", "fr") for index, row in enumerate(english)])
    path = tmp_path / f"translated{suffix}"
    if suffix == ".jsonl":
        table.to_json(path, orient="records", lines=True, force_ascii=False)
    elif suffix == ".tsv":
        table.to_csv(path, sep="\t", index=False)
    else:
        table.to_parquet(path)
    results = run(tmp_path, "--model", models["mclip"], "--dataset", parquet_dataset, "--translated_captions", path)
    assert results["setup"]["translated_languages"] == ["de", "fr"]
    assert results["per_language"]["de"] == results["per_language"]["en"] == results["per_language"]["fr"]
    assert results["summary"]["r1_mean"]["std"] == 0.0

    table.iloc[1:].to_parquet(tmp_path / "partial.parquet")
    with pytest.raises(ValueError, match="no translation for 1 captions"):
        run(tmp_path, "--model", models["mclip"], "--dataset", parquet_dataset, "--overwrite",
            "--translated_captions", tmp_path / "partial.parquet", "--debug")


# --- classification -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """3 class folders (named like ImageNet ids) of 2 images each, each class its own colour."""
    root = tmp_path_factory.mktemp("image_folder")
    for label, rgb in enumerate(RGB):
        (root / f"n0{label}").mkdir()
        for index in range(2):
            (root / f"n0{label}" / f"{index}.png").write_bytes(png(rgb))
    return root


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False))
    return path


NAMES = {"en": {"n00": "red", "n01": "green", "n02": "blue"}, "de": {"n00": "rot", "n01": "grün", "n02": "blau"}}


def test_classification_tiny_model(models, image_folder, tmp_path):
    class_names = write_json(tmp_path / "names.json", NAMES)
    prompts = write_json(tmp_path / "prompts.json", {"en": ["a photo of a {}", "a {} thing"], "de": ["ein Foto: {}"]})
    results = run(tmp_path, "--model", models["altclip"], "--task", "classification", "--dataset", image_folder,
                  "--class_names", class_names, "--prompts", prompts)
    assert results["task"] == "classification" and results["languages"] == ["en", "de"]
    assert results["sizes"]["en"] == {"images": 6, "classes": 3, "templates": 2}
    for metrics in results["per_language"].values():
        assert set(metrics) == {"top1", "top5"} and metrics["top5"] == 100.0  # 3 classes: always in the top 5
    assert set(results["summary"]) == {"top1", "top5"}
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| **Std** |" in markdown and "prompts" in markdown

    with pytest.raises(ValueError, match="de: no prompts, or no class name"):
        run(tmp_path, "--model", models["altclip"], "--task", "classification", "--dataset", "imagefolder",
            "--data_dir", image_folder, "--class_names", write_json(tmp_path / "bad.json", {"de": {"n00": "rot"}}),
            "--overwrite", "--debug")


def test_classification_aligns_images_labels_and_class_names(models, image_folder, tmp_path, monkeypatch):
    """With an encoder that sees colours exactly, the right class names give 100% top-1 in every language and class
    names given to the wrong folders give 0%."""
    words = {"red": 0, "rot": 0, "green": 1, "grün": 1, "blue": 2, "blau": 2}

    def encode_texts(self, texts, desc):
        return torch.stack([F.one_hot(torch.tensor(words[t.split()[-1]]), 3).float() for t in texts])

    def encode_images(self, images, desc):
        return F.normalize(torch.tensor([open_image(s).getpixel((0, 0)) for s in images], dtype=torch.float32), dim=-1)

    monkeypatch.setattr(Encoder, "_encode_texts", encode_texts)
    monkeypatch.setattr(Encoder, "_encode_images", encode_images)
    names = {**NAMES, "xx": {"n00": "green", "n01": "blue", "n02": "red"}}
    results = run(tmp_path, "--model", models["clip"], "--task", "classification", "--dataset", image_folder,
                  "--class_names", write_json(tmp_path / "names.json", names), "--text_template", "a photo of {}")
    assert {language: m["top1"] for language, m in results["per_language"].items()} == \
        {"en": 100.0, "de": 100.0, "xx": 0.0}


# --- real weights (slow) ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_xlmr_me5_small_on_xtd_sample(offline_models, shared_dir, tmp_path):
    """The real multilingual e5-small as the text tower of a published-format M-CLIP checkpoint, on the XTD sample
    (100 captions in each of 11 languages), with fixed random image features, then with features that are the
    English captions' embeddings: every language must then retrieve far above chance (1%)."""
    base = offline_models("xlmr-me5-small")
    model_dir = tmp_path / "mclip-me5"
    model_dir.mkdir()
    encoder_weights = XLMRobertaModel.from_pretrained(base, add_pooling_layer=False).state_dict()
    weights = {f"transformer.{name}": tensor.contiguous() for name, tensor in encoder_weights.items()}
    weights["LinearTransformation.weight"] = torch.eye(384)
    weights["LinearTransformation.bias"] = torch.zeros(384)
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps({"model_type": "M-CLIP", "modelBase": str(base),
                                                       "numDims": 384, "transformerDimensions": 384}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).exists():
            (model_dir / name).write_bytes((base / name).read_bytes())

    data_dir = shared_dir / "data" / "xtd-sample"
    english = load("xtd", "en", split="test", data_dir=str(data_dir))
    image_ids = list(dict.fromkeys(english["image_id"]))
    random_features = torch.randn(len(image_ids), 384, generator=torch.Generator().manual_seed(0))
    common = ["--model", model_dir, "--dataset", "xtd", "--data_dir", data_dir, "--text_template", "query: {}",
              "--cache_dir", tmp_path / "cache", "--overwrite"]
    results = run(tmp_path, *common, "--image_features",
                  image_features_file(tmp_path / "random.parquet", image_ids, random_features))
    languages = results["languages"]
    assert len(languages) == 11 and "en" in languages and "ja" in languages
    check_retrieval_results(results, tmp_path / "out", languages)
    assert all(results["sizes"][language]["images"] == 100 for language in languages)
    assert results["summary"]["r1_mean"]["avg"] < 15  # random images: about chance

    by_image = dict(zip(english["image_id"], english["caption"]))
    english_embeds = Encoder(model_dir).texts([f"query: {by_image[i]}" for i in image_ids])
    results = run(tmp_path, *common, "--image_features",
                  image_features_file(tmp_path / "english.parquet", image_ids, english_embeds))
    per_language = results["per_language"]
    assert per_language["en"]["t2i"]["R@1"] == 100.0
    assert all(per_language[language]["t2i"]["R@10"] > 60 for language in languages), per_language
    assert results["summary"]["t2i_R@1"]["avg_en"] > 60
