"""Tiny random models of every family, built offline (no download): for tests, the quickstart and the embedded
default of the library's main job. Not remote code (no saved model imports it).

The tokenizer is a small Unigram vocabulary (Latin, Cyrillic and kana characters) with byte fallback, so any text
in any script tokenizes without unknown tokens. The towers are hidden 32, 2 layers.
"""

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPImageProcessorPil, CLIPTextConfig, CLIPVisionConfig, PreTrainedTokenizerFast, XLMRobertaConfig

from . import FAMILIES

# special tokens in XLM-R's order for <s> and <pad>; </s> is not id 2, which CLIP's text tower reserves for a legacy
# end-of-text rule
SPECIALS = ["<s>", "<pad>", "<unk>", "</s>", "<mask>"]
HIDDEN, LAYERS, HEADS, FFN, EMBED_DIM, IMAGE_SIZE, MAX_LENGTH = 32, 2, 4, 64, 16, 32, 64
# At the usual 0.02, two random layers attend almost uniformly and the first-token state (AltCLIP's pooling) is the
# same for every text; a wider initialisation keeps tiny random models' texts apart.
TEXT_INIT_RANGE = 0.2


def tiny_tokenizer():
    chars = (string.ascii_letters + string.digits + string.punctuation
             + "".join(chr(c) for c in range(0xC0, 0x180))      # Latin-1 and Latin Extended-A letters
             + "".join(chr(c) for c in range(0x400, 0x460))     # Cyrillic
             + "".join(chr(c) for c in range(0x3041, 0x30FB)))  # Hiragana and Katakana
    pieces = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [f"▁{c}" for c in chars] + list(chars)
    vocab = [(p, 0.0 if i < len(SPECIALS) else -1.0 - 0.001 * i) for i, p in enumerate(dict.fromkeys(pieces))]
    tok = Tokenizer(models.Unigram(vocab, unk_id=SPECIALS.index("<unk>"), byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", SPECIALS.index("<s>")), ("</s>", SPECIALS.index("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_max_length=MAX_LENGTH)


def tiny_text_config(vocab_size):
    return XLMRobertaConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=MAX_LENGTH + 2,
                            type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=SPECIALS.index("</s>"),
                            initializer_range=TEXT_INIT_RANGE)


def tiny_vision_config():
    return CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, image_size=IMAGE_SIZE, patch_size=8, projection_dim=EMBED_DIM)


def tiny_clip_text_config(vocab_size):
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, max_position_embeddings=MAX_LENGTH, projection_dim=EMBED_DIM,
                          pad_token_id=1, bos_token_id=0, eos_token_id=SPECIALS.index("</s>"))


def tiny_image_processor():
    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def tiny_config(family, vision=True, clip_text=None):
    """Config of a tiny model of `family` ("altclip", "mclip", "m-clip"). `clip_text` defaults to True for mCLIP."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; valid: {sorted(FAMILIES)}")
    vocab_size = len(tiny_tokenizer())
    clip_text = family == "mclip" if clip_text is None else clip_text
    kwargs = dict(text_config=tiny_text_config(vocab_size),
                  vision_config=tiny_vision_config() if vision else None,
                  clip_text_config=tiny_clip_text_config(vocab_size) if clip_text else None)
    if family == "m-clip":
        kwargs.update(modelBase="tiny-xlm-roberta", numDims=EMBED_DIM)
    elif family == "mclip":
        kwargs.update(x_projector_num_layers=LAYERS)
    return FAMILIES[family].config_class(**kwargs)


def build_tiny_model(family, save_dir=None, seed=0, text_template=None, **config_kwargs):
    """A tiny random model of `family` and its processor; saved (remote code included) to `save_dir` if given.

    Returns `(model, processor)`. The saved directory loads with `AutoModel` / `AutoProcessor` and
    `trust_remote_code=True`.
    """
    from processing import XCLIPProcessor

    torch.manual_seed(seed)
    model = FAMILIES[family](tiny_config(family, **config_kwargs)).eval()
    processor = XCLIPProcessor(tiny_image_processor(), tiny_tokenizer(), text_template=text_template,
                               max_length=MAX_LENGTH)
    if save_dir is not None:
        model.save_pretrained(save_dir)
        processor.save_pretrained(save_dir)
    return model, processor


def _main(argv):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modeling_xclip.tiny",
                                     description="Save a tiny random model of a family (with its processor).")
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("save_dir")
    parser.add_argument("--text_template", default=None)
    args = parser.parse_args(argv)
    build_tiny_model(args.family, save_dir=args.save_dir, text_template=args.text_template)


if __name__ == "__main__":
    from training_scripts.cli import run_cli  # the command line only: the library itself imports no script helper

    run_cli(_main)
