"""Load any supported model and turn texts and images into L2-normalised embeddings.

Models: our three families and transformers CLIP/AltCLIP through ``AutoModel(trust_remote_code=True)``,
and published M-CLIP-format dirs (``"model_type": "M-CLIP"`` without ``auto_map``) through
``modeling_xclip.MCLIPModel``. All expose ``get_text_features`` / ``get_image_features`` whose
``pooler_output`` is the projected vector.

Tokenizer, image processor, default text template and maximum length come from
``AutoProcessor(trust_remote_code=True)`` (for a tokenizer-only dir, the tokenizer alone: no images).
Texts are tokenized once, sorted by length and padded per batch. With a ``cache_dir`` every result is
stored as ``<sha256>.safetensors``, keyed by the model (path and the size and mtime of its files) and by
the exact inputs (the templated texts, or the caller's identity of the images).
"""
import hashlib
import io
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor, PretrainedConfig

from processing import load_rgb, warn_truncated
from training_scripts.cli import load_pretrained

logger = logging.getLogger(__name__)


def load_model(name_or_path):
    """The model at a Hub id or local dir, in eval mode; a missing dir or a corrupt weights file raises an error
    that names it (``training_scripts.cli.load_pretrained``)."""
    config, _ = load_pretrained(PretrainedConfig.get_config_dict, name_or_path)
    if config.get("model_type") == "M-CLIP" and "auto_map" not in config:
        from modeling_xclip import MCLIPModel

        model = load_pretrained(MCLIPModel.from_pretrained, name_or_path)
    else:
        model = load_pretrained(AutoModel.from_pretrained, name_or_path, trust_remote_code=True)
    return model.eval()


def text_features(model, input_ids, attention_mask):
    """Unnormalised projected text vectors of a model, or of a PeftModel of one: PEFT prepends a soft prompt's
    virtual tokens in its forward only, so a prompt-learning adapter runs the forward (with one dummy image vector,
    which M-CLIP's forward needs and whose output is not used)."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and model.peft_config[model.active_adapter].is_prompt_learning:
        dummy = input_ids.new_zeros((1, model.get_base_model().config.numDims), dtype=torch.float32)
        output = model(input_ids=input_ids, attention_mask=attention_mask, image_embeds=dummy)
        return output.text_model_output.pooler_output
    return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def encode_text_batches(forward, tokenizer, texts, batch_size=64, max_length=None, desc="texts", device="cpu"):
    """(len(texts), d) float32 CPU outputs of `forward(input_ids, attention_mask)`, unnormalised, in the order given.

    Texts are tokenized once (truncated at `max_length`, with a warning that counts the truncated ones), sorted by
    length and padded per batch. Embeddings for retrieval are these L2-normalised (`Encoder`); regression targets
    and features (teacher learning) are used as they are.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to encode")
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    warn_truncated(tokenizer, texts, [len(ids) for ids in encoded["input_ids"]], max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    chunks = []
    with tqdm(total=len(texts), desc=desc, unit="text") as progress:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({name: [encoded[name][i] for i in rows] for name in ("input_ids", "attention_mask")},
                                  return_tensors="pt")
            output = forward(batch["input_ids"].to(device), batch["attention_mask"].to(device))
            chunks.append(output.detach().float().cpu())
            progress.update(len(rows))
    vectors = torch.empty(len(texts), chunks[0].shape[1])
    vectors[order] = torch.cat(chunks)
    return vectors


def model_fingerprint(name_or_path):
    """What identifies a model's outputs: its id, or a local dir's path and its files' sizes and mtimes."""
    path = Path(name_or_path)
    if not path.is_dir():
        return str(name_or_path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return [str(path.resolve())] + [f"{f.relative_to(path)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]


def cached_features(cache_dir, key, compute):
    """The tensor ``compute()`` returns, stored once in ``cache_dir`` as ``<sha256 of key>.safetensors``.

    This is the library's one cache of what frozen towers compute (evaluation embeddings, teacher targets, image and
    English CLIP embeddings in training): ``key`` (JSON-serialisable) must name everything the result depends on,
    e.g. the model's ``model_fingerprint`` and the exact inputs. Files are written atomically.
    """
    cache_dir = Path(cache_dir)
    text = json.dumps(key, sort_keys=True, ensure_ascii=False)
    path = cache_dir / f"{hashlib.sha256(text.encode()).hexdigest()}.safetensors"
    if path.exists():
        try:
            embeds = load_file(path)["embeds"]
            logger.debug("loaded from cache %s", path)
            return embeds
        except Exception as error:  # a truncated or foreign file: computed again and replaced
            logger.warning("cache file %s is unreadable (%s): computing it again", path, error)
    embeds = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"embeds": embeds.contiguous()}, partial)
    partial.replace(path)
    return embeds


def open_image(source):
    """An RGB image from a PIL image, a path, or a datasets ``Image(decode=False)`` entry."""
    if isinstance(source, dict):
        source = Image.open(io.BytesIO(source["bytes"])) if source.get("bytes") else source["path"]
    return load_rgb(source)


class Encoder:
    """A model with its processor, encoding in batches, optionally cached.

    ``text_template`` is the processor's saved template ("{}" when it has none); callers apply it.
    """

    def __init__(self, model_path, device="cpu", batch_size=64, cache_dir=None):
        self._setup(load_model(model_path), AutoProcessor.from_pretrained(model_path, trust_remote_code=True),
                    device, batch_size, cache_dir, model_fingerprint(model_path))

    @classmethod
    def from_model(cls, model, processor, device=None, batch_size=64):
        """An encoder of an in-memory model (e.g. during training): nothing is cached, since its weights change."""
        encoder = cls.__new__(cls)
        encoder._setup(model, processor, device or next(model.parameters()).device, batch_size, None, None)
        return encoder

    def _setup(self, model, processor, device, batch_size, cache_dir, fingerprint):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.model = model.to(self.device)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self.text_template = getattr(processor, "text_template", None) or "{}"
        self.max_length = getattr(processor, "max_length", None)
        self._fingerprint = fingerprint

    def texts(self, texts, desc="texts"):
        """(len(texts), d) float32 CPU tensor of L2-normalised text embeddings, in the order given."""
        texts = list(texts)
        return self._cached({"texts": texts}, lambda: self._encode_texts(texts, desc))

    def images(self, images, identity, desc="images"):
        """(len(images), d) normalised image embeddings; ``images`` is a sequence of ``open_image`` sources.

        ``identity`` (JSON-serialisable) names the images for the cache, e.g. the dataset and image ids.
        """
        return self._cached({"images": identity}, lambda: self._encode_images(images, desc))

    def _cached(self, inputs, compute):
        if self.cache_dir is None or self._fingerprint is None:
            return compute()
        return cached_features(self.cache_dir, {"model": self._fingerprint, **inputs}, compute)

    @torch.inference_mode()
    def _encode_texts(self, texts, desc):
        vectors = encode_text_batches(lambda ids, mask: text_features(self.model, ids, mask), self.tokenizer, texts,
                                      self.batch_size, self.max_length, desc, self.device)
        return F.normalize(vectors, dim=-1)

    @torch.inference_mode()
    def _encode_images(self, images, desc):
        if self.image_processor is None:
            raise ValueError("this model directory has no image processor: pass precomputed image features")
        chunks = []
        with tqdm(total=len(images), desc=desc, unit="img") as progress:
            for start in range(0, len(images), self.batch_size):
                batch = [open_image(images[i]) for i in range(start, min(start + self.batch_size, len(images)))]
                pixel_values = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                output = self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.model.dtype))
                chunks.append(F.normalize(output.pooler_output.float(), dim=-1).cpu())
                progress.update(len(batch))
        return torch.cat(chunks)
