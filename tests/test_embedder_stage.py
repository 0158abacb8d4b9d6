"""The train_embedder stage end to end on MiniLM: trains on Ray Train, exports a SentenceTransformer, resumes."""

from __future__ import annotations

import pytest
import torch

from speed_ray.embedder.loss import compute_loss_from_embeddings


def _rows(n=48):
    topics = ["volcano eruptions", "tax law", "chess openings", "bread baking", "jazz history", "bee colonies"]
    rows = []
    for i in range(n):
        t, o = topics[i % 6], topics[(i + 3) % 6]
        rows.append({"id": f"s{i}", "task_type": "retrieval", "task": "Given a question, retrieve passages",
                     "query": f"question {i} about {t}", "positive": f"a passage {i} explaining {t} in detail",
                     "negative": f"a passage {i} explaining {o} in detail"})
    return rows


def _ctx(tmp_path, rows, **embedder):
    from speed_ray.stage import StageContext
    from speed_ray.run_config import build_config
    from speed_ray.store import RunStore

    cfg = build_config({"run": {"run_dir": str(tmp_path), "seed": 0},
                        "embedder": {"base_model": "offline:minilm", "lora": True, "lora_r": 8, "lora_alpha": 16,
                                     "batch_size": 8, "learning_rate": 2e-4, "warmup_steps": 0,
                                     "max_query_length": 32, "max_doc_length": 32, "max_steps": 6, "save_steps": 3,
                                     "temperature": 0.05, **embedder}})
    store = RunStore(str(tmp_path))
    data = store.stage("dedup", "fp0")
    data.write_shard("s0", rows)
    data.write_manifest({"stage": "dedup"})
    return StageContext(cfg=cfg, name="train_embedder", out=store.stage("train_embedder", "fp1"),
                        inputs={"data": data}, store=store, run_name="t")


def _loss_of(encode, rows):
    from speed_ray.embedder.data import to_triples

    triples, _ = to_triples(rows)
    with torch.no_grad():
        q, p, n = (torch.as_tensor(encode([t[k] for t in triples])) for k in ("query", "positive", "negative"))
    return compute_loss_from_embeddings(q, p, n, 0.05).item()


@pytest.mark.slow
def test_stage_trains_exports_and_resumes(ray_local, tmp_path, minilm):
    from sentence_transformers import SentenceTransformer

    from speed_ray.embedder.stage import train_embedder_stage

    rows = _rows()
    ctx = _ctx(tmp_path, rows, num_workers=2)
    out = train_embedder_stage(ctx)
    assert out["metrics"]["steps"] == 6 and out["metrics"]["resumed_from_step"] == 0
    assert out["metrics"]["samples_per_s"] > 0

    st = SentenceTransformer(out["model_path"], device="cpu")
    assert st.prompts["query"] == f"Instruct: {ctx.cfg.embedder.query_instruction}\nQuery: "
    emb = st.encode(["hello"], prompt_name="query")
    assert emb.shape == (1, 384)
    # training lowered the contrastive loss on its data (the base model's loss vs the trained one's)
    base = SentenceTransformer(minilm, device="cpu")
    before = _loss_of(lambda t: base.encode(t, convert_to_tensor=True), rows)
    after = _loss_of(lambda t: st.encode(t, convert_to_tensor=True), rows)
    assert after < before

    # a rerun of the stage continues from its latest checkpoint instead of starting over
    again = train_embedder_stage(_ctx(tmp_path, rows, num_workers=2))
    assert again["metrics"]["resumed_from_step"] == 6 and again["metrics"]["steps_this_attempt"] == 0
