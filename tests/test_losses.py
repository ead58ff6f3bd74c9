"""modeling_xclip.losses against formulas written here, term by term, in plain Python (seed paper 002 eqs. 1-3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from modeling_xclip.losses import MAX_LOGIT_SCALE, contrastive_loss, trikd_loss


def infonce_by_hand(x, y, tau, rows=None):
    """l(x, y) = -1/N sum_i log(exp(x_i.y_i / tau) / sum_j exp(x_i.y_j / tau)), over the rows `rows` (default all),
    with only those rows as candidates."""
    rows = list(range(len(x))) if rows is None else rows
    total = 0.0
    for i in rows:
        scores = {j: sum(a * b for a, b in zip(x[i], y[j])) / tau for j in rows}
        total -= scores[i] - math.log(sum(math.exp(s) for s in scores.values()))
    return total / len(rows)


def symmetric_by_hand(a, b, tau, rows=None):
    a, b = a.tolist(), b.tolist()
    return (infonce_by_hand(a, b, tau, rows) + infonce_by_hand(b, a, tau, rows)) / 2


@pytest.fixture
def pairs():
    torch.manual_seed(0)
    return F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1), F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)


def test_contrastive_loss_with_a_fixed_temperature(pairs):
    a, b = pairs
    loss = contrastive_loss(a, b, temperature=0.07)
    assert loss.item() == pytest.approx(symmetric_by_hand(a, b, 0.07), rel=1e-9)


def test_contrastive_loss_with_a_learnable_temperature_and_its_gradient(pairs):
    a, b = pairs
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(a, b, logit_scale=logit_scale)
    assert loss.item() == pytest.approx(symmetric_by_hand(a, b, 0.07), rel=1e-9)
    loss.backward()
    # d loss / d log(1/tau), by central differences of the hand formula
    eps = 1e-6
    numeric = (symmetric_by_hand(a, b, 1 / math.exp(logit_scale.item() + eps))
               - symmetric_by_hand(a, b, 1 / math.exp(logit_scale.item() - eps))) / (2 * eps)
    assert logit_scale.grad.item() == pytest.approx(numeric, rel=1e-5)


def test_learnable_temperature_is_clamped_as_in_clip(pairs):
    a, b = pairs
    logit_scale = torch.tensor(MAX_LOGIT_SCALE + 1.0, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(a, b, logit_scale=logit_scale)
    assert loss.item() == pytest.approx(symmetric_by_hand(a, b, 0.01), rel=1e-9)   # tau never below 1/100
    loss.backward()
    assert logit_scale.grad.item() == 0.0


def test_masked_rows_are_neither_queries_nor_negatives(pairs):
    a, b = pairs
    mask = torch.tensor([True, False, True, True, False, True])
    loss = contrastive_loss(a, b, temperature=0.1, mask=mask)
    assert loss.item() == pytest.approx(symmetric_by_hand(a, b, 0.1, rows=[0, 2, 3, 5]), rel=1e-9)
    empty = contrastive_loss(a.requires_grad_(), b, temperature=0.1, mask=torch.zeros(6, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad


def test_exactly_one_temperature_is_given(pairs):
    with pytest.raises(ValueError, match="exactly one"):
        contrastive_loss(*pairs)
    with pytest.raises(ValueError, match="exactly one"):
        contrastive_loss(*pairs, logit_scale=torch.tensor(1.0), temperature=0.07)


def test_trikd_is_itc_plus_a_tenth_of_ttc_on_english_rows(pairs):
    text, image = pairs
    clip_text = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    english = torch.tensor([True, True, False, True, False, False])
    logit_scale = torch.tensor(math.log(1 / 0.05), dtype=torch.float64)
    loss = trikd_loss(text, image, logit_scale, clip_text, english_mask=english)
    itc = symmetric_by_hand(text, image, 0.05)
    ttc = symmetric_by_hand(text, clip_text, 0.07, rows=[0, 1, 3])
    assert loss.item() == pytest.approx(itc + 0.1 * ttc, rel=1e-9)
    # without an English side, ITC alone
    assert trikd_loss(text, image, logit_scale).item() == pytest.approx(itc, rel=1e-9)
