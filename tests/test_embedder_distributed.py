"""Negatives gathered over two Ray Train workers give the single-process loss and gradients on the global batch."""

from __future__ import annotations

import pytest
import torch

from speed_ray.embedder.loss import compute_loss_from_embeddings

B, D_IN, D = 8, 12, 6


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, D_IN, generator=g) for _ in range(3)]


def _model():
    torch.manual_seed(1)
    return torch.nn.Linear(D_IN, D)


def _worker(config):
    import ray.train
    import torch.distributed as dist

    from speed_ray.embedder.loss import contrastive_loss, grad_cache_step
    from speed_ray.embedder.train import average_gradients

    rank, world = dist.get_rank(), dist.get_world_size()
    xs = [x[rank * (B // world):(rank + 1) * (B // world)] for x in _data()]
    model = _model()
    if config["chunk"]:
        # GradCache across workers: "texts" are row indices into this worker's slice
        encode = lambda side, rows: model(xs[side][[int(r) for r in rows]])  # noqa: E731
        sides = [[str(i) for i in range(B // world)]] * 3
        loss = grad_cache_step(encode, sides, lambda q, p, n: contrastive_loss(q, p, n, 0.05), config["chunk"])
    else:
        loss = contrastive_loss(*(model(x) for x in xs), 0.05)
        loss.backward()
    average_gradients(list(model.parameters()))
    t = loss.detach().clone()
    dist.all_reduce(t)
    metrics = {"loss": float(t) / world, "grad_w": model.weight.grad.tolist(), "grad_b": model.bias.grad.tolist()}
    # Ray Train V2 keeps a run's metrics with its checkpoints, so rank 0 attaches a (tiny) one
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/done", "w").write("ok")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


@pytest.mark.parametrize("chunk", [0, 1])
def test_two_worker_gathered_loss_equals_single_process(ray_local, chunk, tmp_path):
    import sys

    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray workers cannot import tests/: ship this module's functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    model = _model()
    loss = compute_loss_from_embeddings(*(model(x) for x in _data()), 0.05)
    loss.backward()

    result = TorchTrainer(_worker, train_loop_config={"chunk": chunk},
                          scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                                       resources_per_worker={"CPU": 0.5}),
                          run_config=RunConfig(name=f"gather{chunk}", storage_path=str(tmp_path))).fit()
    m = result.metrics
    assert m["loss"] == pytest.approx(loss.item(), abs=1e-5)
    torch.testing.assert_close(torch.tensor(m["grad_w"]), model.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(m["grad_b"]), model.bias.grad, atol=1e-5, rtol=1e-4)
