"""Models of the three multilingual CLIP families (see configuration_xclip.py).

This file is remote code: `save_pretrained` copies it next to the weights and
`AutoModel.from_pretrained(dir, trust_remote_code=True)` imports it, so it imports public transformers API only.

All families share one API (`XCLIPPreTrainedModel`):
- `get_text_features` / `get_image_features` return `BaseModelOutputWithPooling` with the projected,
  unnormalised vector in `pooler_output` (the transformers 5 convention);
- `forward` returns `logits_per_image`, `logits_per_text`, `text_embeds`, `image_embeds` (L2-normalised), and takes
  precomputed `image_embeds` (what `get_image_features(...).pooler_output` gives) instead of `pixel_values`;
- `from_pretrained_towers(...)` assembles a model from pretrained parts (Hub ids or local directories);
- `freeze(stage)` leaves trainable exactly what the paper's training stage trains, and `trainable_parameters()`
  reports it.
"""

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AltCLIPModel,
    AutoConfig,
    AutoModel,
    CLIPTextModelWithProjection,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
    XLMRobertaConfig,
)
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .configuration_xclip import MCLIPConfig, XAltCLIPConfig, XMCLIPConfig
from .losses import contrastive_loss, trikd_loss
from .pet_xclip import attach_pet_hosts

logger = logging.getLogger(__name__)


@dataclass
class XCLIPOutput(ModelOutput):
    """Output of `forward`: CLIP's fields, so that transformers' zero-shot pipelines run on these models."""

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self):
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


def _text_encoder_kwargs(config):
    # BERT-family encoders (XLM-R, mBERT, LaBSE) carry a pooler none of the families uses; building them without it
    # keeps every parameter in the graph (DDP needs that). Encoders without a pooler take no such argument.
    return {"add_pooling_layer": False} if config.model_type in ("xlm-roberta", "roberta", "bert", "camembert") else {}


def build_text_encoder(config):
    """A randomly initialised text tower from its config (weights are loaded later, never inside `__init__`)."""
    return AutoModel.from_config(config, **_text_encoder_kwargs(config))


def _clip_sub_config(name_or_path, key):
    """The vision or text sub-config of a CLIP checkpoint, keeping the top-level `projection_dim` of a full CLIP."""
    config = AutoConfig.from_pretrained(name_or_path)
    sub = getattr(config, key, None)
    if sub is None:
        return config
    sub.projection_dim = config.projection_dim
    return sub


class XCLIPPreTrainedModel(PreTrainedModel):
    """Shared machinery of the three families: image tower, similarity logits, loss, freezing, assembling."""

    base_model_prefix = "xclip"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _keys_to_ignore_on_load_unexpected = [r"pooler\."]
    # stage name -> module-name prefixes left trainable by `freeze(stage)`; everything else is frozen
    TRAINING_STAGES: dict = {}

    # --- building -------------------------------------------------------------------------------------------------
    def _build_clip_towers(self, config):
        self.vision_model = (CLIPVisionModelWithProjection(config.vision_config)
                             if config.vision_config is not None else None)
        self.clip_text_model = (CLIPTextModelWithProjection(config.clip_text_config)
                                if config.clip_text_config is not None else None)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, XCLIPPreTrainedModel):
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)

    def remove_clip_text_model(self):
        """Drop the CLIP text tower (a training-time teacher) so that the saved inference model leaves it out."""
        self.clip_text_model = None
        self.config.clip_text_config = None
        return self

    @classmethod
    def from_pretrained_towers(cls, text, clip=None, vision=None, clip_text=None, **config_kwargs):
        """Assemble a model from pretrained parts, then load each part's weights.

        Args:
            text: Hub id or directory of the multilingual text encoder (e.g. "xlm-roberta-large").
            clip: Hub id or directory of a CLIP model; shorthand for `vision=clip, clip_text=clip`.
            vision: CLIP checkpoint whose vision tower (and visual projection) is used.
            clip_text: CLIP checkpoint whose text tower (and text projection) is used: the teacher.
            config_kwargs: further arguments of the family's config (e.g. `x_projector_num_layers`).
        The configs are composed first and the model is built from them; weights are loaded afterwards.
        """
        vision = vision or clip
        clip_text = clip_text or clip
        config = cls.config_class(
            text_config=AutoConfig.from_pretrained(text),
            vision_config=_clip_sub_config(vision, "vision_config") if vision else None,
            clip_text_config=_clip_sub_config(clip_text, "text_config") if clip_text else None,
            **cls._towers_config_kwargs(text, config_kwargs),
        )
        model = cls(config)
        text_tower = AutoModel.from_pretrained(text, config=config.text_config, **_text_encoder_kwargs(config.text_config))
        getattr(model, model.text_tower_name).load_state_dict(text_tower.state_dict())
        if vision:
            model.vision_model.load_state_dict(
                CLIPVisionModelWithProjection.from_pretrained(vision, config=config.vision_config).state_dict())
        if clip_text:
            model.clip_text_model.load_state_dict(
                CLIPTextModelWithProjection.from_pretrained(clip_text, config=config.clip_text_config).state_dict())
            model._init_from_clip_text()
        return model

    @classmethod
    def _towers_config_kwargs(cls, text, config_kwargs):
        return config_kwargs

    def _init_from_clip_text(self):
        """Hook: copy what a family takes over from the CLIP text tower once it is loaded."""

    # --- features -------------------------------------------------------------------------------------------------
    def _clip_image_features(self, pixel_values, **kwargs):
        if self.vision_model is None:
            raise ValueError(f"this {type(self).__name__} has no image tower (a text-only checkpoint): pass "
                             "precomputed `image_embeds` instead of `pixel_values`")
        out = self.vision_model(pixel_values=pixel_values, **kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.image_embeds,
                                          hidden_states=out.hidden_states, attentions=out.attentions)

    def get_image_features(self, pixel_values, **kwargs):
        """Projected image vector in `pooler_output`."""
        return self._clip_image_features(pixel_values, **kwargs)

    def _encode_tokens(self, encoder, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **kwargs):
        # optional inputs are passed only when given: not every encoder takes token_type_ids / position_ids
        extra = {k: v for k, v in (("token_type_ids", token_type_ids), ("position_ids", position_ids)) if v is not None}
        return encoder(input_ids=input_ids, attention_mask=attention_mask, **extra, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_embeds=None,
                token_type_ids=None, position_ids=None, return_loss=False, **kwargs):
        """CLIP-style similarity logits between each text and each image (`logits_per_text[i, j]`: text i, image j).

        `image_embeds`, if given, is what `get_image_features(...).pooler_output` returns (e.g. cached on disk).
        With `return_loss`, the symmetric contrastive loss of a batch of aligned pairs (row i with image i):
        `losses.contrastive_loss` at the learnable temperature.
        """
        if image_embeds is not None and image_embeds.shape[-1] != self.config.projection_dim:
            raise ValueError(f"image_embeds have {image_embeds.shape[-1]} dimensions but this model's joint space has "
                             f"{self.config.projection_dim}: use the image tower (or features) it was trained with")
        text_out = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask,
                                          token_type_ids=token_type_ids, position_ids=position_ids, **kwargs)
        vision_out = None
        if image_embeds is None:
            if pixel_values is None:
                raise ValueError("forward needs `pixel_values` or precomputed `image_embeds`")
            vision_out = self.get_image_features(pixel_values=pixel_values)
            image_embeds = vision_out.pooler_output
        text_embeds = F.normalize(text_out.pooler_output, dim=-1)
        image_embeds = F.normalize(image_embeds, dim=-1)
        logits_per_text = text_embeds @ image_embeds.t().to(text_embeds.dtype) * self.logit_scale.exp()
        loss = contrastive_loss(text_embeds, image_embeds, logit_scale=self.logit_scale) if return_loss else None
        return XCLIPOutput(loss=loss, logits_per_image=logits_per_text.t(), logits_per_text=logits_per_text,
                           text_embeds=text_embeds, image_embeds=image_embeds, text_model_output=text_out,
                           vision_model_output=vision_out)

    # --- training stages ------------------------------------------------------------------------------------------
    def freeze(self, stage):
        """Freeze everything but what training `stage` trains (see `TRAINING_STAGES`); returns the report."""
        if stage not in self.TRAINING_STAGES:
            raise ValueError(f"unknown training stage {stage!r} for {type(self).__name__}; "
                             f"valid stages: {sorted(self.TRAINING_STAGES)}")
        prefixes = self.TRAINING_STAGES[stage]
        for name, param in self.named_parameters():
            param.requires_grad = any(name == p or name.startswith(p + ".") for p in prefixes)
        return self.trainable_parameters()

    def trainable_parameters(self):
        """{"trainable": n, "total": n, "percent": x, "modules": {top-level module: trainable count}}."""
        total = trainable = 0
        modules = {}
        for name, param in self.named_parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
                top = name.split(".")[0]
                modules[top] = modules.get(top, 0) + param.numel()
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
                "modules": modules}


class XAltCLIPModel(XCLIPPreTrainedModel):
    """AltCLIP-style: CLIP image tower + XLM-R-family text tower (seed paper 001).

    Module layout: `text_model` (encoder), `text_layer_norm`, `text_transformation`, `text_projection`,
    `vision_model` (CLIP vision tower with its projection), `clip_text_model` (optional teacher), `logit_scale`.
    Stages: "teacher_learning" (stage 1: the student text path up to the teacher's width; MSE against
    `get_teacher_features`) and "contrastive" (stage 2: the whole text side, image tower frozen, as in LiT).
    """

    config_class = XAltCLIPConfig
    text_tower_name = "text_model"
    TRAINING_STAGES = {
        "teacher_learning": ("text_model", "text_layer_norm", "text_transformation"),
        "contrastive": ("text_model", "text_layer_norm", "text_transformation", "text_projection", "logit_scale"),
    }

    def __init__(self, config: XAltCLIPConfig):
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.text_model = build_text_encoder(config.text_config)
        self.text_layer_norm = nn.LayerNorm(hidden, eps=getattr(config.text_config, "layer_norm_eps", 1e-5))
        self.text_transformation = nn.Linear(hidden, config.text_transformation_dim)
        self.text_projection = nn.Linear(config.text_transformation_dim, config.projection_dim, bias=False)
        self._build_clip_towers(config)
        self.post_init()

    def _init_from_clip_text(self):
        # the student is trained to CLIP's pre-projection text space, so CLIP's text projection carries it into the
        # joint space (transformers' AltCLIP has the same two maps)
        teacher_proj = self.clip_text_model.text_projection.weight
        if teacher_proj.shape != self.text_projection.weight.shape:
            logger.warning("text_projection %s cannot take CLIP's text projection %s: it stays randomly initialised",
                           tuple(self.text_projection.weight.shape), tuple(teacher_proj.shape))
            return
        with torch.no_grad():
            self.text_projection.weight.copy_(teacher_proj)

    def _student_states(self, input_ids, attention_mask=None, **kwargs):
        out = self._encode_tokens(self.text_model, input_ids, attention_mask, **kwargs)
        return out, self.text_transformation(self.text_layer_norm(out.last_hidden_state))

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        """Projected text vector (first token after LayerNorm, transformation and projection) in `pooler_output`."""
        out, states = self._student_states(input_ids, attention_mask, **kwargs)
        return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=self.text_projection(states[:, 0]),
                                          hidden_states=out.hidden_states, attentions=out.attentions)

    def get_student_features(self, input_ids, attention_mask=None, **kwargs):
        """Stage 1 student output: the first-token state at the teacher's width (before `text_projection`)."""
        return self._student_states(input_ids, attention_mask, **kwargs)[1][:, 0]

    @torch.no_grad()
    def get_teacher_features(self, input_ids, attention_mask=None):
        """Stage 1 target: CLIP's text embedding of the English side (pooled end-of-text state, before projection).

        `input_ids` come from CLIP's tokenizer.
        """
        if self.clip_text_model is None:
            raise ValueError("this model has no CLIP text tower (teacher): build it with clip_text_config, e.g. "
                             "from_pretrained_towers(..., clip_text=<CLIP checkpoint>)")
        return self.clip_text_model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    @classmethod
    def from_altclip(cls, name_or_path):
        """Load a checkpoint saved by transformers' `AltCLIPModel` (the BAAI/AltCLIP format); same outputs."""
        source = AltCLIPModel.from_pretrained(name_or_path)
        text = source.config.text_config.to_dict()
        for key in ("model_type", "project_dim", "architectures", "transformers_version"):
            text.pop(key, None)
        vision = source.config.vision_config.to_dict()
        vision.pop("model_type", None)
        vision["projection_dim"] = source.config.projection_dim
        config = XAltCLIPConfig(text_config=XLMRobertaConfig(**text), vision_config=vision,
                                text_transformation_dim=source.config.text_config.project_dim,
                                logit_scale_init_value=source.config.logit_scale_init_value)
        model = cls(config)
        # Parameter names of AltCLIP's towers change across transformers releases while their architecture does not:
        # copy tower by tower, in parameter order, checking every shape.
        pairs = [(source.text_model.roberta, model.text_model), (source.text_model.pre_LN, model.text_layer_norm),
                 (source.text_model.transformation, model.text_transformation),
                 (source.text_projection, model.text_projection), (source.vision_model, model.vision_model.vision_model),
                 (source.visual_projection, model.vision_model.visual_projection)]
        with torch.no_grad():
            for src, dst in pairs:
                src_params, dst_params = list(src.named_parameters()), list(dst.named_parameters())
                if len(src_params) != len(dst_params) or any(
                        a.shape != b.shape for (_, a), (_, b) in zip(src_params, dst_params)):
                    raise ValueError(f"AltCLIP checkpoint {name_or_path!r}: its {type(src).__name__} does not map onto "
                                     f"{cls.__name__}'s {type(dst).__name__}")
                for (_, a), (_, b) in zip(src_params, dst_params):
                    b.copy_(a)
            model.logit_scale.copy_(source.logit_scale)
        return model


class XMCLIPModel(XCLIPPreTrainedModel):
    """mCLIP (TriKD, seed paper 002): frozen CLIP towers, frozen MTE, a shared CLIP-projector and an X-projector.

    Module layout: `vision_model` and `clip_text_model` (frozen CLIP), `clip_projector` (one bias-free linear map
    shared by CLIP image and CLIP text embeddings), `text_model` (frozen MTE), `x_projector` (transformer layers over
    the MTE token states), `x_projection` (X-projector output at end-of-sequence -> shared space), `logit_scale`.
    Stage "trikd": only the two projectors and the logit scale train (also used to fine-tune, as in the paper).
    """

    config_class = XMCLIPConfig
    text_tower_name = "text_model"
    TRAINING_STAGES = {"trikd": ("clip_projector", "x_projector", "x_projection", "logit_scale")}

    def __init__(self, config: XMCLIPConfig):
        super().__init__(config)
        text = config.text_config
        self.text_model = build_text_encoder(text)
        layer = nn.TransformerEncoderLayer(
            d_model=text.hidden_size, nhead=config.x_projector_num_heads,
            dim_feedforward=config.x_projector_intermediate_size,
            dropout=getattr(text, "hidden_dropout_prob", 0.1), activation="gelu",
            layer_norm_eps=getattr(text, "layer_norm_eps", 1e-5), batch_first=True)
        # post-LayerNorm layers, the structure of an XLM-R layer, from torch's public API
        self.x_projector = nn.TransformerEncoder(layer, config.x_projector_num_layers, enable_nested_tensor=False)
        self.x_projection = nn.Linear(text.hidden_size, config.projection_dim, bias=False)
        self.clip_projector = nn.Linear(config.clip_embed_dim, config.projection_dim, bias=False)
        self._build_clip_towers(config)
        self.post_init()

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        """Shared-space text vector: X-projector output at each row's end-of-sequence token, in `pooler_output`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self._encode_tokens(self.text_model, input_ids, attention_mask, **kwargs)
        states = self.x_projector(out.last_hidden_state, src_key_padding_mask=attention_mask == 0)
        # the end-of-sequence token is the last attended position, whichever side the padding is on
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        eos = (positions * (attention_mask != 0)).argmax(dim=1)
        pooled = states[torch.arange(states.shape[0], device=states.device), eos]
        return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=self.x_projection(pooled),
                                          hidden_states=out.hidden_states, attentions=out.attentions)

    def get_image_features(self, pixel_values, **kwargs):
        """Shared-space image vector: the CLIP image embedding through the CLIP-projector, in `pooler_output`."""
        out = self._clip_image_features(pixel_values, **kwargs)
        out.pooler_output = self.clip_projector(out.pooler_output)
        return out

    def get_clip_text_features(self, input_ids, attention_mask=None):
        """Shared-space English text vector: CLIP's text embedding through the CLIP-projector (the TTC teacher)."""
        if self.clip_text_model is None:
            raise ValueError("this mCLIP model was saved without its CLIP text tower; it is only needed in training: "
                             "rebuild with from_pretrained_towers(..., clip=<CLIP checkpoint>)")
        out = self.clip_text_model(input_ids=input_ids, attention_mask=attention_mask)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state,
                                          pooler_output=self.clip_projector(out.text_embeds))

    def project_clip_embeds(self, clip_embeds):
        """CLIP-projector on cached CLIP embeddings (image or text): train the projectors without the CLIP towers."""
        return self.clip_projector(clip_embeds)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_embeds=None,
                clip_input_ids=None, clip_attention_mask=None, english_mask=None, return_loss=False, **kwargs):
        """As the shared `forward`; with `return_loss` and the English side (`clip_input_ids`, from CLIP's tokenizer)
        the loss is the TriKD objective ITC + ttc_weight x TTC (`losses.trikd_loss`), TTC at the fixed
        `ttc_temperature` and only on the rows of `english_mask` (all rows when None)."""
        output = super().forward(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                 image_embeds=image_embeds, return_loss=False, **kwargs)
        if return_loss:
            clip_text = None
            if clip_input_ids is not None:
                clip_text = F.normalize(self.get_clip_text_features(clip_input_ids, clip_attention_mask).pooler_output,
                                        dim=-1)
            output.loss = trikd_loss(output.text_embeds, output.image_embeds, self.logit_scale, clip_text,
                                     english_mask=english_mask, ttc_weight=self.config.ttc_weight,
                                     ttc_temperature=self.config.ttc_temperature)
        return output


class MCLIPModel(XCLIPPreTrainedModel):
    """M-CLIP (seed paper 000): text encoder + masked mean pooling + linear map into CLIP's joint space.

    Module names follow the published checkpoints: `transformer` (the encoder: XLM-R's attention projections are
    `...attention.self.{query,key,value}`, the targets of PEFT's LoRA) and `LinearTransformation`. An optional CLIP
    vision tower (`vision_model`) gives image features; without it the model is text-only.
    Stages: "pet" (all frozen: a PEFT method adds what trains), "linear" (the linear map only), "text" (encoder and
    linear map).
    """

    config_class = MCLIPConfig
    text_tower_name = "transformer"
    # published M-CLIP checkpoints are text encoders: they carry no logit scale (it keeps its initial value)
    _keys_to_ignore_on_load_missing = [r"^logit_scale$"]
    TRAINING_STAGES = {"pet": (), "linear": ("LinearTransformation",), "text": ("transformer", "LinearTransformation")}

    def __init__(self, config: MCLIPConfig):
        super().__init__(config)
        self.transformer = build_text_encoder(config.text_config)
        self.LinearTransformation = nn.Linear(config.transformerDimensions, config.numDims)
        # empty, parameter-free hosts of the per-language Adapter and Compacter heads (pet_xclip.py; needs PEFT)
        attach_pet_hosts(self.transformer)
        self._build_clip_towers(config)
        self.post_init()

    @classmethod
    def _towers_config_kwargs(cls, text, config_kwargs):
        return {"modelBase": text, **config_kwargs}

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        """Masked mean of the encoder's token states, mapped linearly into CLIP space, in `pooler_output`."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self._encode_tokens(self.transformer, input_ids, attention_mask, **kwargs)
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        mean = (out.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state,
                                          pooler_output=self.LinearTransformation(mean),
                                          hidden_states=out.hidden_states, attentions=out.attentions)


__all__ = ["XCLIPOutput", "XCLIPPreTrainedModel", "XAltCLIPModel", "XMCLIPModel", "MCLIPModel"]
