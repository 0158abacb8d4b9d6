"""Models and adapters stored in an s3:// run directory: fetched once per node, refetched when replaced, and loaded
by every loader (the HF engine with a LoRA adapter, the embedder, the evaluator) from a local run dir and from S3."""

from __future__ import annotations

import json
import shutil

import pytest

from speed_ray.models.remote import is_remote, local_model_dir

pytestmark = pytest.mark.rehearsal


def _upload(local, url):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.put(str(local).rstrip("/") + "/", path, recursive=True)


def test_is_remote():
    assert is_remote("s3://b/x") and is_remote("gs://b/x") and is_remote("abfs://c/x")
    assert not is_remote("/tmp/x") and not is_remote("file:///tmp/x") and not is_remote("meta-llama/Meta-Llama-3-8B")
    assert local_model_dir("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"


def test_remote_model_is_fetched_once_and_again_when_replaced(s3_server, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPEED_RAY_CACHE", str(tmp_path / "cache"))
    url = f"s3://{s3_server['bucket']}/models/tiny"
    _upload(tiny_llama, url)
    first = local_model_dir(url)
    assert first.startswith(str(tmp_path / "cache")) and (tmp_path / "cache").exists()
    assert json.load(open(f"{first}/config.json")) == json.load(open(f"{tiny_llama}/config.json"))
    assert local_model_dir(url) == first                       # cached: same copy, no second download
    changed = tmp_path / "changed"
    shutil.copytree(tiny_llama, changed)
    conf = json.load(open(changed / "config.json"))
    conf["rope_theta"] = 1234.0
    json.dump(conf, open(changed / "config.json", "w"))
    _upload(changed, url)                                     # --force replaces a stage's output at the same URL
    second = local_model_dir(url)
    assert second != first and json.load(open(f"{second}/config.json"))["rope_theta"] == 1234.0


def test_missing_remote_model_names_the_url(s3_server):
    from speed_ray.models.offline import ModelNotFound

    with pytest.raises(ModelNotFound, match="nothing-here"):
        local_model_dir(f"s3://{s3_server['bucket']}/nothing-here")


def _adapter(tiny_llama, tmp_path):
    """A LoRA adapter on the tiny Llama with non-zero B (so it changes outputs), and the merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    peft.save_pretrained(tmp_path / "adapter")
    merged = peft.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(tmp_path / "merged")
    return tmp_path / "adapter", tmp_path / "merged"


def test_hf_engine_loads_adapters_from_local_and_s3_run_dirs(s3_server, tiny_llama, tmp_path, monkeypatch):
    from speed_ray.llm.rows import LLMRequest
    from speed_ray.generate.hf_engine import HFEngine

    monkeypatch.setenv("SPEED_RAY_CACHE", str(tmp_path / "cache"))
    adapter, merged = _adapter(tiny_llama, tmp_path)
    req = [LLMRequest([{"role": "user", "content": "Write a query."}], temperature=0.0, max_tokens=12, seed=1)]
    want = HFEngine(str(merged)).generate(req)[0].text
    base_only = HFEngine(tiny_llama).generate(req)[0].text
    assert want != base_only                                   # the adapter matters
    assert HFEngine(tiny_llama, adapter=str(adapter)).generate(req)[0].text == want
    url = f"s3://{s3_server['bucket']}/runs/x/stages/junior_sft/abc/artifacts"
    _upload(tiny_llama, url + "/model")
    _upload(adapter, url + "/adapter")
    assert HFEngine(url + "/model", adapter=url + "/adapter").generate(req)[0].text == want


def test_embedder_and_evaluator_load_from_s3(s3_server, minilm, tmp_path, monkeypatch):
    import numpy as np

    from speed_ray.embedder.model import load_embedder
    from speed_ray.evaluate.encoder import Embedder, load_sentence_transformer, model_key

    monkeypatch.setenv("SPEED_RAY_CACHE", str(tmp_path / "cache"))
    url = f"s3://{s3_server['bucket']}/models/minilm"
    _upload(minilm, url)
    emb = load_embedder(url, pooling="mean", lora=False)
    assert emb is not None
    local = load_sentence_transformer(minilm, 128).encode(["a cat"], convert_to_numpy=True)
    remote = load_sentence_transformer(url, 128).encode(["a cat"], convert_to_numpy=True)
    np.testing.assert_allclose(local, remote, atol=1e-6)
    key = model_key(url, 128)
    assert key.startswith(url) and key != model_key(url, 64)
    enc = Embedder(url, max_length=128)
    assert enc.path == url and enc._model is None
    _ = enc.template                                           # prompts are read from the files, no weights loaded
    assert enc._model is None


def test_evaluation_task_asks_ray_for_its_resources():
    from speed_ray.evaluate.config import EvalConfig
    from speed_ray.evaluate.stage import eval_task_options

    assert eval_task_options(EvalConfig()) is None              # CPU, not distributed: in process
    assert eval_task_options(EvalConfig(use_gpu=True)) == {"num_cpus": 1, "num_gpus": 1}
    assert eval_task_options(EvalConfig(distributed=True)) == {"num_cpus": 1, "num_gpus": 0}
    from speed_ray.run_config import load_config

    paper = load_config("configs/paper.yaml").evaluate
    assert eval_task_options(paper) == {"num_cpus": 1, "num_gpus": 1}


def test_hf_engine_actor_pool_loads_adapter_from_s3(ray_local, s3_server, tiny_llama, tmp_path):
    """generate_dataset's actor pool (a Ray worker, not this process) fetches the base and the adapter from S3."""
    from speed_ray.generate.config import EngineConfig
    from speed_ray.llm.rows import LLMRequest, request_columns
    from speed_ray.generate.hf_engine import HFEngine
    from speed_ray.generate.ray_engines import generate_dataset

    adapter, merged = _adapter(tiny_llama, tmp_path)
    req = LLMRequest([{"role": "user", "content": "Write a query."}], temperature=0.0, max_tokens=12, seed=1)
    want = HFEngine(str(merged)).generate([req])[0].text
    url = f"s3://{s3_server['bucket']}/runs/pool/stages/senior_dpo/abc/artifacts"
    _upload(tiny_llama, url + "/model")
    _upload(adapter, url + "/adapter")
    cfg = EngineConfig(kind="hf", use_adapter=True, batch_size=1, max_new_tokens=12, num_cpus_per_replica=0.5)
    ds = ray_local.data.from_items([{"id": "a", **request_columns(req)}])
    rows = generate_dataset(ds, cfg, url + "/model", url + "/adapter").take_all()
    assert [r["text"] for r in rows] == [want] and rows[0]["finish_reason"] != "error"
