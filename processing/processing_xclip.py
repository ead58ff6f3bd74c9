"""One processor for every family: CLIP's image processor + the text tower's tokenizer.

This file is remote code: `save_pretrained` copies it into the model directory, and
`AutoProcessor.from_pretrained(dir, trust_remote_code=True)` restores the processor from there. It imports public
transformers API only.
"""

import logging
import os

from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

logger = logging.getLogger(__name__)


def warn_truncated(tokenizer, texts, lengths, max_length):
    """Log a warning with the count of `texts` longer than `max_length` tokens (the caller truncated them);
    `lengths` are their token counts after truncation. Returns that count.

    Only texts truncated to exactly `max_length` tokens can be longer: those are tokenized again, one token longer.
    """
    max_length = max_length or tokenizer.model_max_length
    candidates = [text for text, length in zip(texts, lengths) if length >= max_length]
    if not candidates or max_length > 1_000_000:  # no limit set
        return 0
    longer = tokenizer(candidates, truncation=True, max_length=max_length + 1)["input_ids"]
    count = sum(len(ids) > max_length for ids in longer)
    if count:
        logger.warning("%d of %d texts are longer than %d tokens and were truncated", count, len(texts), max_length)
    return count


def load_rgb(image):
    """An RGB `PIL.Image` from a path or an image of any mode (grayscale, RGBA, palette, CMYK, ...).

    A missing or unreadable file raises an error that names it. Transparency is composited onto white, as an
    image viewer shows it.
    """
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


class XCLIPProcessor(ProcessorMixin):
    """CLIP image processor + text tokenizer, with an optional text template.

    Args:
        image_processor: a CLIP image processor.
        tokenizer: the text tower's tokenizer.
        text_template (`str`, optional): applied to every text, with `{}` standing for the text: a hard prompt such
            as "a photo of {}", or "query: {}" for e5-style encoders. Saved in `processor_config.json`.
        max_length (`int`, defaults to 77): texts are truncated to this many tokens.
    """

    def __init__(self, image_processor=None, tokenizer=None, text_template=None, max_length=77, **kwargs):
        if text_template is not None and "{}" not in text_template:
            raise ValueError(f"text_template {text_template!r} has no '{{}}' placeholder for the text")
        self.text_template = text_template
        self.max_length = max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def apply_template(self, texts):
        if self.text_template is None:
            return list(texts)
        return [self.text_template.format(t) for t in texts]

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True, truncation=True, **kwargs):
        if text is None and images is None:
            raise ValueError("give `text`, `images` or both")
        output = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else text
            texts = self.apply_template(texts)
            max_length = kwargs.pop("max_length", self.max_length)
            encoded = self.tokenizer(texts, padding=padding, truncation=truncation, max_length=max_length,
                                     return_tensors=return_tensors, **kwargs)
            if truncation:
                warn_truncated(self.tokenizer, texts, [int(sum(mask)) for mask in encoded["attention_mask"]], max_length)
            output.update(encoded)
        if images is not None:
            images = [images] if not isinstance(images, (list, tuple)) else images
            output.update(self.image_processor([load_rgb(im) for im in images], return_tensors=return_tensors))
        return BatchFeature(data=output, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


__all__ = ["XCLIPProcessor", "load_rgb", "warn_truncated"]
