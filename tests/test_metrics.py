"""Retrieval / classification metrics on hand-built similarity matrices, and the summary across languages."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_scripts.metrics import (best_positive_ranks, classification_metrics, flatten, hit_rate,
                                      retrieval_metrics, summarize, summarize_columns)


def ranks_of(sims, query_keys, gallery_keys, chunk_size=512):
    """best_positive_ranks on a given similarity matrix: queries = its rows, gallery = the identity."""
    sims = torch.tensor(sims, dtype=torch.float32)
    return best_positive_ranks(sims, query_keys, torch.eye(sims.shape[1]), gallery_keys, chunk_size).tolist()


def test_single_positive_ranks_count_negatives_above_the_positive():
    sims = [[0.9, 0.1, 0.2],   # positive (key 0) is first
            [0.5, 0.4, 0.3],   # positive (key 1) is second
            [0.8, 0.7, 0.1]]   # positive (key 2) is last
    assert ranks_of(sims, [0, 1, 2], [0, 1, 2]) == [0, 1, 2]


def test_query_is_a_hit_when_any_positive_ranks_high():
    # Two images share concept 7: the rank is that of the best of them.
    sims = [[0.1, 0.6, 0.9, 0.3]]
    assert ranks_of(sims, [7], [7, 5, 7, 5]) == [0]
    assert ranks_of(sims, [7], [7, 5, 5, 7]) == [2]
    assert ranks_of(sims, [7], [7, 5, 5, 5]) == [3]


def test_ties_count_against_the_query():
    assert ranks_of([[0.5, 0.5, 0.5]], [0], [0, 1, 2]) == [2]
    assert ranks_of([[0.5, 0.5, 0.2]], [0], [1, 0, 2]) == [1]
    # ties among positives do not matter: only negatives are counted
    assert ranks_of([[0.5, 0.5, 0.2]], [0], [0, 0, 1]) == [0]


def test_query_without_positive_is_an_error():
    with pytest.raises(ValueError, match="query 1 has no positive"):
        ranks_of([[1.0, 0.0], [0.0, 1.0]], [0, 2], [0, 1])


def test_retrieval_metrics_both_directions_with_several_captions_per_image():
    # 4 captions (rows), 2 images; captions 0, 1 describe image 0 and captions 2, 3 image 1.
    sims = torch.tensor([[0.9, 0.1],
                         [0.2, 0.3],    # wrong: prefers image 1
                         [0.1, 0.8],
                         [0.6, 0.4]])   # wrong: prefers image 0
    text_keys, image_keys = [0, 0, 1, 1], [0, 1]
    result = retrieval_metrics(sims, text_keys, torch.eye(2), image_keys)
    assert result["t2i"] == {"R@1": 50.0, "R@5": 100.0, "R@10": 100.0}
    # image 0: best positive text scores 0.9, above everything: hit; image 1: best positive 0.8 > 0.6: hit
    assert result["i2t"] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    assert result["r1_mean"] == 75.0
    assert result["mean_recall"] == pytest.approx((50 + 100 * 5) / 6)


def test_hit_rate_thresholds():
    ranks = torch.tensor([0, 4, 5, 9, 10])
    assert [hit_rate(ranks, k) for k in (1, 5, 10)] == [20.0, 40.0, 80.0]


def reference_ranks(sims, query_keys, gallery_keys):
    """Per query: sort the gallery by score, ties broken with negatives first; position of the first positive."""
    ranks = []
    for row, key in zip(sims.tolist(), query_keys):
        order = sorted(range(len(row)), key=lambda j: (-row[j], gallery_keys[j] == key))
        ranks.append(next(r for r, j in enumerate(order) if gallery_keys[j] == key))
    return ranks


def test_chunked_equals_unchunked_and_reference():
    generator = torch.Generator().manual_seed(0)
    texts = torch.nn.functional.normalize(torch.randn(53, 8, generator=generator), dim=-1)
    images = torch.nn.functional.normalize(torch.randn(17, 8, generator=generator), dim=-1)
    images[3] = images[4]  # exact ties between images
    image_keys = torch.arange(17) // 2  # two images per concept (the last alone)
    text_keys = torch.randint(0, 9, (53,), generator=generator)
    text_keys[:9] = torch.arange(9)  # every concept has a caption
    full = best_positive_ranks(texts, text_keys, images, image_keys, chunk_size=10_000)
    assert full.tolist() == reference_ranks(texts @ images.T, text_keys.tolist(), image_keys.tolist())
    for chunk_size in (1, 7, 16):
        assert torch.equal(best_positive_ranks(texts, text_keys, images, image_keys, chunk_size), full)
        assert torch.equal(best_positive_ranks(images, image_keys, texts, text_keys, chunk_size),
                           best_positive_ranks(images, image_keys, texts, text_keys, 10_000))
    assert retrieval_metrics(texts, text_keys, images, image_keys, chunk_size=5) == \
        retrieval_metrics(texts, text_keys, images, image_keys, chunk_size=10_000)


def test_classification_top1_top5():
    # 6 classes; image 0 is right, image 1 has its class 3rd, image 2 has its class 6th
    sims = torch.tensor([[0.9, 0.1, 0.1, 0.1, 0.1, 0.1],
                         [0.5, 0.4, 0.3, 0.1, 0.1, 0.1],
                         [0.0, 0.5, 0.5, 0.5, 0.5, 0.5]])
    result = classification_metrics(sims, [0, 2, 0], torch.eye(6))
    assert result == {"top1": pytest.approx(100 / 3), "top5": pytest.approx(200 / 3)}


def test_table2_of_seed_paper_000():
    """M-CLIP zero-shot Recall@1 on XTD (seed paper 000, Table 2) gives its Avg, Avg-en, Std and Range."""
    r1 = {"en": 63.44, "de": 59.94, "fr": 60.06, "es": 58.90, "it": 60.72, "ko": 51.00, "pl": 61.50,
          "ru": 56.11, "tr": 59.28, "zh": 59.28, "ja": 47.44}
    summary = summarize(r1)
    assert {name: round(value, 2) for name, value in summary.items()} == \
        {"avg": 57.97, "avg_en": 57.42, "std": 4.75, "range": 16.00}


def test_summary_edge_cases():
    assert summarize({"de": 10.0, "fr": 20.0}) == {"avg": 15.0, "avg_en": 15.0, "std": pytest.approx(7.0710678),
                                                   "range": 10.0}
    assert summarize({"en": 30.0}) == {"avg": 30.0, "avg_en": None, "std": None, "range": 0.0}


def test_summarize_columns_covers_every_flat_metric():
    per_language = {"en": {"t2i": {"R@1": 10.0}, "r1_mean": 20.0}, "de": {"t2i": {"R@1": 30.0}, "r1_mean": 40.0}}
    assert flatten(per_language["en"]) == {"t2i_R@1": 10.0, "r1_mean": 20.0}
    summary = summarize_columns(per_language)
    assert list(summary) == ["t2i_R@1", "r1_mean"]
    assert summary["t2i_R@1"]["avg_en"] == 30.0 and summary["r1_mean"]["range"] == 20.0


MEMORY_PROBE = """
import resource, torch
from training_scripts.metrics import retrieval_metrics
texts = torch.nn.functional.normalize(torch.randn(25_000, 64), dim=-1)
images = torch.nn.functional.normalize(torch.randn(5_000, 64), dim=-1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
retrieval_metrics(texts, torch.arange(25_000) // 5, images, torch.arange(5_000))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and glibc's malloc")
def test_25k_captions_by_5k_images_never_builds_the_full_matrix():
    # The full 25k x 5k float matrix alone is 477 MiB. glibc returns blocks over 1 MiB at once, so the peak RSS
    # growth measures what is alive together.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2 ** 20)}
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parents[1], check=True)
    assert float(result.stdout) < 200, f"peak memory grew by {result.stdout.strip()} MiB"
