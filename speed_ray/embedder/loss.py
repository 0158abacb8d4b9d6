"""InfoNCE with in-batch, hard and cross-worker negatives (SPEED eq. 4), and GradCache for memory-free batch size.

Loss: SPEED Section 3.3 eq. 4 / E5-mistral (https://arxiv.org/abs/2401.00368), cosine similarity over temperature.
GradCache: Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
https://arxiv.org/abs/2101.06983.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


Guide = tuple  # (guide q (b, g), guide p (B, g), guide n (B, g) or None): a guide model's embeddings, no grad


def false_negative_mask(gq: Tensor, gdocs: Tensor, margin: float, offset: int = 0) -> Tensor:
    """GISTEmbed's mask (Solatorio 2024, https://arxiv.org/abs/2402.16829; sentence-transformers' GISTEmbedLoss,
    "absolute" margin): (b, C) True where the guide scores candidate j for query i above the guide's score of
    i's own positive (column offset + i) minus `margin`: a likely false negative, left out of i's softmax. The
    target column is never masked."""
    sims = F.normalize(gq.float(), dim=-1) @ F.normalize(gdocs.float(), dim=-1).T     # (b, C)
    rows = torch.arange(gq.size(0), device=gq.device)
    own = sims[rows, offset + rows].unsqueeze(1)
    mask = sims > own - margin
    mask[rows, offset + rows] = False
    return mask


def compute_loss_from_embeddings(q: Tensor, p: Tensor, n: Tensor | None, temperature: float,
                                 offset: int = 0, guide: Guide | None = None, margin: float = 0.0) -> Tensor:
    """Mean InfoNCE of the queries q against every positive p and every hard negative n (None: pairs, whose
    negatives are the other rows' positives only).

    q: (b, d) this worker's queries; p, n: (B, d) positives and hard negatives of the whole (gathered) batch,
    where q[i] belongs with p[offset + i] and n[offset + i]. Candidates are [p; n]: query i's target is column
    offset + i, so a hard negative (columns B..2B-1) is a negative for every query and a positive for none.

    guide: the same rows' guide embeddings (gq local, gp and gn global like p and n): candidates the guide scores
    above the query's own positive minus `margin` are masked out (`false_negative_mask`)."""
    q = F.normalize(q, dim=-1)
    docs = F.normalize(p if n is None else torch.cat([p, n], dim=0), dim=-1)       # (2B, d), or (B, d)
    logits = q @ docs.T / temperature                          # (b, 2B)
    if guide is not None:
        gq, gp, gn = guide
        gdocs = gp if n is None else torch.cat([gp, gn], dim=0)
        logits = logits.masked_fill(false_negative_mask(gq, gdocs, margin, offset), float("-inf"))
    labels = torch.arange(offset, offset + q.size(0), device=q.device)
    return F.cross_entropy(logits.float(), labels)


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows. torch.distributed.nn's
    all_gather does the same but needs reduce_scatter or all_to_all, which gloo (CPU workers) may lack; the
    gradients here are (B, d) embeddings, so an all_reduce costs nothing next to the model."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.size(0), rank
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 (every rank holds the same number of rows), keeping gradients: each worker gets
    the gradient of every worker's loss wrt its own embeddings. Identity without a process group."""
    if not _dist_ready():
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 without gradients (the guide's embeddings). Identity without a process group."""
    if not _dist_ready():
        return x
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def contrastive_loss(q: Tensor, p: Tensor, n: Tensor | None, temperature: float, gather: bool = True,
                     guide: Guide | None = None, margin: float = 0.0) -> Tensor:
    """This worker's loss with negatives from every worker. Averaging the workers' gradients (DDP does) gives
    exactly the gradient of the single-process loss over the global batch. guide: this worker's rows' guide
    embeddings (gq, gp, gn or None): gathered like p and n, so the false-negative mask is the global batch's."""
    if not (gather and _dist_ready()):
        return compute_loss_from_embeddings(q, p, n, temperature, guide=guide, margin=margin)
    offset = torch.distributed.get_rank() * q.size(0)
    if guide is not None:
        gq, gp, gn = guide
        guide = (gq, gather_no_grad(gp), None if gn is None else gather_no_grad(gn))
    return compute_loss_from_embeddings(q, gather_with_grad(p), None if n is None else gather_with_grad(n),
                                        temperature, offset, guide, margin)


class RandState:
    """The CPU and CUDA RNG states at one moment, so a chunk's second forward sees the same dropout masks."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    @contextmanager
    def replay(self):
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield


Encode = Callable[[int, list[str]], Tensor]   # (side index: 0 query, 1 positive, 2 negative; texts)
LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def plain_step(encode: Encode, sides: Sequence[list[str]], loss_fn: LossFn,
               backward: Callable[[Tensor], object] | None = None,
               encode_all: Callable[[Sequence[list[str]]], list[Tensor]] | None = None) -> Tensor:
    """Embed every side with grad (side by side with `encode`, or all at once with `encode_all`), compute the
    loss, backprop (with `backward`, e.g. a DeepSpeed engine's). Returns the detached loss."""
    embs = encode_all(sides) if encode_all is not None else [encode(i, texts) for i, texts in enumerate(sides)]
    loss = loss_fn(*embs)
    (backward or Tensor.backward)(loss)
    return loss.detach()


def grad_cache_step(encode: Encode, sides: Sequence[list[str]], loss_fn: LossFn, chunk_size: int) -> Tensor:
    """GradCache: the same gradients as plain_step with activation memory for one chunk, not the batch.

    1. embed each chunk without grad (remembering its RNG state);
    2. loss on the detached embeddings, backward to get d loss / d embedding (the cache);
    3. re-embed each chunk with grad under the same RNG state and backprop its cached gradient."""
    chunks = [[texts[i:i + chunk_size] for i in range(0, len(texts), chunk_size)] for texts in sides]
    states: list[list[RandState]] = []
    embs: list[Tensor] = []
    with torch.no_grad():
        for i, side in enumerate(chunks):
            states.append([])
            parts = []
            for chunk in side:
                states[-1].append(RandState())
                parts.append(encode(i, chunk))
            embs.append(torch.cat(parts).detach().requires_grad_())
    loss = loss_fn(*embs)
    loss.backward()
    for i, (side, side_states, emb) in enumerate(zip(chunks, states, embs)):
        grads = emb.grad.split([len(c) for c in side])
        for chunk, state, grad in zip(side, side_states, grads):
            with state.replay():
                out = encode(i, chunk)
                # d loss / d params = sum over rows of (d loss / d emb) . (d emb / d params)
                out.backward(grad.to(out.dtype))
    return loss.detach()
