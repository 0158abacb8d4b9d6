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
    # pass_tokens=0: a pass costs nothing, so every length gets its own pass (the most reassembly to get right)
    got = plain_step(None, sides, loss_fn, encode_all=lambda sd: packed_m.encode_packed(sd, lengths, pass_tokens=0))
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    for a, b in zip(packed_m.encode_packed(sides, lengths, pass_tokens=0),
                    [side_m.encode(t, lengths[i]) for i, t in enumerate(sides)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    g_want, g_got = _grads(side_m), _grads(packed_m)
    assert sum(g is not None for g in g_want.values()) >= 4
    for name, g in g_want.items():
        if g is not None:
            torch.testing.assert_close(g_got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_packing_sorts_varied_lengths_and_merges_uniform_ones(minilm, monkeypatch):
    """Varied lengths: a few passes of similar lengths, each padded to its own longest (fewer tokens than per-side
    padding). Uniform lengths: no more passes than sides, no more padding than per side (sides of the same length
    share a pass). Long documents that fill the max length: both document sides in one pass, the queries in
    another (per side would be three passes of the same widths). pass_tokens is set for these few texts (the
    default is sized for training batches)."""
    from speed_ray.embedder.model import load_embedder

    emb = load_embedder(minilm, lora=False, max_length=64).eval()
    widths: list[tuple[int, int]] = []
    forward = emb.forward
    monkeypatch.setattr(emb, "forward", lambda f: widths.append(tuple(f["input_ids"].shape)) or forward(f))

    def run(sides, lengths, **kw):
        widths.clear()
        with torch.no_grad():
            emb.encode_packed(sides, lengths, **kw)
        per_side = [tuple(emb.tokenize(t, m)["input_ids"].shape) for t, m in zip(sides, lengths)]
        return sum(n * w for n, w in widths), sum(n * w for n, w in per_side), per_side

    words = "alpha beta gamma delta".split()
    varied = [[" ".join(words[: 1 + i % 4]) * (1 + 3 * (i % 5)) for i in range(16)] for _ in range(3)]
    padded, per_side, _ = run(varied, [64, 64, 64], pass_tokens=32)
    assert len(widths) > 3 and padded < 0.8 * per_side, (widths, per_side)

    uniform = [[f"query {i}" for i in range(8)], [f"document number {i}" for i in range(8)],
               [f"other document {i}" for i in range(8)]]
    padded, per_side, _ = run(uniform, [64, 64, 64], pass_tokens=4)
    assert len(widths) <= 3 and padded <= per_side, widths
    assert sorted(n for n, _ in widths) != [8, 8, 8]            # the two document sides share a pass

    filler = "the river and the court of the harbor " * 40       # far over 48 tokens: truncated
    long_docs = [[f"query {i}" for i in range(8)], [f"{i} {filler}" for i in range(8)],
                 [f"{filler} {i}" for i in range(8)]]
    padded, per_side, sides = run(long_docs, [16, 48, 48], pass_tokens=64)
    assert sorted(widths) == sorted([sides[0], (16, 48)]), widths
    assert padded == per_side


def _partitions(items):
    if not items:
        yield []
        return
    head, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[head]] + part
        for k in range(len(part)):
            yield part[:k] + [[head] + part[k]] + part[k + 1:]


def _plan_cost(passes, lengths, pass_tokens, attention_width):
    return sum(len(p) * max(lengths[i] for i in p) * (1 + max(lengths[i] for i in p) / attention_width)
               + pass_tokens for p in passes)


@pytest.mark.parametrize("pass_tokens", [0, 10, 40, 1000])
def test_plan_passes_is_the_cheapest_partition(pass_tokens):
    """plan_passes' passes cover every text once and cost no more than any partition of the texts (all of
    them, checked by enumeration on small random sets); pass_tokens=0 gives one pass per length, a huge one
    a single pass."""
    import random

    from speed_ray.embedder.model import plan_passes

    rng = random.Random(pass_tokens)
    for _ in range(12):
        lengths = [rng.choice([3, 5, 8, 9, 20, 21, 40]) for _ in range(rng.randint(1, 7))]
        passes = plan_passes(lengths, pass_tokens, attention_width=30)
        assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
        best = min(_plan_cost(p, lengths, pass_tokens, 30) for p in _partitions(list(range(len(lengths)))))
        assert _plan_cost(passes, lengths, pass_tokens, 30) == pytest.approx(best)
        if pass_tokens == 0:
            assert sorted(len({lengths[i] for i in p}) for p in passes) == [1] * len(set(lengths))
        if pass_tokens == 1000:
            assert len(passes) == 1


def test_plan_passes_keeps_every_pass_under_max_rows():
    """With a row cap per width, no pass exceeds it, every text is in one pass, and a run of equal long texts
    is cut into as few passes as the cap allows."""
    from speed_ray.embedder.model import plan_passes

    lengths = [256] * 20 + [200] * 3 + [30] * 12
    cap = lambda w: 4 if w > 100 else 100  # noqa: E731
    passes = plan_passes(lengths, 512, attention_width=768, max_rows=cap)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    assert all(len(p) <= cap(max(lengths[i] for i in p)) for p in passes), passes
    assert sum(max(lengths[i] for i in p) == 256 for p in passes) == 5          # 20 texts at 256, 4 a pass
    assert sorted(len(p) for p in passes if max(lengths[i] for i in p) == 30) == [12]


def test_cpu_passes_keep_activations_under_the_byte_budget(minilm, monkeypatch):
    """On CPU, encode_packed cuts long texts into passes whose largest activation per layer stays within
    cpu_pass_bytes (the attention weights where training materializes them, else the MLP's), and the
    embeddings are those of encoding each side on its own."""
    from speed_ray.embedder.model import load_embedder

    emb = load_embedder(minilm, lora=False, max_length=64)
    cfg = emb.backbone.config
    assert emb.train().rows_per_pass(256) < emb.eval().rows_per_pass(256)     # dropout: SDPA's math kernel
    train_rows = emb.train().rows_per_pass(256)
    assert train_rows * cfg.num_attention_heads * 256 * 256 * 4 <= emb.cpu_pass_bytes
    emb.eval()
    emb.cpu_pass_bytes = 2 << 20
    widths: list[tuple[int, int]] = []
    forward = emb.forward
    monkeypatch.setattr(emb, "forward", lambda f: widths.append(tuple(f["input_ids"].shape)) or forward(f))
    filler = "the river and the court of the harbor " * 20
    sides = [[f"query {i}" for i in range(16)], [f"{i} {filler}" for i in range(16)],
             [f"{filler} {i}" for i in range(16)]]
    lengths = [16, 48, 48]
    with torch.no_grad():
        got = emb.encode_packed(sides, lengths)
        budget = [n * w * cfg.intermediate_size * 4 for n, w in widths]
        assert max(budget) <= emb.cpu_pass_bytes and sum(n for n, w in widths if w == 48) == 32, widths
        assert len([w for _, w in widths if w == 48]) == -(-32 // emb.rows_per_pass(48))
        for a, side, m in zip(got, sides, lengths):
            torch.testing.assert_close(a, emb.encode(side, m), atol=1e-5, rtol=1e-4)


# ---- GISTEmbed false-negative masking ---------------------------------------------------------------------------
def _guide_for(q, p, n, noise=0.3, seed=5):
    """Guide embeddings correlated with the rows (so some candidates score above a query's own positive)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(x + noise * torch.randn(x.shape, generator=g) for x in (q, p, n))


@pytest.mark.parametrize("offset", [0, 2])
def test_gist_mask_leaves_exactly_the_guides_false_negatives_out_of_the_softmax(offset):
    from speed_ray.embedder.loss import false_negative_mask

    torch.manual_seed(0)
    tau, margin = 0.5, 0.05
    q, p, n = torch.randn(3, 5), torch.randn(3 + offset, 5), torch.randn(3 + offset, 5)
    p[offset + 1] = q[1]                       # the guide ranks these highly:
    n[offset] = p[offset] + 0.01               # a copy of query 0's positive as its hard negative
    gq, gp, gn = _guide_for(q, p, n, noise=0.05)
    mask = false_negative_mask(gq, torch.cat([gp, gn]), margin, offset)
    assert mask.shape == (3, 2 * (3 + offset)) and not any(mask[i, offset + i] for i in range(3))
    assert mask[0, 3 + offset + offset] and mask.any(dim=1).sum() >= 1
    cos = lambda a, b: F.cosine_similarity(a, b, dim=0).item()  # noqa: E731
    docs = torch.cat([p, n])
    want = 0.0
    for i in range(3):
        own = cos(gq[i], gp[offset + i])
        keep = [j for j in range(docs.size(0)) if j == offset + i or cos(gq[i], torch.cat([gp, gn])[j]) <= own - margin]
        assert sorted(keep + mask[i].nonzero().flatten().tolist()) == list(range(docs.size(0)))
        den = sum(math.exp(cos(q[i], docs[j]) / tau) for j in keep)
        want += -math.log(math.exp(cos(q[i], p[offset + i]) / tau) / den)
    got = compute_loss_from_embeddings(q, p, n, tau, offset, guide=(gq, gp, gn), margin=margin)
    assert got.item() == pytest.approx(want / 3, rel=1e-5)
    # a margin below every score gap masks nothing: the plain loss
    none = compute_loss_from_embeddings(q, p, n, tau, offset, guide=(gq, gp, gn), margin=-10.0)
    assert none.item() == pytest.approx(compute_loss_from_embeddings(q, p, n, tau, offset).item(), rel=1e-6)


def _guided_loss_fn(model_guide, sides, margin=0.02, tau=0.05):
    with torch.no_grad():
        g = tuple(model_guide(t) for t in sides)
    return lambda q, p, n: compute_loss_from_embeddings(q, p, n, tau, guide=g, margin=margin)  # noqa: E731


@pytest.mark.parametrize("chunk", [1, 3])
def test_gist_grad_cache_matches_plain(chunk):
    torch.manual_seed(0)
    model = _Tiny().train()
    twin = copy.deepcopy(model)
    guide = copy.deepcopy(model).eval()
    sides = _sides()
    sides[2][4] = sides[1][4]                  # a hard negative that is its own positive: masked, not learned
    sides[1][7] = sides[1][2]                  # two rows with the same positive: each other's false negative
    loss_fn = _guided_loss_fn(guide, sides)
    with torch.no_grad():
        g = tuple(guide(t) for t in sides)
    from speed_ray.embedder.loss import false_negative_mask

    assert false_negative_mask(g[0], torch.cat([g[1], g[2]]), 0.02).sum() >= 2
    torch.manual_seed(123)
    plain = plain_step(lambda i, t: model(t), sides, loss_fn)
    torch.manual_seed(123)
    cached = grad_cache_step(lambda i, t: twin(t), sides, loss_fn, chunk)
    assert torch.isfinite(plain) and cached.item() == pytest.approx(plain.item(), abs=1e-5)
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)


def _gist_worker(rank, world, port, chunk, out):
    import torch.distributed as dist

    from speed_ray.embedder.loss import contrastive_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _Tiny().eval()                 # no dropout: the workers' forward passes equal one process's
        guide = copy.deepcopy(model)
        sides = _gist_sides()
        per = len(sides[0]) // world
        mine = [s[rank * per:(rank + 1) * per] for s in sides]
        with torch.no_grad():
            g = tuple(guide(t) for t in mine)
        loss_fn = lambda q, p, n: contrastive_loss(q, p, n, 0.05, True, g, 0.02)  # noqa: E731
        if chunk:
            loss = grad_cache_step(lambda i, t: model(t), mine, loss_fn, chunk)
        else:
            loss = plain_step(lambda i, t: model(t), mine, loss_fn)
        grads = [p.grad.clone() for p in model.parameters()]
        for t in grads:
            dist.all_reduce(t)
            t /= world
        total = loss.clone()
        dist.all_reduce(total)
        torch.save({"loss": float(total) / world, "grads": grads}, f"{out}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def _gist_sides():
    sides = _sides(8)
    sides[2][1] = sides[1][1]                  # own positive as hard negative (rank 0's row)
    sides[1][6] = sides[1][2]                  # a false negative across workers (rows 2 and 6)
    return sides


@pytest.mark.parametrize("chunk", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_gist_gathered_matches_single_process(chunk, tmp_path):
    """Two gloo processes, each with half the batch, masking with gathered guide embeddings: the mean loss and
    the averaged gradients equal one process's masked loss on the whole batch (plain and GradCache)."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = _Tiny().eval()
    guide = copy.deepcopy(model)
    sides = _gist_sides()
    want = plain_step(lambda i, t: model(t), sides, _guided_loss_fn(guide, sides))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gist_worker, args=(2, port, chunk, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = torch.load(f"{tmp_path}/r{r}.pt")
        assert got["loss"] == pytest.approx(want.item(), abs=1e-5)
        for (name, p), g in zip(model.named_parameters(), got["grads"]):
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_train_step_with_a_guide_masks_and_lowers_the_loss(minilm):
    """train_step with a frozen guide (the base model without LoRA): a hard negative that copies its positive is
    masked, so the guided loss is below the unguided one on the same weights."""
    from speed_ray.embedder.model import load_embedder
    from speed_ray.embedder.train import StepSettings, train_step

    torch.manual_seed(0)
    emb = load_embedder(minilm, lora=True, lora_r=4, max_length=32).eval()
    guide = load_embedder(minilm, lora=False, max_length=32).eval()
    q, p, n = _sides(6)
    batch = [{"query": a, "positive": b, "negative": b if i == 2 else c} for i, (a, b, c) in enumerate(zip(q, p, n))]
    s = StepSettings(temperature=0.05, gather=False, max_query_length=32, max_doc_length=32, gist_margin=0.01)
    guided = train_step(emb, batch, s, guide=guide)
    emb.zero_grad()
    plain = train_step(emb, batch, s)
    assert guided < plain - 1e-3
