"""The contrastive loss: equation 4 term by term, hard-negative roles, and GradCache == plain loss and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from speed_ray.embedder.loss import compute_loss_from_embeddings, grad_cache_step, plain_step


def _explicit_loss(q, p, n, tau, offset=0):
    """Equation 4 written out: phi = exp(cos / tau); denominator = every positive and every hard negative."""
    total = 0.0
    for i in range(q.size(0)):
        phi = lambda d: math.exp(F.cosine_similarity(q[i], d, dim=0).item() / tau)  # noqa: E731
        num = phi(p[offset + i])
        den = sum(phi(p[j]) for j in range(p.size(0))) + sum(phi(n[j]) for j in range(n.size(0)))
        total += -math.log(num / den)
    return total / q.size(0)


@pytest.mark.parametrize("offset", [0, 2])
def test_loss_is_equation_4(offset):
    torch.manual_seed(0)
    q, p, n = torch.randn(3, 5), torch.randn(3 + offset, 5), torch.randn(3 + offset, 5)
    got = compute_loss_from_embeddings(q, p, n, 0.5, offset).item()
    assert got == pytest.approx(_explicit_loss(q, p, n, 0.5, offset), rel=1e-5)


def test_hard_negative_is_negative_for_every_query_and_positive_for_none():
    torch.manual_seed(0)
    b, d, tau = 4, 16, 0.05
    q, p, n = torch.randn(b, d), torch.randn(b, d), torch.randn(b, d)

    def loss_of(i, p_, n_):   # query i's own term of the batch loss
        return compute_loss_from_embeddings(q[i:i + 1], p_, n_, tau, offset=i).item()

    for i in range(b):
        for j in range(b):
            # Pull hard negative j onto query i: a negative can only raise i's loss, a positive would lower it.
            n2 = n.clone()
            n2[j] = q[i]
            assert loss_of(i, p, n2) > loss_of(i, p, n) + 1e-3, (i, j)
            p2 = p.clone()
            p2[j] = q[i]
            if j == i:   # the only positive of query i is p_i
                assert loss_of(i, p2, n) < loss_of(i, p, n) - 1e-3
            else:        # other queries' positives are in-batch negatives
                assert loss_of(i, p2, n) > loss_of(i, p, n) + 1e-3


class _Tiny(torch.nn.Module):
    """Bag-of-chars encoder with dropout, so GradCache must replay RNG states to match."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(256, 32, mode="mean")
        self.drop = torch.nn.Dropout(0.3)
        self.proj = torch.nn.Linear(32, 16)

    def forward(self, texts):
        ids = [torch.tensor([ord(c) % 256 for c in t]) for t in texts]
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        return self.proj(self.drop(self.emb(torch.cat(ids), offsets)))


def _sides(b=10):
    return [[f"query number {i} about topic {i % 3}" for i in range(b)],
            [f"doc {i} on topic {i % 3} answering query {i}" for i in range(b)],
            [f"unrelated passage {i * 7}" for i in range(b)]]


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_grad_cache_matches_plain_loss_and_gradients(chunk):
    torch.manual_seed(0)
    model = _Tiny().train()
    twin = copy.deepcopy(model)
    sides = _sides()
    loss_fn = lambda q, p, n: compute_loss_from_embeddings(q, p, n, 0.02)  # noqa: E731

    torch.manual_seed(123)
    plain = plain_step(lambda i, t: model(t), sides, loss_fn)
    torch.manual_seed(123)
    cached = grad_cache_step(lambda i, t: twin(t), sides, loss_fn, chunk)
    assert cached.item() == pytest.approx(plain.item(), abs=1e-5)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_grad_cache_matches_plain_on_minilm(minilm):
    """LoRA MiniLM. Without dropout GradCache equals the plain loss exactly. With dropout a chunked forward draws
    different masks from a whole-batch one, so the reference is the same chunks run in one graph from the same
    seed: GradCache's replayed second pass must reproduce the first pass's masks to match it."""
    from speed_ray.embedder.model import load_embedder

    torch.manual_seed(0)
    base = load_embedder(minilm, lora=True, lora_r=4, max_length=32)
    sides = _sides(6)
    loss_fn = lambda q, p, n: compute_loss_from_embeddings(q, p, n, 0.02)  # noqa: E731

    plain_m, cached_m = copy.deepcopy(base).eval(), copy.deepcopy(base).eval()
    plain = plain_step(lambda i, t: plain_m.encode(t), sides, loss_fn)
    cached = grad_cache_step(lambda i, t: cached_m.encode(t), sides, loss_fn, 4)
    assert cached.item() == pytest.approx(plain.item(), abs=1e-5)
    want, got = _grads(plain_m), _grads(cached_m)
    assert sum(g is not None for g in want.values()) >= 12   # every LoRA adapter but the unused pooler's
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)

    ref_m, cached_m = copy.deepcopy(base).train(), copy.deepcopy(base).train()
    chunked = lambda i, t: torch.cat([ref_m.encode(t[k:k + 4]) for k in range(0, len(t), 4)])  # noqa: E731
    torch.manual_seed(7)
    ref = plain_step(chunked, sides, loss_fn)
    torch.manual_seed(7)
    cached = grad_cache_step(lambda i, t: cached_m.encode(t), sides, loss_fn, 4)
    assert cached.item() == pytest.approx(ref.item(), abs=1e-5)
    want, got = _grads(ref_m), _grads(cached_m)
    for name in want:
        if want[name] is not None:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_fixture", ["minilm", "tiny_llama"])
def test_packed_encoding_equals_side_by_side(model_fixture, request):
    """The plain step's packed encoding (all sides, length-sorted chunks) gives the same embeddings, loss and
    gradients as encoding each side on its own, for mean pooling (MiniLM) and EOS pooling (a decoder)."""
    from speed_ray.embedder.model import load_embedder

    torch.manual_seed(0)
    base = load_embedder(request.getfixturevalue(model_fixture), lora=True, lora_r=4, max_length=24).eval()
    sides = _sides(9)
    sides[1][3] = "a much longer document " * 12            # truncated to its side's max length
    lengths = [16, 24, 24]
    loss_fn = lambda q, p, n: compute_loss_from_embeddings(q, p, n, 0.02)  # noqa: E731

    side_m, packed_m = copy.deepcopy(base), copy.deepcopy(base)
    want = plain_step(lambda i, t: side_m.encode(t, lengths[i]), sides, loss_fn)
    got = plain_step(None, sides, loss_fn, encode_all=lambda sd: packed_m.encode_packed(sd, lengths, min_chunk=2))
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    for a, b in zip(packed_m.encode_packed(sides, lengths, min_chunk=2),
                    [side_m.encode(t, lengths[i]) for i, t in enumerate(sides)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    g_want, g_got = _grads(side_m), _grads(packed_m)
    assert sum(g is not None for g in g_want.values()) >= 4
    for name, g in g_want.items():
        if g is not None:
            torch.testing.assert_close(g_got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_packing_sorts_varied_lengths_and_keeps_uniform_sides(minilm, monkeypatch):
    """Varied lengths: chunks of similar length, each padded to its own longest (fewer tokens than per-side
    padding). Uniform lengths: one pass per side, as three encode calls would do."""
    from speed_ray.embedder.model import load_embedder

    emb = load_embedder(minilm, lora=False, max_length=64).eval()
    widths: list[tuple[int, int]] = []
    forward = emb.forward
    monkeypatch.setattr(emb, "forward", lambda f: widths.append(tuple(f["input_ids"].shape)) or forward(f))
    words = "alpha beta gamma delta".split()
    varied = [[" ".join(words[: 1 + i % 4]) * (1 + 3 * (i % 5)) for i in range(16)] for _ in range(3)]
    with torch.no_grad():
        emb.encode_packed(varied, [64, 64, 64], min_chunk=2)
    padded = sum(n * w for n, w in widths)
    per_side = sum(emb.tokenize(t)["input_ids"].numel() for t in varied)
    assert len(widths) > 3 and padded < 0.8 * per_side, (widths, per_side)
    widths.clear()
    uniform = [[f"query {i}" for i in range(8)], [f"document number {i}" for i in range(8)],
               [f"other document {i}" for i in range(8)]]
    with torch.no_grad():
        emb.encode_packed(uniform, [64, 64, 64])
    assert widths == [tuple(emb.tokenize(t)["input_ids"].shape) for t in uniform]
