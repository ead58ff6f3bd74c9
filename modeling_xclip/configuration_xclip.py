"""Configurations of the three multilingual CLIP families.

This file is remote code: it is copied next to every saved model and imported by
`AutoConfig.from_pretrained(dir, trust_remote_code=True)`, so it imports public transformers API only.

Every config is composed of sub-configs (the towers) and holds no weights:
- `XAltCLIPConfig`   AltCLIP-style: CLIP vision tower + XLM-R-family text tower (seed paper 001).
- `XMCLIPConfig`     mCLIP / TriKD: frozen CLIP towers + frozen multilingual text encoder (MTE) + projectors
                     (seed paper 002).
- `MCLIPConfig`      M-CLIP: text encoder + mean pooling + linear map, reading the published Hub format
                     (seed paper 000).
"""

import os

from transformers import AutoConfig, BertConfig, CLIPTextConfig, CLIPVisionConfig, DistilBertConfig, PretrainedConfig, XLMRobertaConfig


def _as_config(value, config_class):
    """A sub-config from a config, a dict (as read from config.json) or None (kept None: optional tower)."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"a sub-config must be a dict or a PretrainedConfig, got {type(value).__name__}")
    if config_class is AutoConfig:
        value = dict(value)
        model_type = value.pop("model_type", None)
        if model_type is None:
            raise ValueError("the text_config dict has no 'model_type': cannot tell which encoder it describes")
        return AutoConfig.for_model(model_type, **value)
    value = {k: v for k, v in value.items() if k != "model_type"}
    return config_class(**value)


class _XCLIPBaseConfig(PretrainedConfig):
    """Shared parts: a text tower of any encoder type, an optional CLIP vision tower, an optional CLIP text tower.

    `sub_configs` is the transformers convention that names the nested configs (used for serialisation and for
    propagating the attention implementation).
    """

    sub_configs = {"text_config": AutoConfig, "vision_config": CLIPVisionConfig, "clip_text_config": CLIPTextConfig}

    def __init__(
        self,
        text_config=None,
        vision_config=None,
        clip_text_config=None,
        logit_scale_init_value=2.6592,
        initializer_range=0.02,
        **kwargs,
    ):
        self.text_config = _as_config(text_config, AutoConfig)
        self.vision_config = _as_config(vision_config, CLIPVisionConfig)
        self.clip_text_config = _as_config(clip_text_config, CLIPTextConfig)
        self.logit_scale_init_value = logit_scale_init_value
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    def to_dict(self):
        """As saved: the towers' configs without the local directory they were read from (`_name_or_path`), so that
        a published config names no folder of this machine."""
        output = super().to_dict()
        for key in self.sub_configs:
            if isinstance(output.get(key), dict):
                output[key].pop("_name_or_path", None)
        return output

    @property
    def clip_embed_dim(self):
        """Width of CLIP's own joint space (the projected CLIP image / text embedding)."""
        if self.vision_config is not None:
            return self.vision_config.projection_dim
        if self.clip_text_config is not None:
            return self.clip_text_config.projection_dim
        return None

    def _check_clip_towers(self):
        if self.vision_config is not None and self.clip_text_config is not None:
            v, t = self.vision_config.projection_dim, self.clip_text_config.projection_dim
            if v != t:
                raise ValueError(f"vision_config.projection_dim ({v}) != clip_text_config.projection_dim ({t}): "
                                 "the CLIP towers must come from the same CLIP model")


class XAltCLIPConfig(_XCLIPBaseConfig):
    r"""AltCLIP-style model: CLIP's image tower and an XLM-R-family text tower.

    Text path (as transformers' `AltCLIPModel`): encoder token states -> LayerNorm -> linear "transformation" to
    `text_transformation_dim` (the teacher's width: CLIP's text hidden size) -> first token -> `text_projection`.
    Image path: CLIP vision pooled output -> visual projection (inside the CLIP vision tower).

    Args:
        text_config: config of the multilingual encoder (any encoder `AutoConfig` describes; default XLM-R base).
        vision_config (`CLIPVisionConfig`): CLIP image tower; its `projection_dim` is the joint space width.
        clip_text_config (`CLIPTextConfig`, optional): CLIP text tower, the teacher of stage 1 (teacher learning).
            Needed only in training; an inference model leaves it out.
        text_transformation_dim (`int`): width the text token states are mapped to (AltCLIP's `project_dim`).
        logit_scale_init_value (`float`): initial log of the inverse temperature (CLIP: log(1/0.07)).
    """

    model_type = "xclip-altclip"

    def __init__(self, text_config=None, vision_config=None, clip_text_config=None, text_transformation_dim=None,
                 **kwargs):
        super().__init__(
            text_config=XLMRobertaConfig() if text_config is None else text_config,
            vision_config=CLIPVisionConfig() if vision_config is None else vision_config,
            clip_text_config=clip_text_config,
            **kwargs,
        )
        if text_transformation_dim is None:
            text_transformation_dim = (self.clip_text_config.hidden_size if self.clip_text_config is not None
                                       else self.text_config.hidden_size)
        self.text_transformation_dim = text_transformation_dim
        self._check_clip_towers()

    @property
    def projection_dim(self):
        return self.vision_config.projection_dim


class XMCLIPConfig(_XCLIPBaseConfig):
    r"""mCLIP (TriKD): frozen CLIP towers + frozen multilingual text encoder (MTE), aligned by two projectors.

    - CLIP-projector: ONE bias-free linear map `clip_embed_dim -> projection_dim`, shared by the CLIP image embedding
      and the CLIP text embedding.
    - X-projector: `x_projector_num_layers` randomly initialised transformer layers over the MTE token states, read
      at each row's end-of-sequence token, then a bias-free linear map `hidden -> projection_dim` (needed because the
      MTE width differs from the shared space; the paper leaves this map implicit).

    Args:
        text_config: the MTE config (XLM-R family).
        vision_config (`CLIPVisionConfig`): CLIP image tower (with CLIP's visual projection).
        clip_text_config (`CLIPTextConfig`, optional): CLIP text tower, the English teacher of the text-text loss.
            Only needed in training; a saved inference model may leave it out.
        projection_dim (`int`): width of the shared space (default: CLIP's joint width).
        x_projector_num_layers (`int`, defaults to 2): transformer layers of the X-projector (paper: 2).
        x_projector_num_heads / x_projector_intermediate_size: default to the MTE's.
        logit_scale_init_value (`float`): learnable image-text temperature, initialised at 0.07 (log(1/0.07)).
        ttc_temperature (`float`, defaults to 0.07): fixed temperature of the text-text contrastive loss.
        ttc_weight (`float`, defaults to 0.1): weight of the text-text loss (lambda in the paper).
    """

    model_type = "xclip-mclip"

    def __init__(self, text_config=None, vision_config=None, clip_text_config=None, projection_dim=None,
                 x_projector_num_layers=2, x_projector_num_heads=None, x_projector_intermediate_size=None,
                 ttc_temperature=0.07, ttc_weight=0.1, **kwargs):
        super().__init__(
            text_config=XLMRobertaConfig() if text_config is None else text_config,
            vision_config=CLIPVisionConfig() if vision_config is None else vision_config,
            clip_text_config=clip_text_config,
            **kwargs,
        )
        self._check_clip_towers()
        self.projection_dim = self.clip_embed_dim if projection_dim is None else projection_dim
        self.x_projector_num_layers = x_projector_num_layers
        self.x_projector_num_heads = x_projector_num_heads or self.text_config.num_attention_heads
        self.x_projector_intermediate_size = x_projector_intermediate_size or self.text_config.intermediate_size
        if self.text_config.hidden_size % self.x_projector_num_heads:
            raise ValueError(f"x_projector_num_heads ({self.x_projector_num_heads}) must divide the MTE hidden size "
                             f"({self.text_config.hidden_size})")
        self.ttc_temperature = ttc_temperature
        self.ttc_weight = ttc_weight


# Encoders the published M-CLIP checkpoints are built on. Their config.json names the base (`modelBase`) but does not
# carry its config, and the Hub may be out of reach: these are the base configs, as published by their authors.
_XLMR = dict(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
             pad_token_id=1, bos_token_id=0, eos_token_id=2)
_BERT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             max_position_embeddings=512, type_vocab_size=2)
_KNOWN_BASES = {
    "xlm-roberta-base": lambda: XLMRobertaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                                 intermediate_size=3072, **_XLMR),
    "xlm-roberta-large": lambda: XLMRobertaConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                  intermediate_size=4096, **_XLMR),
    "bert-base-multilingual-cased": lambda: BertConfig(vocab_size=119547, **_BERT),
    "bert-base-multilingual-uncased": lambda: BertConfig(vocab_size=105879, **_BERT),
    "labse": lambda: BertConfig(vocab_size=501153, **_BERT),
    "distilbert-base-multilingual-cased": lambda: DistilBertConfig(vocab_size=119547, dim=768, n_layers=6, n_heads=12,
                                                                   hidden_dim=3072),
}
_BASE_ALIASES = {"facebookai/xlm-roberta-base": "xlm-roberta-base", "facebookai/xlm-roberta-large": "xlm-roberta-large",
                 "google-bert/bert-base-multilingual-cased": "bert-base-multilingual-cased",
                 "google-bert/bert-base-multilingual-uncased": "bert-base-multilingual-uncased",
                 "distilbert/distilbert-base-multilingual-cased": "distilbert-base-multilingual-cased",
                 "sentence-transformers/labse": "labse", "setu4993/labse": "labse"}


def resolve_model_base(model_base):
    """The encoder config of an M-CLIP `modelBase`: a local directory, or one of the known published bases."""
    if os.path.isdir(model_base):
        return AutoConfig.from_pretrained(model_base)
    key = _BASE_ALIASES.get(model_base.lower(), model_base.lower())
    if key not in _KNOWN_BASES:
        known = sorted(set(_KNOWN_BASES) | set(_BASE_ALIASES))
        raise ValueError(f"unknown M-CLIP modelBase {model_base!r}: give a local directory holding its config.json, "
                         f"or one of {known}")
    return _KNOWN_BASES[key]()


class MCLIPConfig(_XCLIPBaseConfig):
    r"""M-CLIP: a multilingual text encoder, masked mean pooling and a linear map into CLIP's joint space.

    Reads the published Hub format as is: `config.json` with `"model_type": "M-CLIP"`, `modelBase`,
    `numDims` (CLIP joint width) and `transformerDimensions` (encoder width). When `text_config` is absent (published
    checkpoints), it is resolved offline from `modelBase` (see `resolve_model_base`).

    An optional CLIP vision tower (`vision_config`, with its projection to `numDims`) gives image features; without
    it the model is text-only and is evaluated against precomputed image embeddings.
    """

    model_type = "M-CLIP"

    def __init__(self, modelBase="xlm-roberta-large", numDims=None, transformerDimensions=None, text_config=None,
                 vision_config=None, **kwargs):
        if text_config is None:
            text_config = resolve_model_base(modelBase)
        super().__init__(text_config=text_config, vision_config=vision_config, **kwargs)
        self.modelBase = modelBase
        hidden = getattr(self.text_config, "hidden_size", None) or self.text_config.dim
        if transformerDimensions is not None and transformerDimensions != hidden:
            raise ValueError(f"transformerDimensions ({transformerDimensions}) does not match the hidden size of "
                             f"modelBase {modelBase!r} ({hidden})")
        self.transformerDimensions = hidden
        if numDims is None:
            numDims = self.vision_config.projection_dim if self.vision_config is not None else 768
        if self.vision_config is not None and self.vision_config.projection_dim != numDims:
            raise ValueError(f"numDims ({numDims}) != vision_config.projection_dim ({self.vision_config.projection_dim})")
        self.numDims = numDims

    @property
    def projection_dim(self):
        return self.numDims

    def to_dict(self):
        """As saved: a `modelBase` that is a local directory is kept by its last part only, so that a published
        config names no folder of this machine (the saved `text_config` describes the encoder: nothing reads it)."""
        output = super().to_dict()
        if os.path.isabs(self.modelBase) or os.path.isdir(self.modelBase):
            output["modelBase"] = os.path.basename(os.path.normpath(self.modelBase))
        return output
