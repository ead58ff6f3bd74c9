"""The training objectives of the three families, as pure functions: one place for every loss.

This file is remote code: `modeling_xclip.py` imports it relatively, so `save_pretrained` copies it next to the
weights and the models' `forward(return_loss=True)` use these same functions wherever the model is loaded. It imports
torch only.

Distributed training. `contrastive_loss` gathers the features of all processes with gradients
(`torch.distributed.nn.functional.all_gather`, whose backward sums the gradients of every process into each process's
own rows), so every process sees the global batch of negatives. Each process then computes the "local loss" of
open_clip: its own rows against all processes' rows, normalised so that the mean of the processes' losses is the loss
of the global batch, and so that the gradients that DDP averages across processes are the global batch's gradients.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

# CLIP clamps its learnable inverse temperature at 100 (a temperature of at least 0.01)
MAX_LOGIT_SCALE = math.log(100.0)


def _world():
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features):
    """The rows of every process concatenated in rank order, gradients flowing back to each process's own rows.

    Every process must pass the same number of rows (a contrastive batch per process); without a process group (or
    with one process) the features are returned as they are.
    """
    rank, world = _world()
    if world == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros(1, dtype=torch.long, device=features.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([features.shape[0]], device=features.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"processes hold different batch sizes {[int(s) for s in sizes]}: a gathered contrastive "
                         "loss needs equal per-process batches (keep the dataloader's even_batches on)")
    return torch.cat(all_gather(features.contiguous()), dim=0)


def inverse_temperature(logit_scale=None, temperature=None):
    """1/τ from a learnable `logit_scale` (log 1/τ, clamped as CLIP clamps it) or from a fixed `temperature` τ."""
    if (logit_scale is None) == (temperature is None):
        raise ValueError("give exactly one of logit_scale (learnable, log 1/τ) and temperature (fixed τ)")
    if logit_scale is not None:
        return logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    return 1.0 / temperature


def contrastive_loss(a, b, logit_scale=None, temperature=None, mask=None, gather=True):
    """CLIP's symmetric InfoNCE, seed paper 002 eq. 1 applied both ways (eqs. 2 and 3): 1/2 [l(a, b) + l(b, a)].

    l(x, y) = -1/N sum_i log( exp(x_i.y_i / τ) / sum_j exp(x_i.y_j / τ) ): row i of `a` and row i of `b` are a
    positive pair, the other rows of the (global) batch are the negatives.

    Args:
        a, b: (n, d) L2-normalised embeddings of this process's batch.
        logit_scale: learnable log(1/τ) (a 0-dim tensor; clamped at log 100 as in CLIP), or
        temperature: a fixed τ (e.g. 0.07 for TriKD's TTC).
        mask: optional (n,) bool, the rows that take part (e.g. the rows with an English side for TTC); the others
            are neither queries nor negatives. A batch with no such row gives a zero loss (still in the graph).
        gather: under several processes, gather the features of all processes (see the module docstring).
    """
    scale = inverse_temperature(logit_scale, temperature)
    rank, world = _world() if gather else (0, 1)
    n = a.shape[0]
    if mask is None:
        mask = torch.ones(n, dtype=torch.bool, device=a.device)
    all_a, all_b = (gather_features(a), gather_features(b)) if world > 1 else (a, b)
    all_mask = gather_features(mask.to(torch.float32)).bool() if world > 1 else mask
    labels = torch.arange(n, device=a.device) + rank * n
    total = all_mask.sum()
    if total == 0:
        return (a.sum() + b.sum()) * 0.0
    loss = a.new_zeros(())
    for queries, keys in ((a, all_b), (b, all_a)):
        logits = scale * queries @ keys.t()
        logits = logits.masked_fill(~all_mask[None, :], float("-inf"))
        rows = F.cross_entropy(logits[mask], labels[mask], reduction="sum")
        # sum over this process's rows / (global rows / world): the mean over processes is the global mean
        loss = loss + rows / (total.to(a.dtype) / world)
    return loss / 2


def teacher_mse_loss(student, teacher):
    """Teacher learning (seed paper 001, §3.1 stage 1): the mean squared error between the student's vector and the
    teacher's vector of the same (English) sentence, averaged over rows and dimensions."""
    if student.shape != teacher.shape:
        raise ValueError(f"student vectors {tuple(student.shape)} and teacher vectors {tuple(teacher.shape)} differ "
                         "in shape: the student's target width must be the teacher's")
    return F.mse_loss(student, teacher.to(student.dtype))


def trikd_loss(text_embeds, image_embeds, logit_scale, clip_text_embeds=None, english_mask=None, ttc_weight=0.1,
               ttc_temperature=0.07, gather=True):
    """TriKD (seed paper 002 §3.2): L = L_ITC + λ L_TTC, λ = 0.1.

    ITC (eq. 2) between the MTE text vectors h^X and the image vectors h^I, with the learnable temperature
    (`logit_scale`); TTC (eq. 3) between h^X and CLIP's English text vectors h^T at the fixed `ttc_temperature`.
    TTC applies to English rows only (`english_mask`; all rows when None): non-English pairs contribute ITC only.
    All inputs are L2-normalised (n, d) vectors in the shared space.
    """
    loss = contrastive_loss(text_embeds, image_embeds, logit_scale=logit_scale, gather=gather)
    if clip_text_embeds is None:
        return loss
    ttc = contrastive_loss(text_embeds, clip_text_embeds, temperature=ttc_temperature, mask=english_mask,
                           gather=gather)
    return loss + ttc_weight * ttc


def mean_pool(states, attention_mask):
    """Average of the token states over the attended positions (the h^S, h^O of seed paper 002 §3.3)."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def nmt_loss(logits, labels, ignore_index=-100):
    """Seed paper 002 §3.3, L_NMT = -1/N sum_i sum_t log p(y_i,t | y_i,<t, x_i): token log-likelihoods summed within
    each target sentence, averaged over the N sentences. `logits` (N, T, V) predict `labels` (N, T) at the same
    positions (already shifted); `ignore_index` marks padding."""
    nll = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=ignore_index, reduction="sum")
    return nll / labels.shape[0]


def mte_stage2_loss(nmt, source_pooled, target_pooled, temperature, ctl_weight=2.0, gather=True):
    """Stage 2 of the MTE enhancement (seed paper 002 §3.3): L = L_NMT + α L_CTL, α = 2.0.

    L_CTL is the symmetric contrastive loss between the L2-normalised mean-pooled encoder states of the source and
    target sentences of each pair (`mean_pool`), at the fixed `temperature`; `nmt` is `nmt_loss(...)`.
    """
    ctl = contrastive_loss(F.normalize(source_pooled, dim=-1), F.normalize(target_pooled, dim=-1),
                           temperature=temperature, gather=gather)
    return nmt + ctl_weight * ctl




# --- translation-based cross-lingual alignment (seed paper 000 §3.1) ---------------------------------------------------
ALIGNMENT_LOSSES = ("mse", "cl_pivot_target", "cl_pivot_image")
# seed paper 000 §3.1: "Following CLIP, [τ] is set to 0.01"
PET_TEMPERATURE = 0.01


def alignment_loss(pivot, target, kind, image=None, temperature=PET_TEMPERATURE, gather=True):
    """L_alignment of seed paper 000 §3.1 between the pivot-language (English) text vectors T^pivot and the target
    text vectors T^tgt of the same rows (eqs. 3-4; which texts are pivot and target is the routine's choice).

    kind:
        "mse": eq. 7, MSE(T^pivot, T^tgt) on the unnormalised text vectors (M-CLIP's own teacher-learning space),
            averaged over rows and dimensions.
        "cl_pivot_target": eq. 8, the contrastive loss between the cosine-normalised pivot and target vectors at
            temperature τ. Eq. 8 is written in one direction; it is applied both ways and averaged, as CLIP's loss
            (eqs. 1-2), by `contrastive_loss`.
        "cl_pivot_image": the same contrastive loss between the pivot vectors and the image vectors `image`.
    """
    if kind == "mse":
        return F.mse_loss(target, pivot.to(target.dtype))
    if kind == "cl_pivot_target":
        return contrastive_loss(F.normalize(pivot, dim=-1), F.normalize(target, dim=-1), temperature=temperature,
                                gather=gather)
    if kind == "cl_pivot_image":
        if image is None:
            raise ValueError("the cl_pivot_image alignment loss needs the image vectors")
        return contrastive_loss(F.normalize(pivot, dim=-1), F.normalize(image, dim=-1), temperature=temperature,
                                gather=gather)
    raise ValueError(f"unknown alignment loss {kind!r}; valid: {list(ALIGNMENT_LOSSES)}")


def pet_alignment_loss(text, image, pivot=None, kind="mse", weight=0.1, temperature=PET_TEMPERATURE, gather=True):
    """Seed paper 000 eq. 9: L = L_i2t + L_t2i + λ L_alignment.

    L_i2t and L_t2i (eqs. 1-2) are the two directions of the image-text contrastive loss at the fixed temperature τ:
    their sum is twice `contrastive_loss` (which averages them). `text` and `pivot` are the unnormalised text vectors
    of the target and pivot sides, `image` the image vectors; without `pivot` (no routine, or English) the loss is
    L_i2t + L_t2i alone.
    """
    image = F.normalize(image, dim=-1)
    loss = 2 * contrastive_loss(F.normalize(text, dim=-1), image, temperature=temperature, gather=gather)
    if pivot is None:
        return loss
    return loss + weight * alignment_loss(pivot, text, kind, image=image, temperature=temperature, gather=gather)


__all__ = ["ALIGNMENT_LOSSES", "MAX_LOGIT_SCALE", "PET_TEMPERATURE", "alignment_loss", "contrastive_loss", "gather_features",
           "inverse_temperature", "mean_pool", "mte_stage2_loss", "nmt_loss", "pet_alignment_loss", "teacher_mse_loss",
           "trikd_loss"]
