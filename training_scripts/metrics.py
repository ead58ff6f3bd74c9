"""Retrieval and zero-shot classification metrics, and the summary across languages.

The conventions are stated once, in ``RETRIEVAL_CONVENTIONS`` and ``SUMMARY_CONVENTIONS``, and written
into every ``results.md``. Positives are given by integer keys: a query and a gallery item are a
positive pair when their keys are equal (the concept when the data has concepts, else the image id),
so several captions per image and several images per concept need no dense positives mask.
Similarities are computed ``chunk_size`` queries at a time: memory is ``chunk_size x gallery``, never
``queries x gallery`` (25k captions x 5k images is fine).
"""
import statistics

import torch

RETRIEVAL_KS = (1, 5, 10)
CLASSIFICATION_KS = (1, 5)

RETRIEVAL_CONVENTIONS = (
    "t2i = text→image (image retrieval): every caption queries the images of its language's split. "
    "i2t = image→text (text retrieval): every image queries the captions of its language's split. "
    "Text and image embeddings are L2-normalised; similarity is their dot product. "
    "A query is a hit at K when any of its positives (same concept where the data has concepts, else "
    "same image) is in its top K. Ties count against the query: its rank is the number of negatives "
    "scoring at least as high as its best positive, and it is a hit at K when that rank is below K. "
    "R@K in percent. mean_recall = mean of the six R@K (K = 1, 5, 10, both directions); "
    "r1_mean = (t2i R@1 + i2t R@1) / 2, the \"Recall@1\" of seed paper 000."
)
CLASSIFICATION_CONVENTIONS = (
    "Zero-shot classification: a class embedding is the mean of the L2-normalised embeddings of its "
    "prompts (one per template), normalised again; every image queries the classes. top-K in percent; "
    "ties count against the image, as in retrieval."
)
SUMMARY_CONVENTIONS = (
    "Avg = mean over all languages; Avg-en = mean over all languages but English; "
    "Std = sample standard deviation (n − 1) over all languages, English included; "
    "Range = max − min over all languages, English included."
)


def best_positive_ranks(queries, query_keys, gallery, gallery_keys, chunk_size=256):
    """For every query, the number of gallery negatives scoring at least as high as its best positive.

    ``queries`` (n_q, d) and ``gallery`` (n_g, d) are embeddings (similarity = ``queries @ gallery.T``);
    ``query_keys`` (n_q,) and ``gallery_keys`` (n_g,) are integer keys, equal keys meaning positive.
    A query is a hit at K when its rank is < K. Raises ValueError for a query with no positive.
    """
    query_keys = torch.as_tensor(query_keys, device=queries.device)
    gallery_keys = torch.as_tensor(gallery_keys, device=queries.device)
    ranks = []
    for start in range(0, len(queries), chunk_size):
        sims = queries[start:start + chunk_size] @ gallery.T
        positive = query_keys[start:start + chunk_size, None] == gallery_keys[None, :]
        orphans = (~positive.any(dim=1)).nonzero().flatten()
        if len(orphans):
            raise ValueError(f"query {start + orphans[0].item()} has no positive in the gallery")
        best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks.append(((sims >= best) & ~positive).sum(dim=1))
    return torch.cat(ranks).cpu()


def hit_rate(ranks, k):
    """Percentage of queries whose rank is below ``k``."""
    return 100.0 * (ranks < k).double().mean().item()


def retrieval_metrics(text_embeds, text_keys, image_embeds, image_keys, chunk_size=256):
    """Recall@K in both directions, ``mean_recall`` and ``r1_mean``, in percent (see RETRIEVAL_CONVENTIONS)."""
    t2i = best_positive_ranks(text_embeds, text_keys, image_embeds, image_keys, chunk_size)
    i2t = best_positive_ranks(image_embeds, image_keys, text_embeds, text_keys, chunk_size)
    result = {direction: {f"R@{k}": hit_rate(ranks, k) for k in RETRIEVAL_KS}
              for direction, ranks in (("t2i", t2i), ("i2t", i2t))}
    result["mean_recall"] = statistics.fmean([*result["t2i"].values(), *result["i2t"].values()])
    result["r1_mean"] = (result["t2i"]["R@1"] + result["i2t"]["R@1"]) / 2
    return result


def classification_metrics(image_embeds, labels, class_embeds, chunk_size=256):
    """Top-1 and top-5 accuracy in percent of images (queries) over class embeddings (gallery)."""
    ranks = best_positive_ranks(image_embeds, labels, class_embeds, torch.arange(len(class_embeds)), chunk_size)
    return {f"top{k}": hit_rate(ranks, k) for k in CLASSIFICATION_KS}


def flatten(metrics):
    """One language's metrics as flat columns: {"t2i": {"R@1": x}} becomes {"t2i_R@1": x}."""
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{name}_{k}": v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


def summarize(values, pivot="en"):
    """Avg, Avg-en, Std (n − 1) and Range of {language: value}; see SUMMARY_CONVENTIONS.

    ``avg_en`` is None when only the pivot language is given, ``std`` when only one language is.
    """
    scores = list(values.values())
    others = [v for language, v in values.items() if language != pivot]
    return {
        "avg": statistics.fmean(scores),
        "avg_en": statistics.fmean(others) if others else None,
        "std": statistics.stdev(scores) if len(scores) > 1 else None,
        "range": max(scores) - min(scores),
    }


def summarize_columns(per_language):
    """``summarize`` for every flat column of {language: metrics}."""
    flat = {language: flatten(metrics) for language, metrics in per_language.items()}
    columns = next(iter(flat.values()))
    return {column: summarize({language: row[column] for language, row in flat.items()}) for column in columns}


def chance_recall_at_1(query_keys, gallery_keys):
    """R@1 in percent of a ranking at random: the mean over queries of (its positives in the gallery) / (gallery
    size), the chance level that a retrieval R@1 should be read against."""
    query_keys = torch.as_tensor(query_keys)
    gallery_keys = torch.as_tensor(gallery_keys)
    positives = (query_keys[:, None] == gallery_keys[None, :]).sum(dim=1).double()
    return 100.0 * (positives / len(gallery_keys)).mean().item()
