"""Contrastive learning (AltCLIP stage 2, or a small CLIP from scratch) and TriKD (mCLIP) as `Trainer` subclasses.

A training row is a caption (token ids), the index of its image and its language. Each trainer's collator looks the
image up in a *table*: the image tower's cached outputs where the tower is frozen (encoded once with
`training_scripts.embeddings.cached_features`), else pixels. TriKD's collator also looks up CLIP's English text
embedding and, optionally, the frozen multilingual text encoder's (MTE) token states in cached tables. A frozen tower
thus runs once per dataset, not once per step, and the loss is the one the towers would give (a test checks it).

- `ContrastiveTrainer`: the symmetric InfoNCE of seed paper 002 eq. 1 at the model's learnable temperature, the
  features of all processes gathered (`losses.contrastive_loss`). With an AltCLIP-style model in stage
  "contrastive" (seed paper 001 §3.2, image tower frozen as in LiT), or a transformers `CLIPModel` trained from
  scratch (both towers train).
- `TriKDTrainer`: ITC + 0.1 x TTC (seed paper 002 §3.2, `losses.trikd_loss` through `XMCLIPModel.forward`); only
  the CLIP-projector, the X-projector and the logit scale train; TTC applies to English rows only.
"""
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from modeling_xclip.losses import contrastive_loss
from training_scripts.data import DatasetImages, image_features
from training_scripts.embeddings import cached_features, open_image
from training_scripts.metrics import chance_recall_at_1
from training_scripts.report import markdown
from training_scripts.training import XCLIPTrainer, positive_keys

logger = logging.getLogger(__name__)


class Rows(torch.utils.data.Dataset):
    """A list of training rows (dicts) as a map-style dataset."""

    def __init__(self, rows):
        self.rows = list(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def data_summary(data_args, languages, captions, images):
    """The model card's line on an image-text run's training data."""
    return (f"`{data_args.dataset}` split `{data_args.train_split}`, languages {', '.join(languages)}: {captions} "
            f"captions of {images} images; options {' '.join(data_args.dataset_options) or 'none'}.")


def split_sizes(sets):
    """{language: {"texts": captions, "images": distinct images}} of an evaluation's datasets, for results.json."""
    return {language: {"texts": len(ds), "images": len(images_of({language: ds})[0])} for language, ds in sets.items()}


def optimizer_choice(name, training_args):
    """`Trainer(optimizer_cls_and_kwargs=...)` for `name`: "lamb" is timm's LAMB (You et al., 2020; seed paper 002
    trains TriKD with it) when timm is installed, else None (TrainingArguments' --optim, AdamW by default), logged.
    PyTorch and transformers have no LAMB; timm's is the well-kept one."""
    if name != "lamb":
        return None
    try:
        from timm.optim import Lamb
    except ImportError:
        logger.warning("LAMB needs timm (pip install timm), which is not installed: training with --optim %s instead",
                       training_args.optim)
        return None
    return Lamb, {"lr": training_args.learning_rate, "weight_decay": training_args.weight_decay,
                  "betas": (training_args.adam_beta1, training_args.adam_beta2), "eps": training_args.adam_epsilon}


def images_of(datasets_by_language):
    """The distinct images of {language: Dataset}: (image ids, {image_id: index}, [(dataset, row)] of each image)."""
    index, sources = {}, []
    for ds in datasets_by_language.values():
        for row, image_id in enumerate(ds["image_id"]):
            if str(image_id) not in index:
                index[str(image_id)] = len(sources)
                sources.append((ds, row))
    return list(index), index, sources


def frozen_image_embeddings(encoder, data_args, split, datasets_by_language):
    """(n_images, d) normalised outputs of a frozen image tower for `images_of(datasets_by_language)`: read from
    --image_features, else encoded once by `encoder` (an `embeddings.Encoder`, cached under its cache_dir)."""
    image_ids, _, sources = images_of(datasets_by_language)
    if data_args.image_features:
        return image_features(data_args.image_features, image_ids)
    data_dir = str(Path(data_args.data_dir).resolve()) if data_args.data_dir else None
    identity = {"dataset": data_args.dataset, "data_dir": data_dir, "options": data_args.options, "split": split,
                "image_ids": image_ids}
    return encoder.images(DatasetImages(sources, data_args.data_dir), identity, desc=f"{split} images")


def chance_levels(datasets_by_language):
    """{language: t2i R@1 in percent of a random ranking} over each language's own images (see retrieval)."""
    chance, key_ids = {}, {}
    for language, ds in datasets_by_language.items():
        keys = positive_keys(ds, key_ids)
        gallery = dict(zip((str(i) for i in ds["image_id"]), keys))
        chance[language] = chance_recall_at_1(keys, list(gallery.values()))
    return chance


def results_table(results):
    """The per-language table of a results record (results.md's table, without its notes), for the console."""
    return "\n".join(line for line in markdown(results).splitlines() if line.startswith("|"))


def caption_rows(datasets_by_language, tokenizer, image_index, text_template="{}", max_length=None,
                 clip_tokenizer=None):
    """Training rows of {language: Dataset}: `input_ids` (the caption, templated and tokenized), `image` (its index in
    `image_index`, {image_id: int}), `english` and `row` (the row's position over all languages, for row tables).
    With `clip_tokenizer`, English rows also get `clip_input_ids` (TriKD's English side, when CLIP's text tower runs
    at every step)."""
    rows = []
    for language, ds in datasets_by_language.items():
        captions = list(ds["caption"])
        encoded = tokenizer([text_template.format(c) for c in captions], truncation=True,
                            max_length=max_length)["input_ids"]
        clip_ids = (clip_tokenizer(captions, truncation=True)["input_ids"]
                    if clip_tokenizer is not None and language == "en" else [None] * len(captions))
        for ids, image_id, english_ids in zip(encoded, ds["image_id"], clip_ids):
            row = {"input_ids": ids, "image": image_index[str(image_id)], "english": language == "en",
                   "row": len(rows)}
            if english_ids is not None:
                row["clip_input_ids"] = english_ids
            rows.append(row)
    return rows


class EmbeddingTable:
    """Cached outputs of a frozen tower, one row per index; a batch gets them under `name`."""

    def __init__(self, name, values):
        self.name = name
        self.values = values

    def __call__(self, indices):
        return {self.name: self.values[torch.as_tensor(indices)]}


class PixelTable:
    """Images preprocessed by `image_processor` when a batch asks for them (`pixel_values`).

    `sources` is a sequence of `embeddings.open_image` sources (e.g. `data.DatasetImages`). With `keep`, each image is
    decoded and preprocessed once and kept in memory (small images trained for many epochs).
    """

    def __init__(self, sources, image_processor, keep=False):
        self.sources = sources
        self.image_processor = image_processor
        self.kept = {} if keep else None

    def _pixels(self, indices):
        images = [open_image(self.sources[i]) for i in indices]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    def __call__(self, indices):
        if self.kept is None:
            return {"pixel_values": self._pixels(indices)}
        missing = [i for i in dict.fromkeys(indices) if i not in self.kept]
        if missing:
            self.kept.update(zip(missing, self._pixels(missing)))
        return {"pixel_values": torch.stack([self.kept[i] for i in indices])}


class StatesTable:
    """Cached token states of a frozen text encoder: `states` (n, length, hidden) right-padded, `lengths` (n,).

    A batch gets `mte_hidden_states` cut to its longest row and the matching `attention_mask`."""

    def __init__(self, states, lengths):
        self.states = states
        self.lengths = lengths

    def __call__(self, indices):
        indices = torch.as_tensor(indices)
        lengths = self.lengths[indices]
        longest = int(lengths.max())
        mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
        return {"mte_hidden_states": self.states[indices, :longest], "attention_mask": mask}


@torch.no_grad()
def encode_token_states(encoder, tokenizer, texts, batch_size=64, max_length=None, device="cpu"):
    """(states, lengths) of a frozen encoder over `texts`: its last hidden states, right-padded, for a StatesTable."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = torch.tensor([len(ids) for ids in encoded])
    encoder.eval()   # a frozen tower: no dropout
    states = None
    for start in range(0, len(encoded), batch_size):
        batch = tokenizer.pad({"input_ids": encoded[start:start + batch_size]}, return_tensors="pt")
        out = encoder(input_ids=batch["input_ids"].to(device),
                      attention_mask=batch["attention_mask"].to(device)).last_hidden_state.float().cpu()
        if states is None:
            states = torch.zeros(len(encoded), int(lengths.max()), out.shape[-1])
        states[start:start + len(out), :out.shape[1]] = out
    return states, lengths


def _pad_ids(tokenizer, sequences):
    batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


@dataclass
class ContrastiveCollator:
    """Pads the captions with `tokenizer` and takes each row's image from `images` (an EmbeddingTable named
    `image_embeds`, or a PixelTable)."""

    tokenizer: object
    images: Callable

    def __call__(self, rows):
        input_ids, attention_mask = _pad_ids(self.tokenizer, [row["input_ids"] for row in rows])
        return {"input_ids": input_ids, "attention_mask": attention_mask, **self.images([row["image"] for row in rows])}


@dataclass
class TriKDCollator:
    """A TriKD batch for `XMCLIPModel.forward`.

    - the caption: `input_ids` padded with the MTE's `tokenizer`, or, with `mte_states` (a StatesTable over rows),
      the MTE's cached token states;
    - the image: `images` (an EmbeddingTable named `clip_image_embeds`, CLIP's own image embeddings, or a PixelTable);
    - the English side, for TTC: `clip_texts` (an EmbeddingTable named `clip_text_embeds` over rows: CLIP's own text
      embeddings of the English rows), or `clip_tokenizer` with each English row's `clip_input_ids`;
    - `english_mask`: the rows TTC applies to.
    """

    tokenizer: object
    images: Callable
    clip_texts: Optional[Callable] = None
    clip_tokenizer: Optional[object] = None
    mte_states: Optional[Callable] = None

    def __call__(self, rows):
        row_ids = [row["row"] for row in rows]
        if self.mte_states is not None:
            batch = self.mte_states(row_ids)
        else:
            input_ids, attention_mask = _pad_ids(self.tokenizer, [row["input_ids"] for row in rows])
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        batch.update(self.images([row["image"] for row in rows]))
        english = torch.tensor([row["english"] for row in rows])
        batch["english_mask"] = english
        if self.clip_texts is not None:
            batch.update(self.clip_texts(row_ids))
        elif self.clip_tokenizer is not None:
            # non-English rows are masked out of TTC; they get an empty text so that the batch is rectangular
            empty = self.clip_tokenizer("")["input_ids"]
            clip_ids, clip_mask = _pad_ids(self.clip_tokenizer,
                                           [row["clip_input_ids"] if row["english"] else empty for row in rows])
            batch.update(clip_input_ids=clip_ids, clip_attention_mask=clip_mask)
        return batch


def trikd_collator(model, datasets_by_language, rows, clip_encoder, data_args, mte_tokenizer, frozen_features=True,
                   cache_mte_states=False, text_template="{}", max_length=None, mte_fingerprint=None):
    """The `TriKDCollator` of `rows` (`caption_rows` of `datasets_by_language`, with `clip_input_ids` when the
    frozen towers run at every step).

    With `frozen_features`, CLIP's image embeddings and English text embeddings are encoded once by `clip_encoder`
    (an `embeddings.Encoder` of the CLIP model, cached under its cache_dir; images from --image_features when given)
    and, with `cache_mte_states`, the MTE's token states too (`model.text_model`; cached under
    `data_args.cache_dir`, keyed by `mte_fingerprint` and the texts). Otherwise every step runs the frozen towers on
    pixels and CLIP token ids.
    """
    if not frozen_features:
        _, _, sources = images_of(datasets_by_language)
        images = PixelTable(DatasetImages(sources, data_args.data_dir), clip_encoder.image_processor)
        return TriKDCollator(mte_tokenizer, images, clip_tokenizer=clip_encoder.tokenizer)
    images = EmbeddingTable("clip_image_embeds", frozen_image_embeddings(
        clip_encoder, data_args, data_args.train_split, datasets_by_language))
    clip_texts = mte_states = None
    english = [row["row"] for row in rows if row["english"]]
    if english:
        embeds = clip_encoder.texts(list(datasets_by_language["en"]["caption"]), desc="CLIP English texts")
        table = torch.zeros(len(rows), embeds.shape[1])
        table[english] = embeds
        clip_texts = EmbeddingTable("clip_text_embeds", table)
    if cache_mte_states:
        texts = [text_template.format(c) for ds in datasets_by_language.values() for c in ds["caption"]]

        def encode():
            device = next(model.text_model.parameters()).device
            return encode_token_states(model.text_model, mte_tokenizer, texts, max_length=max_length,
                                       device=device)[0]

        key = {"mte_states": mte_fingerprint, "texts": texts, "max_length": max_length}
        states = (cached_features(data_args.cache_dir, key, encode) if data_args.cache_dir and mte_fingerprint
                  else encode())
        mte_states = StatesTable(states, torch.tensor([len(row["input_ids"]) for row in rows]))
    return TriKDCollator(mte_tokenizer, images, clip_texts=clip_texts, mte_states=mte_states)


def _frozen_towers_eval(model):
    """Frozen towers compute without dropout, as when their outputs are encoded once (so caching keeps the loss)."""
    for name in ("text_model", "vision_model", "clip_text_model"):
        tower = getattr(model, name, None)
        if tower is not None and not any(p.requires_grad for p in tower.parameters()):
            tower.eval()


class ContrastiveTrainer(XCLIPTrainer):
    """Image-text contrastive learning: `losses.contrastive_loss` between the model's normalised text and image
    embeddings at its learnable temperature (`logit_scale`, clamped as CLIP clamps it), over the global batch.

    The model is any of ours whose `forward` takes `image_embeds` (AltCLIP-style in stage "contrastive": the image
    tower is frozen and its outputs come cached) or a transformers `CLIPModel` (both towers train, from pixels).
    The forward runs through the (possibly distributed) wrapper, so that gradients are synchronised.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        _frozen_towers_eval(self.accelerator.unwrap_model(model))
        outputs = model(**inputs)
        logit_scale = self.accelerator.unwrap_model(model).logit_scale
        loss = contrastive_loss(outputs.text_embeds, outputs.image_embeds, logit_scale=logit_scale)
        return (loss, outputs) if return_outputs else loss


class TriKDTrainer(XCLIPTrainer):
    """mCLIP's triangle cross-modal knowledge distillation: `XMCLIPModel.forward(return_loss=True)`, i.e.
    `losses.trikd_loss` = ITC + ttc_weight x TTC (TTC only on the batch's `english_mask` rows, at the fixed TTC
    temperature). The model should be frozen to stage "trikd" (`model.freeze("trikd")`)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        _frozen_towers_eval(self.accelerator.unwrap_model(model))
        outputs = model(**inputs, return_loss=True)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


__all__ = ["ContrastiveCollator", "ContrastiveTrainer", "EmbeddingTable", "PixelTable", "Rows", "StatesTable",
           "TriKDCollator", "TriKDTrainer", "caption_rows", "chance_levels", "data_summary", "encode_token_states",
           "frozen_image_embeddings", "images_of", "optimizer_choice", "results_table", "split_sizes",
           "trikd_collator"]
