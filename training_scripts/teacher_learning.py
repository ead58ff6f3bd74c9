"""Teacher learning: a multilingual student regresses a frozen teacher's vector of the English side of parallel pairs.

This is AltCLIP's stage 1 (seed paper 001 §3.1) and how M-CLIP models are made (Carlsson et al., 2022).

- **Student.** An AltCLIP-style model (`XAltCLIPModel.get_student_features`: the first-token state at the teacher's
  width) or an M-CLIP model (`MCLIPModel.get_text_features`: mean-pooled states through the linear map).
- **Teacher.** CLIP's text tower (pooling "clip": its pooled end-of-text state; before CLIP's text projection for
  AltCLIP, whose `text_projection` is CLIP's own, and after it for M-CLIP, whose linear map lands in CLIP's joint
  space), or any text encoder with "mean" or "cls" pooling (sentence-transformers-style distillation).
- **Pairs.** Every (English, target) row gives two training rows, the target sentence and the English sentence, and
  both regress the teacher vector of the English sentence (the EN-EN and EN-X pairs of seed 001 Table 7). English
  sentences are counted once, however many languages share them.
- **Frozen targets.** The teacher's vectors are computed once per English sentence and reused across epochs and runs
  through the library's one cache (`training_scripts.embeddings.cached_features`). The collator then hands the rows'
  vectors to `compute_loss`; without a cache it hands the teacher's tokens, and `compute_loss` runs the teacher.
- **Head initialisation.** The student's linear head (M-CLIP's `LinearTransformation`, AltCLIP's
  `text_transformation`) starts from the closed-form least-squares fit of the frozen student's features to the cached
  targets (`least_squares_head`), and training moves the whole student from there. A random head, as in
  sentence-transformers' distillation, spends the first steps, and with small data all of them, undoing its
  randomness.
"""
import logging

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection

from modeling_xclip import MCLIPModel, XAltCLIPModel
from modeling_xclip.losses import mean_pool, teacher_mse_loss
from training_scripts.embeddings import encode_text_batches
from training_scripts.training import XCLIPTrainer

logger = logging.getLogger(__name__)

POOLINGS = ("clip", "mean", "cls")
FAMILIES = {"altclip": XAltCLIPModel, "m-clip": MCLIPModel}
STAGE = {"altclip": "teacher_learning", "m-clip": "text"}  # `freeze(stage)`: what teacher learning trains


# --- the teacher --------------------------------------------------------------------------------------------------
class Teacher:
    """A frozen text encoder and its pooling: the targets of teacher learning.

    Args:
        model: a CLIP text tower (`CLIPTextModelWithProjection`, pooling "clip") or any encoder whose output has
            `last_hidden_state` (pooling "mean" or "cls").
        tokenizer: the teacher's tokenizer (English side).
        pooling: "clip" (the pooled end-of-text state), "mean" (masked mean of the token states) or "cls" (first
            token).
        projected: pooling "clip" only: CLIP's projected text embedding (M-CLIP's targets) instead of the pooled
            state before the projection (AltCLIP's targets).
        max_length: truncation of the English side.
    """

    def __init__(self, model, tokenizer, pooling, projected=False, max_length=None):
        if pooling not in POOLINGS:
            raise ValueError(f"teacher pooling {pooling!r}: valid poolings are {', '.join(POOLINGS)}")
        if pooling == "clip" and not isinstance(model, CLIPTextModelWithProjection):
            raise ValueError(f"teacher pooling 'clip' needs a CLIP text tower, got {type(model).__name__}: use "
                             "'mean' or 'cls' for other encoders")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.projected = projected
        self.max_length = max_length or min(getattr(tokenizer, "model_max_length", 512), 512)

    @classmethod
    def from_pretrained(cls, name_or_path, pooling, projected=False, max_length=None):
        """The teacher at a Hub id or directory: a CLIP checkpoint (its text tower) for "clip", any encoder else."""
        if pooling == "clip":
            model = CLIPTextModelWithProjection.from_pretrained(name_or_path)
        else:
            model = AutoModel.from_pretrained(name_or_path)
        return cls(model, AutoTokenizer.from_pretrained(name_or_path), pooling, projected, max_length)

    @property
    def width(self):
        config = self.model.config
        if self.pooling == "clip" and self.projected:
            return config.projection_dim
        return getattr(config, "hidden_size", None) or config.dim

    def tokenize(self, texts):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def __call__(self, input_ids, attention_mask):
        """(n, width) teacher vectors of tokenized English sentences."""
        if self.pooling == "clip":
            if self.projected:
                return self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
            # the pooled end-of-text state: what XAltCLIPModel.get_teacher_features returns
            return self.model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return states[:, 0] if self.pooling == "cls" else mean_pool(states, attention_mask)

    def encode(self, texts, batch_size=64, desc="teacher targets"):
        """(len(texts), width) float32 CPU teacher vectors, in the order given."""
        return encode_text_batches(self, self.tokenizer, texts, batch_size, self.max_length, desc,
                                   next(self.model.parameters()).device)


# --- the student --------------------------------------------------------------------------------------------------
def target_width(model):
    """The width the student regresses: AltCLIP's `text_transformation_dim`, M-CLIP's `numDims`."""
    if isinstance(model, XAltCLIPModel):
        return model.config.text_transformation_dim
    if isinstance(model, MCLIPModel):
        return model.config.numDims
    raise TypeError(f"teacher learning trains an XAltCLIPModel or an MCLIPModel, not {type(model).__name__}")


def check_widths(model, teacher):
    """The teacher's vectors must have the student's target width (raised before any training step)."""
    width = target_width(model)
    if teacher.width != width:
        raise ValueError(f"the teacher's vectors are {teacher.width}-d ({teacher.pooling} pooling) but the student "
                         f"({type(model).__name__}) regresses {width}-d vectors: choose a teacher of that width, or a "
                         "student built for it")


def student_head(model):
    """The linear map from the student's pooled features to the teacher's width (the part `least_squares_head`
    fits): M-CLIP's `LinearTransformation`, AltCLIP's `text_transformation`."""
    return model.text_transformation if isinstance(model, XAltCLIPModel) else model.LinearTransformation


def student_pooled(model, input_ids, attention_mask):
    """The student's features just before its head: AltCLIP's LayerNorm-ed first-token state, M-CLIP's masked mean
    of the encoder's states."""
    if isinstance(model, XAltCLIPModel):
        states = model._encode_tokens(model.text_model, input_ids, attention_mask).last_hidden_state
        return model.text_layer_norm(states[:, 0])
    states = model._encode_tokens(model.transformer, input_ids, attention_mask).last_hidden_state
    return mean_pool(states, attention_mask)


def student_features(model, input_ids, attention_mask):
    """The student's vector of each text, at the teacher's width: `get_student_features` (AltCLIP) or
    `get_text_features(...).pooler_output` (M-CLIP).

    It goes through `model(...)` so that a DistributedDataParallel wrapper sees the forward and synchronises the
    gradients; the models' forward needs an image side, so it gets one zero image vector (which costs nothing and
    takes no part in the loss).
    """
    core = getattr(model, "module", model)
    blank = torch.zeros(1, core.config.projection_dim, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, image_embeds=blank)
    if isinstance(core, XAltCLIPModel):  # the transformed states before `text_projection`, read at the first token
        return out.text_model_output.last_hidden_state[:, 0]
    return out.text_model_output.pooler_output


def least_squares_head(features, targets, ridge=0.0):
    """(weight (d_out, d_in), bias (d_out,)) minimising ||features @ weight.T + bias - targets||^2 + ridge * s *
    ||weight||^2, the closed-form fit of the head on frozen student features (in float64).

    `ridge` is relative to the features' scale s, their centred sum of squares per dimension (trace(Xc'Xc) / d), so
    one value suits any encoder; the bias is not penalised. A small ridge keeps the fit sane when the features are
    nearly collinear (a random or small encoder), where the plain fit's huge weights blow up at the first step.
    """
    n, d = features.shape
    x = torch.cat([features.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    y = targets.double()
    if ridge > 0:  # the penalty as d extra rows sqrt(ridge s) I on the weights, 0 on the bias, with targets 0
        centred = features.double() - features.double().mean(0)
        scale = centred.pow(2).sum() / d
        penalty = torch.cat([torch.eye(d, dtype=torch.float64), torch.zeros(d, 1, dtype=torch.float64)], dim=1)
        x = torch.cat([x, penalty * (ridge * scale) ** 0.5])
        y = torch.cat([y, torch.zeros(d, y.shape[1], dtype=torch.float64)])
    solution = torch.linalg.lstsq(x, y, driver="gelsd").solution
    return solution[:-1].T.float().contiguous(), solution[-1].float().contiguous()


@torch.no_grad()
def init_head(model, features, targets, ridge=0.0):
    """Set the student's head to `least_squares_head(features, targets)`; returns the fit's mean squared error."""
    weight, bias = least_squares_head(features, targets, ridge)
    head = student_head(model)
    head.weight.copy_(weight)
    head.bias.copy_(bias)
    return F.mse_loss(features @ weight.T + bias, targets).item()


def set_dropout(model, p):
    """Set the dropout of the student's text encoder (modules and config, so that the saved config says it)."""
    encoder = getattr(model, model.text_tower_name)
    for module in encoder.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if hasattr(model.config.text_config, name):
            setattr(model.config.text_config, name, p)


# --- the data -----------------------------------------------------------------------------------------------------
def build_pairs(datasets_by_language, english_column="source", target_column="caption"):
    """(rows, english): the training rows {"text", "target", "language"} and the distinct English sentences their
    `target` indexes. Each English sentence gives one EN-EN row; each (English, target) row gives one EN-X row."""
    english, index, rows = [], {}, []
    for language, ds in datasets_by_language.items():
        for source, caption in zip(ds[english_column], ds[target_column]):
            if source not in index:
                index[source] = len(english)
                english.append(source)
                rows.append({"text": source, "target": index[source], "language": "en"})
            rows.append({"text": caption, "target": index[source], "language": language})
    if not rows:
        raise ValueError("no parallel pairs to train on")
    return rows, english


class TeacherLearningCollator:
    """Batches of training rows: the student's tokens, and either the cached teacher vectors (`targets`, one row per
    English sentence) or the teacher's tokens of the English sentences (`english` with `teacher`).

    Args:
        tokenizer: the student's tokenizer; `text_template` (e.g. "query: {}") is applied to every student text.
        targets: (n_english, width) cached teacher vectors, or None.
        english, teacher: the English sentences and the `Teacher`, for the uncached path.
    """

    def __init__(self, tokenizer, max_length=None, text_template="{}", targets=None, english=None, teacher=None):
        if targets is None and (english is None or teacher is None):
            raise ValueError("the collator needs cached teacher targets, or the English sentences and the teacher")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.text_template = text_template or "{}"
        self.targets = targets
        self.english = english
        self.teacher = teacher

    def __call__(self, rows):
        batch = dict(self.tokenizer([self.text_template.format(row["text"]) for row in rows], padding=True,
                                    truncation=True, max_length=self.max_length, return_tensors="pt"))
        batch.pop("token_type_ids", None)
        index = torch.tensor([row["target"] for row in rows])
        if self.targets is not None:
            batch["teacher_embeds"] = self.targets[index]
        else:
            teacher = self.teacher.tokenize([self.english[i] for i in index.tolist()])
            batch["teacher_input_ids"] = teacher["input_ids"]
            batch["teacher_attention_mask"] = teacher["attention_mask"]
        return batch


class TeacherLearningTrainer(XCLIPTrainer):
    """`XCLIPTrainer` for teacher learning: `compute_loss` is `losses.teacher_mse_loss` between the student's vectors and
    the teacher's vectors of the English side (cached in the batch, or computed by `teacher` when the batch carries
    the teacher's tokens)."""

    # the loss is a mean over the batch: Trainer divides it by the gradient-accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs.get("teacher_embeds")
        if targets is None:
            if self.teacher is None:
                raise ValueError("the batch carries no cached teacher targets and the trainer has no teacher")
            self.teacher.model.to(inputs["teacher_input_ids"].device)
            targets = self.teacher(inputs["teacher_input_ids"], inputs["teacher_attention_mask"])
        student = student_features(model, inputs["input_ids"], inputs["attention_mask"])
        loss = teacher_mse_loss(student, targets)
        return (loss, {"student_embeds": student}) if return_outputs else loss
