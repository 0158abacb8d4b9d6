"""Grouped-query attention without copying the KV cache, for transformers' generate on CPU.

transformers' "sdpa" attention repeats every key/value head `num_key_value_groups` times (`repeat_kv`) whenever
an attention mask is passed, and left-padded batches always pass one. That copy of the whole KV cache, in every
layer at every decoding step, took a third of the demo's generation time (SmolLM2-135M: 9 query heads on 3 KV
heads). Folding each KV head's group of query heads into the query-length axis gives the same attention with no
copy: query (b, kvh * g, q, d) -> (b, kvh, g * q, d) attends to key (b, kvh, L, d); the mask's rows repeat g times.

`register()` adds it as attn_implementation "speed_ray_gqa" (with sdpa's masks); HFEngine uses it on CPU.
"""

from __future__ import annotations

NAME = "speed_ray_gqa"


def gqa_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    import torch

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = getattr(module, "num_key_value_groups", 1)
    b, h, q, d = query.shape
    kvh = key.shape[1]
    if (g == 1 or attention_mask is None or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
            or h != kvh * g or attention_mask.dim() != 4):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    qf = query.reshape(b, kvh, g * q, d)     # query head j uses KV head j // g (repeat_kv's order)
    if attention_mask.shape[1] == 1:
        mask = attention_mask.repeat(1, 1, g, 1)                          # rows (r, t) -> t
    else:
        mask = attention_mask.reshape(b, kvh, g * q, attention_mask.shape[-1])
    out = torch.nn.functional.scaled_dot_product_attention(qf, key, value, attn_mask=mask, dropout_p=dropout,
                                                           scale=scaling)
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention (and sdpa's mask builder under the same name); returns the name to load with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
