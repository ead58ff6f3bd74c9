"""The three model families: structure, equivalence with references, freezing, assembling from parts."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AltCLIPConfig,
    AltCLIPModel,
    AutoModel,
    CLIPConfig,
    CLIPModel,
    XLMRobertaModel,
)

from modeling_xclip import FAMILIES, MCLIPConfig, MCLIPModel, XAltCLIPModel, XMCLIPModel
from modeling_xclip.tiny import (
    EMBED_DIM,
    build_tiny_model,
    tiny_clip_text_config,
    tiny_text_config,
    tiny_tokenizer,
    tiny_vision_config,
)

TEXTS = ["a red circle on the left", "ein großer blauer Hund", "кошка спит", "赤い丸"]


def tokens(texts=TEXTS, **kwargs):
    return tiny_tokenizer()(texts, padding=True, return_tensors="pt", **kwargs)


def pixels(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- AltCLIP-style ---------------------------------------------------------------------------------------------------
def test_altclip_style_equals_transformers_altclip(tmp_path):
    vocab = len(tiny_tokenizer())
    text = tiny_text_config(vocab).to_dict()
    text.pop("model_type")
    config = AltCLIPConfig(text_config=dict(text, project_dim=24), vision_config=tiny_vision_config().to_dict(),
                           projection_dim=EMBED_DIM)
    torch.manual_seed(0)
    reference = AltCLIPModel(config).eval()
    reference.save_pretrained(tmp_path)
    ours = XAltCLIPModel.from_altclip(str(tmp_path)).eval()
    assert ours.config.text_transformation_dim == 24

    batch, images = tokens(), pixels()
    with torch.no_grad():
        ref_text = reference.get_text_features(**batch).pooler_output
        ref_image = reference.get_image_features(pixel_values=images).pooler_output
        ref_out = reference(**batch, pixel_values=images)
        our_text = ours.get_text_features(**batch).pooler_output
        our_image = ours.get_image_features(pixel_values=images).pooler_output
        our_out = ours(**batch, pixel_values=images)
    torch.testing.assert_close(our_text, ref_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_image, ref_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_out.logits_per_image, ref_out.logits_per_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_out.logits_per_text, ref_out.logits_per_text, atol=1e-5, rtol=0)


def test_altclip_stages_train_only_the_text_side():
    model, _ = build_tiny_model("altclip", clip_text=True)
    report = model.freeze("teacher_learning")
    assert set(report["modules"]) == {"text_model", "text_layer_norm", "text_transformation"}
    report = model.freeze("contrastive")
    assert set(report["modules"]) == {"text_model", "text_layer_norm", "text_transformation", "text_projection",
                                      "logit_scale"}
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert not any(p.requires_grad for p in model.clip_text_model.parameters())
    assert report["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad) < report["total"]
    with pytest.raises(ValueError, match="valid stages"):
        model.freeze("trikd")


def test_altclip_teacher_learning_outputs():
    model, _ = build_tiny_model("altclip", clip_text=True)
    batch = tokens()
    student = model.get_student_features(**batch)
    teacher = model.get_teacher_features(**batch)
    assert student.shape == teacher.shape == (len(TEXTS), model.config.text_transformation_dim)
    assert not teacher.requires_grad
    # the projected text feature is text_projection applied to the student output
    torch.testing.assert_close(model.get_text_features(**batch).pooler_output, model.text_projection(student))
    model.remove_clip_text_model()
    with pytest.raises(ValueError, match="no CLIP text tower"):
        model.get_teacher_features(**batch)


# --- mCLIP (TriKD) ---------------------------------------------------------------------------------------------------
@pytest.fixture()
def mclip():
    return build_tiny_model("mclip")[0]


def test_mclip_one_shared_clip_projector(mclip):
    projectors = [name for name, module in mclip.named_modules() if isinstance(module, torch.nn.Linear)
                  and module.in_features == mclip.config.clip_embed_dim and "clip_projector" in name]
    assert projectors == ["clip_projector"] and mclip.clip_projector.bias is None
    batch, images = tokens(), pixels()
    with torch.no_grad():
        clip_image = mclip.vision_model(pixel_values=images).image_embeds
        clip_text = mclip.clip_text_model(**batch).text_embeds
        torch.testing.assert_close(mclip.get_image_features(images).pooler_output, clip_image @ mclip.clip_projector.weight.t())
        torch.testing.assert_close(mclip.get_clip_text_features(**batch).pooler_output,
                                   clip_text @ mclip.clip_projector.weight.t())
        before = mclip.get_clip_text_features(**batch).pooler_output.clone(), mclip.get_image_features(images).pooler_output.clone()
        mclip.clip_projector.weight.mul_(2)
        after = mclip.get_clip_text_features(**batch).pooler_output, mclip.get_image_features(images).pooler_output
    torch.testing.assert_close(after[0], 2 * before[0])
    torch.testing.assert_close(after[1], 2 * before[1])


def test_mclip_x_projector_reads_token_states_at_eos(mclip):
    batch = tokens()
    with torch.no_grad():
        states = mclip.text_model(**batch).last_hidden_state
        projected = mclip.x_projector(states, src_key_padding_mask=batch["attention_mask"] == 0)
        last = batch["attention_mask"].sum(1) - 1
        expected = mclip.x_projection(projected[torch.arange(len(TEXTS)), last])
        got = mclip.get_text_features(**batch).pooler_output
        torch.testing.assert_close(got, expected)
        # the X-projector is on the path: changing one of its layers changes the text vector
        mclip.x_projector.layers[0].linear1.weight.add_(torch.randn_like(mclip.x_projector.layers[0].linear1.weight))
        assert not torch.allclose(mclip.get_text_features(**batch).pooler_output, got)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mclip_extra_padding_does_not_change_a_row(mclip, side):
    tok = tiny_tokenizer()
    tok.padding_side = side
    short = tok(TEXTS, padding=True, return_tensors="pt")
    long = tok(TEXTS, padding="max_length", max_length=short["input_ids"].shape[1] + 7, return_tensors="pt")
    with torch.no_grad():
        a = mclip.get_text_features(**short).pooler_output
        b = mclip.get_text_features(**long).pooler_output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mclip_trikd_trains_exactly_the_projectors(mclip):
    mclip.freeze("trikd")
    trainable = {n for n, p in mclip.named_parameters() if p.requires_grad}
    assert "clip_projector.weight" in trainable and "x_projection.weight" in trainable and "logit_scale" in trainable
    assert all(n.split(".")[0] in {"clip_projector", "x_projector", "x_projection", "logit_scale"} for n in trainable)
    assert {n.split(".")[0] for n in trainable} == {"clip_projector", "x_projector", "x_projection", "logit_scale"}


def _symmetric_infonce(logits):
    # written here, independently of modeling_xclip.losses: cross-entropy of each row and each column on the diagonal
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def test_mclip_trikd_loss_is_itc_plus_weighted_ttc(mclip):
    batch, images = tokens(TEXTS[:3]), pixels(3)
    out = mclip(**batch, pixel_values=images, clip_input_ids=batch["input_ids"],
                clip_attention_mask=batch["attention_mask"], return_loss=True)
    itc = _symmetric_infonce(out.logits_per_text)
    clip_text = F.normalize(mclip.get_clip_text_features(**batch).pooler_output, dim=-1)
    ttc = _symmetric_infonce(out.text_embeds @ clip_text.t() / 0.07)
    torch.testing.assert_close(out.loss, itc + 0.1 * ttc)
    out.loss.backward()
    assert mclip.x_projector.layers[0].linear1.weight.grad is not None


# --- M-CLIP ----------------------------------------------------------------------------------------------------------
def test_mclip_published_format_matches_reference_forward(published_mclip):
    encoder, linear = published_mclip.encoder, published_mclip.linear
    for model in (MCLIPModel.from_pretrained(published_mclip.path), AutoModel.from_pretrained(published_mclip.path)):
        assert isinstance(model, MCLIPModel) and model.vision_model is None
        batch = tokens()
        with torch.no_grad():
            states = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            expected = linear((states * mask).sum(1) / mask.sum(1))
            got = model.eval().get_text_features(**batch).pooler_output
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="no image tower"):
            model.get_image_features(pixels(1))
        # text-only: evaluated against precomputed image embeddings
        out = model(**batch, image_embeds=torch.randn(5, EMBED_DIM))
        assert out.logits_per_image.shape == (5, len(TEXTS))


def test_mclip_text_tower_is_peft_targetable():
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_model("m-clip")
    model.freeze("pet")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".transformer." in n for n in trainable)
    assert peft_model.get_text_features(**tokens()).pooler_output.shape == (len(TEXTS), EMBED_DIM)


def test_mclip_known_bases_resolve_offline():
    large = MCLIPConfig(modelBase="xlm-roberta-large", numDims=768, transformerDimensions=1024)
    assert (large.text_config.model_type, large.text_config.hidden_size, large.text_config.num_hidden_layers) == (
        "xlm-roberta", 1024, 24)
    assert MCLIPConfig(modelBase="sentence-transformers/LaBSE", numDims=768).text_config.vocab_size == 501153
    assert MCLIPConfig(modelBase="distilbert-base-multilingual-cased", numDims=512).transformerDimensions == 768
    with pytest.raises(ValueError, match="unknown M-CLIP modelBase 'my-encoder'"):
        MCLIPConfig(modelBase="my-encoder")
    with pytest.raises(ValueError, match="transformerDimensions"):
        MCLIPConfig(modelBase="xlm-roberta-base", transformerDimensions=1024)


# --- common ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_accepts_precomputed_image_embeds(family):
    model, _ = build_tiny_model(family)
    batch, images = tokens(), pixels()
    with torch.no_grad():
        from_pixels = model(**batch, pixel_values=images)
        cached = model.get_image_features(pixel_values=images).pooler_output
        from_cache = model(**batch, image_embeds=cached)
    torch.testing.assert_close(from_cache.logits_per_image, from_pixels.logits_per_image)
    assert from_pixels.logits_per_image.shape == (3, len(TEXTS))
    torch.testing.assert_close(from_pixels.text_embeds.norm(dim=-1), torch.ones(len(TEXTS)))
    with pytest.raises(ValueError, match="pixel_values"):
        model(**batch)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zero_shot_image_classification_pipeline(family):
    from transformers import pipeline

    model, processor = build_tiny_model(family, text_template="a photo of {}")
    classifier = pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                          image_processor=processor.image_processor)
    labels = ["cat", "Hund", "鳥"]
    result = classifier(Image.new("RGB", (48, 40), (200, 30, 30)), candidate_labels=labels)
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert abs(sum(r["score"] for r in result) - 1) < 1e-4


def test_from_pretrained_towers_loads_each_part(tmp_path):
    vocab = len(tiny_tokenizer())
    torch.manual_seed(1)
    XLMRobertaModel(tiny_text_config(vocab), add_pooling_layer=False).save_pretrained(tmp_path / "xlmr")
    clip_config = CLIPConfig(text_config=tiny_clip_text_config(vocab).to_dict(),
                             vision_config=tiny_vision_config().to_dict(), projection_dim=EMBED_DIM)
    clip = CLIPModel(clip_config)
    clip.save_pretrained(tmp_path / "clip")
    text_source = XLMRobertaModel.from_pretrained(tmp_path / "xlmr")

    alt = XAltCLIPModel.from_pretrained_towers(text=str(tmp_path / "xlmr"), clip=str(tmp_path / "clip"))
    torch.testing.assert_close(alt.text_model.embeddings.word_embeddings.weight,
                               text_source.embeddings.word_embeddings.weight)
    torch.testing.assert_close(alt.vision_model.visual_projection.weight, clip.visual_projection.weight)
    torch.testing.assert_close(alt.text_projection.weight, clip.text_projection.weight)  # from the teacher
    assert alt.config.text_transformation_dim == clip_config.text_config.hidden_size

    mclip = XMCLIPModel.from_pretrained_towers(text=str(tmp_path / "xlmr"), clip=str(tmp_path / "clip"))
    torch.testing.assert_close(mclip.clip_text_model.text_projection.weight, clip.text_projection.weight)
    torch.testing.assert_close(mclip.vision_model.vision_model.embeddings.patch_embedding.weight,
                               clip.vision_model.embeddings.patch_embedding.weight)

    mc = MCLIPModel.from_pretrained_towers(text=str(tmp_path / "xlmr"), vision=str(tmp_path / "clip"))
    assert mc.config.modelBase == str(tmp_path / "xlmr") and mc.config.numDims == EMBED_DIM
    assert mc.clip_text_model is None
    torch.testing.assert_close(mc.transformer.encoder.layer[1].attention.self.query.weight,
                               text_source.encoder.layer[1].attention.self.query.weight)
