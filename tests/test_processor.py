"""The shared processor: templates, image modes, bad images."""

import pytest
import torch
from PIL import Image

from modeling_xclip.tiny import tiny_image_processor, tiny_tokenizer
from processing import XCLIPProcessor, load_rgb


@pytest.fixture()
def processor():
    return XCLIPProcessor(tiny_image_processor(), tiny_tokenizer(), text_template="query: {}")


def test_template_is_applied_before_tokenizing(processor):
    ids = processor(text=["ein Hund"])["input_ids"]
    expected = tiny_tokenizer()(["query: ein Hund"], return_tensors="pt")["input_ids"]
    assert torch.equal(ids, expected)
    assert XCLIPProcessor(tiny_image_processor(), tiny_tokenizer()).apply_template(["x"]) == ["x"]
    with pytest.raises(ValueError, match="placeholder"):
        XCLIPProcessor(tiny_image_processor(), tiny_tokenizer(), text_template="a photo of")


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_every_image_mode_becomes_rgb(processor, mode, tmp_path):
    image = Image.new("RGB", (20, 10), (255, 0, 0)).convert(mode)
    assert load_rgb(image).mode == "RGB"
    pixel_values = processor(images=[image])["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_rgb(image).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert load_rgb(palette).getpixel((1, 1)) == (255, 255, 255)


def test_missing_and_unreadable_images_are_named(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        processor(images=[str(tmp_path / "nope.jpg")])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        processor(images=[str(broken)])
    good = tmp_path / "good.png"
    Image.new("L", (8, 8), 128).save(good)
    assert processor(images=str(good))["pixel_values"].shape == (1, 3, 32, 32)
