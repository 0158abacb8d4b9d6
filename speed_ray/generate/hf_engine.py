"""Batched chat generation with Hugging Face transformers (the CPU engine), optionally JSON-schema constrained."""

from __future__ import annotations

import logging
from itertools import groupby
from typing import Any

from speed_ray.generate.engine import batch_seed
from speed_ray.llm.rows import LLMRequest, LLMResult, error_result

log = logging.getLogger("speed_ray.generate")


def _load_causal_lm(auto_cls, path: str, dtype, device: str, attention: str | None = None):
    """The model, on CPU with the copy-free grouped-query attention (gqa_attention.py; 2x faster generation of
    SmolLM2 on this project's CPU demo); models that cannot take a registered attention load with their default.
    `attention` names another attn_implementation (benchmarks/hf_attention.py compares "sdpa")."""
    if attention:
        return auto_cls.from_pretrained(path, dtype=dtype, attn_implementation=attention)
    if device == "cpu":
        from speed_ray.generate.gqa_attention import register

        try:
            return auto_cls.from_pretrained(path, dtype=dtype, attn_implementation=register())
        except (ValueError, ImportError) as e:
            log.info("%s: the grouped-query attention does not apply (%s); using the default attention", path, e)
    return auto_cls.from_pretrained(path, dtype=dtype)


class HFEngine:
    """transformers `generate` over left-padded batches; requests are grouped by (temperature, top_p).

    A group generates up to its largest max_tokens and each row is cut at its own max_tokens, which gives the
    same distribution as generating each row alone. A request that fails (template, tokenization, grammar)
    returns finish_reason="error" and never fails its neighbours.
    """

    name = "hf"

    def __init__(self, model: str, dtype: str = "auto", batch_size: int = 8, device: str | None = None,
                 max_model_len: int | None = None, adapter: str | None = None, attention: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from speed_ray.models.offline import resolve_model
        from speed_ray.models.remote import local_model_dir

        self.model_name = model
        path = local_model_dir(resolve_model(model))      # an s3:// checkpoint is fetched once per node
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":  # bf16 is ~5x slower than fp32 on CPU
            torch_dtype = torch.float32 if self.device == "cpu" else torch.bfloat16
        else:
            torch_dtype = getattr(torch, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_obj = _load_causal_lm(AutoModelForCausalLM, path, torch_dtype, self.device, attention)
        if adapter:
            # A LoRA adapter on its base (use_adapter): merged once, so generation runs at the base model's speed.
            from peft import PeftModel

            model_obj = PeftModel.from_pretrained(model_obj, local_model_dir(adapter)).merge_and_unload()
        self.model = model_obj.to(self.device).eval()
        self.batch_size = batch_size
        self.max_model_len = max_model_len or getattr(self.model.config, "max_position_embeddings", None) or 4096
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        self._schemas = None
        self._torch = torch

    # ---- public API ----------------------------------------------------------------------------------
    def generate(self, requests: list[LLMRequest]) -> list[LLMResult]:
        results: list[LLMResult | None] = [None] * len(requests)
        prompts: list[tuple[int, list[int]]] = []
        for i, r in enumerate(requests):
            try:
                ids = self._encode(r)
                prompts.append((i, ids))
            except Exception as e:
                log.warning("request %d: cannot build the prompt: %s", i, e)
                results[i] = error_result(f"prompt: {type(e).__name__}: {e}")
        key = lambda p: (requests[p[0]].temperature, requests[p[0]].top_p)  # noqa: E731
        for _, group in groupby(sorted(prompts, key=key), key=key):
            group = list(group)
            # similar lengths together waste less padding
            group.sort(key=lambda p: len(p[1]))
            for s in range(0, len(group), self.batch_size):
                chunk = group[s:s + self.batch_size]
                for (i, _), res in zip(chunk, self._generate_chunk([requests[i] for i, _ in chunk],
                                                                   [ids for _, ids in chunk])):
                    results[i] = res
        return results  # type: ignore[return-value]

    # ---- internals -----------------------------------------------------------------------------------
    def _encode(self, r: LLMRequest) -> list[int]:
        ids = self.tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)
        if len(ids) + 1 > self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds max_model_len {self.max_model_len}")
        return ids

    def _schema_compiler(self):
        if self._schemas is None:
            from speed_ray.generate.structured import SchemaCompiler

            self._schemas = SchemaCompiler(self.tokenizer, self._vocab_size(), self.eos_ids)
        return self._schemas

    def _vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def _generate_chunk(self, reqs: list[LLMRequest], ids: list[list[int]]) -> list[LLMResult]:
        try:
            return self._generate_chunk_unsafe(reqs, ids)
        except Exception as e:
            if len(reqs) == 1:
                log.warning("generation failed for one request: %s", e)
                return [error_result(f"generate: {type(e).__name__}: {e}")]
            # isolate the bad request(s): retry one by one
            log.warning("a batch of %d failed (%s); retrying its requests one by one", len(reqs), e)
            return [self._generate_chunk([r], [x])[0] for r, x in zip(reqs, ids)]

    def _generate_chunk_unsafe(self, reqs: list[LLMRequest], ids: list[list[int]]) -> list[LLMResult]:
        torch = self._torch
        from transformers import LogitsProcessorList

        pad = self.tokenizer.pad_token_id
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=self.device)
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=self.device)
        budget = self.max_model_len - width
        max_new = max(1, min(max(r.max_tokens for r in reqs), budget))
        processors = LogitsProcessorList()
        grammar_proc = None
        if any(r.json_schema for r in reqs):
            comp = self._schema_compiler()
            grammars = []
            for r in reqs:
                try:
                    grammars.append(comp.compile(r.json_schema) if r.json_schema else None)
                except Exception as e:  # a bad schema leaves that row unconstrained rather than failing it
                    log.warning("cannot compile a JSON schema (%s); generating that row unconstrained", e)
                    grammars.append(None)
            from speed_ray.generate.structured import RowGrammarLogitsProcessor

            grammar_proc = RowGrammarLogitsProcessor(grammars, self._vocab_size())
            processors.append(grammar_proc)
        r0 = reqs[0]
        do_sample = r0.temperature > 0
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=do_sample, pad_token_id=pad,
                                          eos_token_id=self.eos_ids, logits_processor=processors)
        if do_sample:
            gen_kwargs.update(temperature=r0.temperature, top_p=r0.top_p, top_k=0)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        seed = batch_seed(reqs)
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **gen_kwargs)
        new = out[:, width:].tolist()
        results = []
        eos = set(self.eos_ids)
        for r, prompt, row in zip(reqs, ids, new):
            limit = min(r.max_tokens, max_new)
            toks, finish = [], "length"
            for t in row[:limit]:
                if t in eos:
                    finish = "stop"
                    break
                toks.append(t)
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            results.append(LLMResult(text=text, prompt_tokens=len(prompt),
                                     completion_tokens=len(toks) + (finish == "stop"), finish_reason=finish))
        return results
