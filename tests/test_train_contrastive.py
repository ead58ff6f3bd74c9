"""Contrastive learning (run_contrastive.py, ContrastiveTrainer): AltCLIP stage 2 trains the text side on cached
image embeddings with the loss the frozen image tower gives; a small CLIP trains from scratch with both towers."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, TrainingArguments

from modeling_xclip.tiny import build_tiny_model
from training_scripts import embedded, run_contrastive
from training_scripts.contrastive import (ContrastiveCollator, ContrastiveTrainer, EmbeddingTable, PixelTable,
                                          caption_rows, frozen_image_embeddings, images_of)
from training_scripts.data import DatasetImages
from training_scripts.embeddings import Encoder, load_model
from training_scripts.training import DataArguments, load_languages

SYNTHETIC = ["num_images=60"]


@pytest.fixture(scope="module")
def altclip(tmp_path_factory):
    path = tmp_path_factory.mktemp("altclip") / "model"
    build_tiny_model("altclip", save_dir=path)
    return str(path)


def test_cached_and_uncached_contrastive_steps_give_the_same_loss(altclip, tmp_path):
    data_args = DataArguments(dataset_options=SYNTHETIC, languages=["en", "de"])
    train = load_languages(data_args, "train")
    model = load_model(altclip)          # eval mode: no dropout in the text tower either
    model.freeze("contrastive")
    encoder = Encoder(altclip, cache_dir=tmp_path)
    _, index, sources = images_of(train)
    rows = caption_rows(train, encoder.tokenizer, index)
    trainer = ContrastiveTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"),
                                                                     report_to="none"))
    tables = {"cached": EmbeddingTable("image_embeds", frozen_image_embeddings(encoder, data_args, "train", train)),
              "tower": PixelTable(DatasetImages(sources), encoder.image_processor)}
    batch_rows = rows[:5] + rows[-5:]
    losses = {}
    for name, table in tables.items():
        model.zero_grad()
        losses[name] = trainer.compute_loss(model, ContrastiveCollator(encoder.tokenizer, table)(batch_rows))
        losses[name].backward()
    torch.testing.assert_close(losses["cached"], losses["tower"], atol=1e-5, rtol=0)
    # stage 2: the text side learns, the image tower is frozen
    assert model.text_model.embeddings.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in model.vision_model.parameters())


def test_a_small_clip_trains_from_scratch_with_both_towers(tmp_path):
    recipe = dict(embedded.CLIP_RECIPE, hidden=32, projection_dim=16, epochs=2, batch_size=16)
    embedded.train_english_clip(tmp_path / "clip", SYNTHETIC, recipe)
    english = load_languages(DataArguments(dataset_options=SYNTHETIC, languages=["en"]), "train")["en"]
    start = embedded.small_clip(english["caption"], recipe)[0].state_dict()
    trained = load_file(tmp_path / "clip" / "model.safetensors")
    for name in ("vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight",
                 "visual_projection.weight", "text_projection.weight", "logit_scale"):
        assert not torch.equal(trained[name], start[name]), name
    assert type(AutoModel.from_pretrained(tmp_path / "clip")).__name__ == "CLIPModel"


def _args(model, output_dir, *extra):
    return ["--model", model, "--dataset_options", *SYNTHETIC, "--languages", "en", "de", "--output_dir",
            str(output_dir), "--per_device_train_batch_size", "16", "--max_steps", "4", "--learning_rate", "1e-3",
            "--warmup_steps", "0", "--feature_cache_dir", str(output_dir.parent / "features"), *extra]


def test_run_contrastive_trains_the_text_side_of_an_altclip_model(altclip, tmp_path):
    results = run_contrastive._main(_args(altclip, tmp_path / "out"))
    assert set(results["per_language"]) == {"en", "de"} and results["split"] == "test"
    out = tmp_path / "out"
    loaded = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert type(loaded).__name__ == "XAltCLIPModel"
    before, after = load_file(f"{altclip}/model.safetensors"), load_file(out / "model.safetensors")
    vision = [name for name in before if name.startswith("vision_model.")]
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)
    assert not torch.equal(before["text_projection.weight"], after["text_projection.weight"])
    card = (out / "README.md").read_text()
    assert "model-index" in card and "contrastive learning (AltCLIP stage 2" in card and "t2i_R@1 (de)" in card
    assert json.loads((out / "results.json").read_text())["languages"] == ["en", "de"]
    assert (out / "processor_config.json").is_file()


def test_run_contrastive_rejects_bad_input(altclip, tmp_path):
    with pytest.raises(ValueError, match="--languages xx: dataset 'synthetic' has no such language"):
        run_contrastive._main(_args(altclip, tmp_path / "a") + ["--languages", "xx"])
    mclip = tmp_path / "mclip"
    build_tiny_model("mclip", save_dir=mclip)
    with pytest.raises(ValueError, match="has no contrastive stage"):
        run_contrastive._main(_args(str(mclip), tmp_path / "b"))
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        run_contrastive._main(_args(altclip, mclip))
