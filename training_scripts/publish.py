"""Saving what users publish without the paths of this machine.

Saved models carry no local path (transformers does not write `_name_or_path`; an M-CLIP config keeps a local
`modelBase` by its last part), and dataset exports store `image_path` relative to `images_dir`. PEFT, though, records
the base model's `name_or_path` in `adapter_config.json` and in the adapter's card: the full path of the directory the
base was loaded from. `save_adapter` records a publishable name instead.
"""
import os

from training_scripts.cli import looks_local


def publishable_name(name_or_path):
    """What a saved artefact may record as its base model: a Hub id as is, a local directory by its last part only."""
    text = os.fspath(name_or_path)
    if os.path.isdir(os.path.expanduser(text)) or looks_local(text):
        return os.path.basename(os.path.normpath(os.path.expanduser(text)))
    return text


def save_adapter(peft_model, output_dir, base_model, **kwargs):
    """`peft_model.save_pretrained(output_dir, **kwargs)`, recording `publishable_name(base_model)` as the base model
    (in adapter_config.json and the card). `save_embedding_layers` defaults to False: PEFT's "auto" would look the
    base's name up on the Hub; pass True when the adapter trains the embeddings."""
    name = publishable_name(base_model)
    base = peft_model.get_base_model()
    local_names = base.name_or_path, base.config.name_or_path
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = name
    base.name_or_path = base.config.name_or_path = name  # what PEFT writes into the card's base_model and tags
    try:
        peft_model.save_pretrained(output_dir, **{"save_embedding_layers": False, **kwargs})
    finally:
        base.name_or_path, base.config.name_or_path = local_names


def publishable(value):
    """`value` (a str, or dicts and lists of them) with every local path, absolute or existing here, replaced by
    `publishable_name`: what a saved model's results and card may record."""
    if isinstance(value, dict):
        return {key: publishable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(publishable(item) for item in value)
    if isinstance(value, os.PathLike) or (isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value))):
        return publishable_name(value)
    return value
