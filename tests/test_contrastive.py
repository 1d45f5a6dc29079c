"""VSE++ (MH, SH) and InfoNCE against brute-force references written with explicit loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from raycmr.losses.batch import GlobalBatch, local_batch
from raycmr.losses.contrastive import infonce_loss, mask_own_group_, same_group_mask, vse_loss


def _emb(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def vse_reference(img, txt, groups, margin, hardest):
    """Faghri et al. eq. (4)/(5), one anchor and one negative at a time."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        pos = float(img[i] @ txt[i])
        costs_c, costs_i = [], []
        for j in range(n):
            if groups[j] == groups[i]:
                continue
            costs_c.append(max(0.0, margin + float(img[i] @ txt[j]) - pos))
            costs_i.append(max(0.0, margin + float(img[j] @ txt[i]) - pos))
        if hardest:
            total += (max(costs_c) if costs_c else 0.0) + (max(costs_i) if costs_i else 0.0)
        else:
            total += sum(costs_c) + sum(costs_i)
    return total / n


def infonce_reference(img, txt, groups, scale):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for a, b in ((img, txt), (txt, img)):
            cands = [j for j in range(n) if j == i or groups[j] != groups[i]]
            logits = [scale * float(a[i] @ b[j]) for j in cands]
            m = max(logits)
            lse = m + math.log(sum(math.exp(x - m) for x in logits))
            total += 0.5 * (lse - scale * float(a[i] @ b[i]))
    return total / n


@pytest.mark.parametrize("hardest", [True, False])
@pytest.mark.parametrize("margin", [0.0, 0.2, 0.5])
def test_vse_matches_loop_reference(hardest, margin):
    img, txt = _emb(12, 8, 0), _emb(12, 8, 1)
    groups = torch.arange(12)
    out = vse_loss(local_batch(img, txt, groups), margin=margin, hardest=hardest)
    ref = vse_reference(img, txt, groups.tolist(), margin, hardest)
    assert out.loss.item() == pytest.approx(ref, abs=1e-10)
    assert ref > 0


def test_vse_same_image_captions_are_not_negatives():
    img, txt = _emb(10, 6, 2), _emb(10, 6, 3)
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 4, 5])  # COCO-style: captions share an image
    img = img[groups]  # rows of the same image carry the same image embedding
    for hardest in (True, False):
        out = vse_loss(local_batch(img, txt, groups), margin=0.2, hardest=hardest)
        ref = vse_reference(img, txt, groups.tolist(), 0.2, hardest)
        assert out.loss.item() == pytest.approx(ref, abs=1e-10)
    # Without group info, same-image captions count as negatives and the loss differs.
    assert vse_loss(local_batch(img, txt), margin=0.2).loss.item() != pytest.approx(
        vse_loss(local_batch(img, txt, groups), margin=0.2).loss.item())


def test_vse_mh_picks_hardest_negative_by_hand():
    # 2-d unit vectors: pair 0 positives coincide (s=1); caption 1 is at 60 degrees from image 0.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    # anchor 0: pos 1, i2t neg s(i0,c1)=0.5 -> [0.2+0.5-1]_+ = 0; t2i neg s(i1,c0)=0 -> 0
    # anchor 1: pos s(i1,c1)=0.866; i2t neg s(i1,c0)=0 -> [0.2-0.866]_+=0;
    #           t2i neg s(i0,c1)=0.5 -> [0.2+0.5-0.866]_+ = 0
    assert vse_loss(local_batch(img, txt), margin=0.2).loss.item() == pytest.approx(0.0)
    # margin 0.5: anchor 1 t2i = 0.5+0.5-0.8660 = 0.1340; anchor 0 i2t = 0.5+0.5-1 = 0
    out = vse_loss(local_batch(img, txt), margin=0.5)
    assert out.loss.item() == pytest.approx((1.0 - math.sqrt(3) / 2) / 2, abs=1e-12)


def test_infonce_matches_loop_reference():
    img, txt = _emb(9, 5, 4), _emb(9, 5, 5)
    groups = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5])
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    out = infonce_loss(local_batch(img, txt, groups), logit_scale)
    ref = infonce_reference(img, txt, groups.tolist(), 1 / 0.07)
    assert out.loss.item() == pytest.approx(ref, rel=1e-9)


def test_anchor_slice_with_global_candidates_equals_full_batch():
    """Two halves computed as (local anchors, global candidates, offset, denominator N/W)
    average to the full-batch loss: the identity behind the multi-worker equivalence."""
    img, txt = _emb(8, 4, 6), _emb(8, 4, 7)
    groups = torch.arange(8)
    full = vse_loss(local_batch(img, txt, groups), margin=0.2).loss
    halves = [
        vse_loss(GlobalBatch(img, txt, groups, start=s, stop=s + 4, denominator=8 / 2),
                 margin=0.2).loss
        for s in (0, 4)
    ]
    assert ((halves[0] + halves[1]) / 2).item() == pytest.approx(full.item(), abs=1e-12)


def mh_gradient_reference(img, txt, groups, margin):
    """d MH / d img and d txt by hand: each active hinge adds +txt[c'] - txt[c] to its anchor
    image (i2t) or +img[i'] - img[i] to its anchor caption (t2i), and the anchor's embedding
    to its hardest negative's, all over n."""
    n = img.shape[0]
    g_img, g_txt = torch.zeros_like(img), torch.zeros_like(txt)
    for i in range(n):
        pos = float(img[i] @ txt[i])
        negs = [j for j in range(n) if groups[j] != groups[i]]
        c = max(negs, key=lambda j: float(img[i] @ txt[j]))  # hardest caption of image i
        if margin + float(img[i] @ txt[c]) - pos > 0:
            g_img[i] += (txt[c] - txt[i]) / n
            g_txt[c] += img[i] / n
            g_txt[i] -= img[i] / n
        k = max(negs, key=lambda j: float(img[j] @ txt[i]))  # hardest image of caption i
        if margin + float(img[k] @ txt[i]) - pos > 0:
            g_txt[i] += (img[k] - img[i]) / n
            g_img[k] += txt[i] / n
            g_img[i] -= txt[i] / n
    return g_img, g_txt


@pytest.mark.parametrize("shared_groups", [False, True])
def test_mh_gradient_matches_hand_reference(shared_groups):
    """MH's backward runs through the hardest negatives only (found without autograd): its
    gradient must still be exactly the hinge-of-the-max subgradient."""
    img, txt = _emb(10, 6, 3), _emb(10, 6, 4)
    groups = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7]) if shared_groups else torch.arange(10)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    vse_loss(local_batch(img, txt, groups), margin=0.2, hardest=True).loss.backward()
    ref_img, ref_txt = mh_gradient_reference(img.detach(), txt.detach(), groups.tolist(), 0.2)
    assert ref_img.abs().sum() > 0
    torch.testing.assert_close(img.grad, ref_img, rtol=0, atol=1e-12)
    torch.testing.assert_close(txt.grad, ref_txt, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [None, "distinct", "shared"])
@pytest.mark.parametrize("anchors", [(0, None), (3, 9)])
def test_own_group_masking_equals_the_full_mask(groups, anchors):
    """The diagonal fast path (every row its own group) and the general mask give the same
    -inf cells, for every anchor slice."""
    n = 12
    ids = {None: None, "distinct": torch.randperm(n) * 7,
           "shared": torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])}[groups]
    batch = GlobalBatch(torch.randn(n, 4), torch.randn(n, 4), ids, *anchors)
    sims = torch.randn(batch.anchor_count, n)
    want = sims.masked_fill(same_group_mask(batch), float("-inf"))
    assert torch.equal(mask_own_group_(sims.clone(), batch), want)


def test_auto_anchors_score_n_by_n_up_to_two_workers_then_local():
    from raycmr.losses.batch import resolve_anchors

    assert [resolve_anchors("auto", w) for w in (1, 2, 3, 256)] == \
        ["global", "global", "local", "local"]
    assert resolve_anchors("local", 2) == "local" and resolve_anchors("global", 64) == "global"
    with pytest.raises(ValueError, match="loss.anchors"):
        resolve_anchors("rows", 2)


def test_extra_captions_are_negatives_of_every_image_anchor():
    """A hard caption candidate closer to an image than its own caption: MH's image->text
    hinge is m + s(i, c') - s(i, c) on it, and the text->image side is unchanged."""
    img = torch.eye(3, 4)
    txt = torch.tensor([[0.8, 0.6, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    extra = torch.zeros(3, 1, 4)
    extra[0, 0] = torch.tensor([0.9, 0, 0, 0.436])  # s(img0, extra) = 0.9 > s(img0, txt0) = 0.8
    plain = vse_loss(local_batch(img, txt), margin=0.2).loss
    harder = vse_loss(local_batch(img, txt, extra_txt=extra), margin=0.2).loss
    # anchor 0's image->text hinge: without extras max(0.2 + 0.6 - 0.8, ...) = 0 (hardest txt1);
    # with the extra caption 0.2 + 0.9 - 0.8 = 0.3; divided by 3 anchors
    assert (harder - plain).item() == pytest.approx(0.3 / 3, abs=1e-6)
