"""The embedder: a Hugging Face backbone with last-token (EOS) or mean pooling, LoRA, and SentenceTransformer export.

Decoder LLMs use E5-mistral's recipe (https://arxiv.org/abs/2401.00368): an EOS token appended to every input and
the last layer's state at that EOS as the embedding. The EOS is appended by the tokenizer's own post-processor,
so the exported SentenceTransformer tokenizes exactly as training did.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Literal

import torch
from torch import Tensor, nn

Pooling = Literal["mean", "last_token", "cls"]


def is_decoder(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForCausalLM") for a in archs) or bool(getattr(config, "is_decoder", False))


def resolve_pooling(pooling: str, config) -> Pooling:
    """auto: last_token for decoder LLMs (E5-mistral), mean for encoders (sentence-transformers' default)."""
    if pooling != "auto":
        return pooling  # type: ignore[return-value]
    return "last_token" if is_decoder(config) else "mean"


def ensure_eos_appended(tok):
    """Make the tokenizer end every encoded text with EOS (and keep a BOS if it adds one), then check it does."""
    from tokenizers import processors

    if tok.eos_token_id is None:
        raise ValueError("last-token pooling needs a tokenizer with an eos_token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token   # the attention mask, not the pad id, decides what is pooled
    tok.padding_side = "right"
    probe = "a b"
    ids = tok(probe)["input_ids"]
    if ids and ids[-1] == tok.eos_token_id:
        return tok
    bare = tok(probe, add_special_tokens=False)["input_ids"]
    prefix = ids[: len(ids) - len(bare)] if ids[len(ids) - len(bare):] == bare else []
    specials = {tok.convert_ids_to_tokens(i): i for i in prefix}
    eos = tok.eos_token
    specials[eos] = tok.eos_token_id
    head = " ".join(tok.convert_ids_to_tokens(i) for i in prefix)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{head} $A:0 {eos}".strip(), pair=f"{head} $A:0 {eos} $B:1 {eos}:1".strip(),
        special_tokens=list(specials.items()))
    ids = tok(probe)["input_ids"]
    if not ids or ids[-1] != tok.eos_token_id:
        raise ValueError(f"could not make tokenizer {type(tok).__name__} append {eos!r}")
    return tok


def pool(hidden: Tensor, mask: Tensor, pooling: Pooling) -> Tensor:
    """(n, t, d) token states -> (n, d). last_token takes the last position the mask keeps, for either padding side
    (the same rule as sentence-transformers' Pooling 'lasttoken', so the export embeds identically)."""
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    t = mask.size(1)
    last = t - 1 - mask.flip(1).to(torch.int64).argmax(1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def plan_passes(lengths: list[int], pass_tokens: float, attention_width: float,
                max_rows: Callable[[int], int] | None = None) -> list[list[int]]:
    """Cut texts of these token lengths into forward passes (lists of indices, each padded to its longest) with
    the least estimated cost: per pass, rows x width x (1 + width / attention_width) (the layers' work per padded
    token, plus attention's, which grows with the width) and `pass_tokens` for the pass itself. max_rows(width),
    if given, caps the rows of a pass of that width (a longer run of texts is cut into as many passes as it
    needs, each charged pass_tokens).

    The optimum takes texts sorted by length, longest first, in runs of consecutive texts cut only where the
    length changes (moving a boundary to the start of its run of equal lengths moves texts from a wider pass to
    a narrower one), so a dynamic program over the runs finds it: O(runs^2), runs <= the max length."""
    import numpy as np

    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    starts = [k for k in range(len(order)) if k == 0 or lengths[order[k]] != lengths[order[k - 1]]]
    pos = np.array(starts + [len(order)], dtype=np.float64)         # run r covers order[pos[r]:pos[r+1]]
    width = np.array([lengths[order[k]] for k in starts], dtype=np.float64)
    per_row = width * (1.0 + width / attention_width)               # a pass starting at run r pads to its width
    cap = np.array([max(1, max_rows(int(w))) if max_rows else len(order) for w in width], dtype=np.float64)
    best = np.zeros(len(starts) + 1)                                 # best[e]: least cost of the first e runs
    cut = np.zeros(len(starts) + 1, dtype=np.int64)
    for e in range(1, len(starts) + 1):
        rows = pos[e] - pos[:e]
        cost = best[:e] + rows * per_row[:e] + np.ceil(rows / cap[:e]) * pass_tokens
        cut[e] = int(np.argmin(cost))
        best[e] = cost[cut[e]]
    passes, e = [], len(starts)
    while e > 0:
        s = int(cut[e])
        run = order[int(pos[s]):int(pos[e])]
        k = -(-len(run) // int(cap[s]))                             # over the cap: k passes of near-equal rows
        passes.extend(run[j * len(run) // k:(j + 1) * len(run) // k] for j in reversed(range(k)))
        e = s
    return passes[::-1]


class Embedder(nn.Module):
    """backbone + pooling; encode(texts) tokenizes, runs the backbone and pools."""

    def __init__(self, backbone: nn.Module, tokenizer, pooling: Pooling, max_length: int = 512,
                 autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.autocast_dtype = autocast_dtype

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length or self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                hidden = self.backbone(**features).last_hidden_state
        else:
            hidden = self.backbone(**features).last_hidden_state
        return pool(hidden, features["attention_mask"], self.pooling).float()

    def encode(self, texts: list[str], max_length: int | None = None) -> Tensor:
        return self(self.tokenize(texts, max_length))

    def _pad(self, seqs: list[list[int]]) -> dict[str, Tensor]:
        """input_ids + attention_mask for token id lists, padded on the tokenizer's padding side."""
        width = max(len(x) for x in seqs)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for r, x in enumerate(seqs):
            sl = slice(width - len(x), width) if left else slice(0, len(x))
            ids[r, sl] = torch.tensor(x, dtype=torch.long)
            mask[r, sl] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    #: encode_packed: what one more forward pass costs, in padded tokens (its fixed work: every layer's kernels
    #: and their backward, launched and, on CPU, synchronized across threads once more).
    pass_tokens: int = 512
    #: CPU: the most bytes the largest activation of one layer may take in one pass (see rows_per_pass).
    cpu_pass_bytes: int = 24 << 20

    def _row_bytes(self, width: int) -> int:
        """Bytes of the largest activation one text of this padded width adds to a layer: the attention weights
        (heads x width x width) where they are materialized (eager attention, or SDPA with dropout in training,
        which takes torch's math kernel on CPU), else the MLP's (intermediate x width)."""
        cfg = getattr(self.backbone, "config", None)
        hidden = getattr(cfg, "hidden_size", None) or 0
        per_token = max(hidden, getattr(cfg, "intermediate_size", None) or 4 * hidden)
        dropout = getattr(cfg, "attention_probs_dropout_prob", None) or getattr(cfg, "attention_dropout", None) or 0.0
        if getattr(cfg, "_attn_implementation", None) == "eager" or (self.training and dropout > 0):
            per_token = max(per_token, (getattr(cfg, "num_attention_heads", None) or 1) * width)
        itemsize = (self.autocast_dtype or next(self.backbone.parameters()).dtype).itemsize
        return max(1, width * per_token * itemsize)

    def rows_per_pass(self, width: int) -> int:
        """The most texts one forward pass of encode_packed takes at this padded width (0: no limit).

        On CPU torch allocates with malloc, and glibc serves every block over its mmap threshold (32 MiB at most)
        with fresh pages from the kernel, zeroed on first touch, and hands them back on free: an activation over
        it costs a page fault per 4 KiB on every step, forward and backward. Long documents pass it: a 32 x 256
        pass of MiniLM in training holds 100 MB of attention weights per layer, and a fifth of the step went to
        the kernel. Passes whose activations stay under cpu_pass_bytes reuse the heap's memory from step to step.
        Elsewhere (a GPU's caching allocator) there is no limit."""
        if self.device.type != "cpu" or self.cpu_pass_bytes <= 0:
            return 0
        return max(1, self.cpu_pass_bytes // self._row_bytes(width))

    def encode_packed(self, sides: list[list[str]], max_lengths: list[int],
                      pass_tokens: float | None = None) -> list[Tensor]:
        """Embed the texts of several sides (queries, positives, negatives) in the forward passes that cost least:
        every text is tokenized alone (truncated to its side's max length), and plan_passes cuts them, sorted by
        length, into passes that each pad to their own longest, weighing the padding a pass adds against the
        fixed cost of one more pass (`pass_tokens`, default self.pass_tokens), with no pass over rows_per_pass
        texts. Per-side padding, as in three separate encode calls, pads every short text of a side to its
        longest (on synthetic triples, whose documents run from a few words to a few hundred, that is about a
        third more tokens); one pass per text length would pay a pass's overhead dozens of times. Uniform lengths
        go in one pass per length (the documents of both sides together); documents that fill their max length
        on CPU in passes of rows_per_pass. Returns one (n_side, d) tensor per side, in order, with gradients
        flowing back to every pass."""
        ids: list[list[int]] = []
        for texts, m in zip(sides, max_lengths):
            ids.extend(self.tokenizer(list(texts), truncation=True, max_length=m or self.max_length)["input_ids"])
        hidden = getattr(getattr(self.backbone, "config", None), "hidden_size", None) or 512
        limited = self.rows_per_pass(1) > 0
        chunks = plan_passes([len(x) for x in ids], self.pass_tokens if pass_tokens is None else pass_tokens,
                             attention_width=2 * hidden, max_rows=self.rows_per_pass if limited else None)
        outs = []
        for chunk in chunks:
            outs.append(self(self._pad([ids[i] for i in chunk])))
        flat = torch.cat(outs)                                   # rows in chunk order
        back = torch.argsort(torch.tensor([i for c in chunks for i in c]))
        flat = flat.index_select(0, back.to(flat.device))        # rows back in input order
        return list(flat.split([len(t) for t in sides]))


def load_embedder(path: str, pooling: str = "auto", lora: bool = True, lora_r: int = 16, lora_alpha: int = 16,
                  lora_dropout: float = 0.0, precision: str = "fp32", gradient_checkpointing: bool = False,
                  max_length: int = 512) -> Embedder:
    """Backbone (no LM head) from a local dir or hub id, with LoRA on every linear layer (E5-mistral: r=16)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from speed_ray.models.remote import local_model_dir

    path = local_model_dir(path)       # an s3:// base model: fetched once per node
    config = AutoConfig.from_pretrained(path)
    mode = resolve_pooling(pooling, config)
    tok = AutoTokenizer.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path, dtype=storage_dtype(precision, lora))
    return make_embedder(backbone, tok, mode, lora, lora_r, lora_alpha, lora_dropout, precision,
                         gradient_checkpointing, max_length)


def compute_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision (None: plain fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def storage_dtype(precision: str, lora: bool) -> torch.dtype:
    """The dtype the backbone's weights are stored in. Mixed precision computes in fp16/bf16 under autocast, but
    every trainable weight stays fp32 (the optimizer's updates would round away in half precision, and fp16's
    GradScaler refuses to unscale fp16 gradients): with LoRA the frozen base is stored in half precision (half
    the memory) and peft keeps the adapters in fp32; without LoRA every weight is trainable, so fp32 masters."""
    half = compute_dtype(precision)
    return half if (half is not None and lora) else torch.float32


def make_embedder(backbone: nn.Module, tok, pooling: Pooling, lora: bool = True, lora_r: int = 16,
                  lora_alpha: int = 16, lora_dropout: float = 0.0, precision: str = "fp32",
                  gradient_checkpointing: bool = False, max_length: int = 512) -> Embedder:
    """An embedder around a loaded backbone (weights in storage_dtype(precision, lora)): the EOS-appending
    tokenizer for last-token pooling, gradient checkpointing, LoRA, and autocast for fp16/bf16."""
    if pooling == "last_token":
        tok = ensure_eos_appended(tok)
    if gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model

        # all-linear: q,k,v,o and the MLP, as in E5-mistral; autocast_adapter_dtype keeps the adapters in fp32.
        backbone = get_peft_model(backbone, LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                       target_modules="all-linear", task_type="FEATURE_EXTRACTION"),
                                  autocast_adapter_dtype=True)
    low = sorted({str(p.dtype) for p in backbone.parameters() if p.requires_grad and p.dtype != torch.float32})
    if low:
        raise ValueError(f"precision={precision}: trainable weights must be fp32 (mixed precision keeps fp32 "
                         f"masters), found {', '.join(low)}; load the backbone in storage_dtype()")
    return Embedder(backbone, tok, pooling, max_length, autocast_dtype=compute_dtype(precision))


def trainable_state(embedder: Embedder) -> dict[str, Tensor]:
    """Only what training changes (the LoRA weights, or everything without LoRA): what a checkpoint holds."""
    return {k: v.detach().cpu() for k, v in embedder.backbone.named_parameters() if v.requires_grad}


def load_trainable_state(embedder: Embedder, state: dict[str, Tensor]) -> None:
    params = dict(embedder.backbone.named_parameters())
    if not state and any(p.requires_grad for p in params.values()):
        raise ValueError("checkpoint holds no trainable weights (written after the LoRA merge of the export?)")
    missing = [k for k in state if k not in params]
    if missing:
        raise ValueError(f"checkpoint has parameters the model lacks: {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def save_sentence_transformer(embedder: Embedder, out_dir: str, query_instruction: str,
                              max_seq_length: int) -> str:
    """Merge LoRA, write a SentenceTransformer dir: backbone + Pooling (training's mode) + Normalize, with the
    query instruction stored as its "query" prompt and cosine similarity. Documents are encoded with no prompt.
    The merge happens in place: afterwards the embedder has no LoRA weights left (take trainable_state first)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling as STPooling

    from speed_ray.embedder.data import query_prompt

    backbone = embedder.backbone
    if hasattr(backbone, "merge_and_unload"):
        backbone = backbone.merge_and_unload()
    # Exported in the training's compute precision (fp32 masters of full fine-tuning become fp16/bf16 too).
    dtype = embedder.autocast_dtype or next(backbone.parameters()).dtype
    tmp = tempfile.mkdtemp(prefix="speedray-embedder-")
    try:
        backbone.save_pretrained(tmp, safe_serialization=True)
        # An embedder does not chat: with a chat template, sentence-transformers would wrap every text in it
        # and tokenize differently from training.
        embedder.tokenizer.chat_template = None
        embedder.tokenizer.save_pretrained(tmp)
        for name in ("chat_template.jinja", "chat_template.json"):
            if os.path.exists(os.path.join(tmp, name)):
                os.remove(os.path.join(tmp, name))
        word = Transformer(tmp, max_seq_length=max_seq_length, model_kwargs={"dtype": dtype})
        mode = {"last_token": "lasttoken"}.get(embedder.pooling, embedder.pooling)
        st = SentenceTransformer(modules=[word, STPooling(word.get_embedding_dimension(), mode), Normalize()],
                                 prompts={"query": query_prompt(query_instruction), "document": ""},
                                 default_prompt_name=None, similarity_fn_name="cosine", device="cpu")
        probe = ["Instruct: probe\nQuery: two words"]
        got = st.preprocess(probe)["input_ids"][0].tolist()
        want = embedder.tokenizer(probe)["input_ids"][0]
        if got != want:
            raise RuntimeError(f"the exported model tokenizes differently from training ({got} vs {want})")
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        st.save(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
