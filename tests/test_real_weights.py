"""Real multilingual weights through the whole stack (slow; needs ../shared)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoProcessor, AutoTokenizer, CLIPVisionModelWithProjection

from modeling_xclip import MCLIPModel
from modeling_xclip.tiny import tiny_image_processor, tiny_vision_config
from processing import XCLIPProcessor


@pytest.mark.slow
def test_real_xlmr_text_tower_survives_save_and_auto_reload(offline_models, tmp_path):
    text_dir = offline_models("xlmr-me5-small")
    vision = tiny_vision_config()
    vision.projection_dim = 384
    CLIPVisionModelWithProjection(vision).save_pretrained(tmp_path / "vision")  # no real CLIP image tower here
    model = MCLIPModel.from_pretrained_towers(text=str(text_dir), vision=str(tmp_path / "vision"))
    # the linear map starts as the identity, so the space is e5's own (mean pooling is e5's pooling)
    with torch.no_grad():
        model.LinearTransformation.weight.copy_(torch.eye(384))
        model.LinearTransformation.bias.zero_()
    processor = XCLIPProcessor(tiny_image_processor(), AutoTokenizer.from_pretrained(text_dir),
                               text_template="query: {}", max_length=128)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")

    reloaded = AutoModel.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "model", trust_remote_code=True)
    sentences = ["A dog runs across the snowy field.", "Ein Hund rennt über das verschneite Feld.",
                 "The stock market closed lower on Tuesday."]
    with torch.no_grad():
        emb = F.normalize(reloaded.get_text_features(**processor(text=sentences)).pooler_output, dim=-1)
    translation, unrelated = (emb[0] @ emb[1]).item(), (emb[0] @ emb[2]).item()
    assert translation > unrelated + 0.05, (translation, unrelated)
    assert reloaded(**processor(text=sentences), image_embeds=torch.randn(2, 384)).logits_per_image.shape == (2, 3)
