"""Enhancement of the multilingual text encoder (MTE) before TriKD, seed paper 002 §3.3.

The XLM-R encoder gets a randomly initialised decoder (transformers' `EncoderDecoderModel`: the encoder plus an
`XLMRobertaForCausalLM` with cross-attention), trained on translation in two stages:

- stage 1: the encoder is frozen and the decoder alone learns NMT (`losses.nmt_loss`);
- stage 2: encoder and decoder train on NMT + 2.0 x CTL (`losses.mte_stage2_loss`), CTL being the contrastive loss
  between the mean-pooled last encoder states of the two sides of each sentence pair.

All embeddings come from XLM-R and stay fixed (the decoder's token and position embeddings are copied from the
encoder's; its output layer is tied to its token embeddings). Every pair is translated in both directions (English to
the other language and back, as the paper's MT6 directions), in one forward over the 2N sentences: the encoder states
of that forward also give the two sides' pooled vectors for CTL. After stage 2 the encoder is saved as a plain
encoder directory (`save_encoder`) that `run_trikd.py --text DIR` and `AutoModel` load.
"""
import logging

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, EncoderDecoderModel
from transformers.models.encoder_decoder.modeling_encoder_decoder import shift_tokens_right

from modeling_xclip.losses import mean_pool, mte_stage2_loss, nmt_loss
from training_scripts.training import XCLIPTrainer

logger = logging.getLogger(__name__)

STAGES = (1, 2)
CTL_WEIGHT = 2.0  # α of seed 002 §3.3


def build_encoder_decoder(encoder_name_or_path, tokenizer, decoder_layers=None, dropout=None):
    """XLM-R encoder (pretrained) + a randomly initialised decoder of the same width, whose embeddings are the
    encoder's. `decoder_layers` defaults to the encoder's depth; `dropout` (seed 002 §A.4: 0.3) applies to both."""
    config = AutoConfig.from_pretrained(encoder_name_or_path)
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    encoder = AutoModel.from_pretrained(encoder_name_or_path, config=config, add_pooling_layer=False)
    settings = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
    decoder_config = AutoConfig.for_model(config.model_type, **{
        **settings, "is_decoder": True, "add_cross_attention": True, "tie_word_embeddings": True,
        "num_hidden_layers": decoder_layers or config.num_hidden_layers})
    decoder = AutoModelForCausalLM.from_config(decoder_config)
    decoder.get_input_embeddings().load_state_dict(encoder.get_input_embeddings().state_dict())
    decoder_embeddings = decoder.base_model.embeddings
    with torch.no_grad():
        for name in ("position_embeddings", "token_type_embeddings", "LayerNorm"):
            if hasattr(encoder.embeddings, name) and hasattr(decoder_embeddings, name):
                getattr(decoder_embeddings, name).load_state_dict(getattr(encoder.embeddings, name).state_dict())
    decoder.tie_weights()
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    set_special_tokens(model, tokenizer)
    return model


def load_encoder_decoder(path, tokenizer):
    """A saved encoder-decoder (stage 1's output) without the encoder's pooler, which no loss uses."""
    model = EncoderDecoderModel.from_pretrained(path)
    model.encoder.pooler = None
    set_special_tokens(model, tokenizer)
    return model


def set_special_tokens(model, tokenizer):
    model.config.decoder_start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
        else tokenizer.cls_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def freeze(model, stage):
    """Stage 1: the decoder alone trains; stage 2: encoder and decoder. Embeddings (and the tied output layer) stay
    fixed in both. Returns the trainable parameter count."""
    if stage not in STAGES:
        raise ValueError(f"MTE stage {stage!r}: valid stages are {STAGES}")
    fixed = {id(p) for module in (model.encoder.embeddings, model.decoder.base_model.embeddings)
             for p in module.parameters()}
    for name, param in model.named_parameters():
        trains = name.startswith("decoder.") or (stage == 2 and name.startswith("encoder."))
        param.requires_grad = trains and id(param) not in fixed
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_encoder(model, tokenizer, output_dir):
    """The (enhanced) encoder as a plain encoder directory with its tokenizer: `AutoModel` loads it."""
    model.encoder.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


class MTECollator:
    """Batches of sentence pairs {"source", "target"}: the encoder reads the N sources then the N targets, and the
    decoder predicts the N targets then the N sources (both translation directions); padding labels are -100."""

    def __init__(self, tokenizer, max_length=128, decoder_start_token_id=None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.start = decoder_start_token_id if decoder_start_token_id is not None else tokenizer.bos_token_id

    def __call__(self, rows):
        sources, targets = [r["source"] for r in rows], [r["target"] for r in rows]
        encoded = self.tokenizer(sources + targets, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
        labels = encoded["input_ids"][torch.arange(2 * len(rows)).roll(len(rows))]  # targets, then sources
        label_mask = encoded["attention_mask"][torch.arange(2 * len(rows)).roll(len(rows))]
        decoder_input_ids = shift_tokens_right(labels, self.tokenizer.pad_token_id, self.start)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
                "decoder_input_ids": decoder_input_ids,
                "decoder_attention_mask": torch.cat([torch.ones_like(label_mask[:, :1]), label_mask[:, :-1]], 1),
                "labels": labels.masked_fill(label_mask == 0, -100)}


class MTETrainer(XCLIPTrainer):
    """`XCLIPTrainer` for the MTE enhancement: stage 1 `losses.nmt_loss`, stage 2 `losses.mte_stage2_loss`
    (NMT + 2.0 x CTL at the fixed `ctl_temperature`)."""

    loss_is_scaled_for_ga = False  # both losses are means over sentences

    def __init__(self, *args, stage=1, ctl_temperature=0.07, ctl_weight=CTL_WEIGHT, **kwargs):
        super().__init__(*args, **kwargs)
        if stage not in STAGES:
            raise ValueError(f"MTE stage {stage!r}: valid stages are {STAGES}")
        self.stage, self.ctl_temperature, self.ctl_weight = stage, ctl_temperature, ctl_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    decoder_input_ids=inputs["decoder_input_ids"],
                    decoder_attention_mask=inputs["decoder_attention_mask"])
        loss = nmt_loss(out.logits, labels)
        if self.stage == 2:
            pooled = mean_pool(out.encoder_last_hidden_state, inputs["attention_mask"])
            n = pooled.shape[0] // 2
            loss = mte_stage2_loss(loss, pooled[:n], pooled[n:], temperature=self.ctl_temperature,
                                   ctl_weight=self.ctl_weight)
        return (loss, out) if return_outputs else loss
