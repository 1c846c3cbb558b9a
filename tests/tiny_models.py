"""Tiny random-init causal LMs and a word-level tokenizer for tests.

Nothing here touches the network: configs are built in code, the tokenizer is
a `tokenizers` WordLevel model over a fixed vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

FAMILIES = ("llama", "qwen2", "gemma2", "gemma3_text", "mistral")

SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = (
    "question answer text label sentiment emotion sentence category snippet paraphrase yes no "
    "what who where when why how which is are was the a an of in on to and or for with by from "
    "abbreviation description entity human location number "
    "terrible bad neutral good great sadness joy love anger fear surprise "
    "business computers culture-arts-entertainment education-science engineering health "
    "politics-society sports culture education politics "
    "positive negative 0 1 2 3 4 5 6 7 8 9 : ? . , ! ' \" ( ) - ; "
    "i you he she it we they this that these those movie film very not feel feeling am "
    "city country name capital river mountain year day many much long far fast big small "
    "happy sad angry afraid surprised loved stock market computer school doctor game team "
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace + punctuation split) with pad/unk/bos/eos."""
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(SPECIAL + WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_config(family: str, vocab_size: int, num_layers: int = 4, **overrides):
    """A small config of the given family (hidden 64, 4 heads, 2 kv heads)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    if family == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=True)
    elif family == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=False)
    elif family == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif family == "gemma2":
        cfg = Gemma2Config(
            **common, sliding_window=8, query_pre_attn_scalar=16,
            final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        )
    elif family == "gemma3_text":
        cfg = Gemma3TextConfig(**common, sliding_window=8, query_pre_attn_scalar=16)
    else:
        raise ValueError(f"unknown tiny family {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(
    family: str = "llama", *, seed: int = 0, num_layers: int = 4, attn: str = "eager", **overrides
):
    """A random-init tiny causal LM of `family` in float32, in eval mode."""
    tok = tiny_tokenizer()
    cfg = tiny_config(family, len(tok), num_layers=num_layers, **overrides)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.float().eval()


def save_tiny_model(path: str | Path, family: str = "llama", **kwargs) -> Path:
    """Write a tiny model + tokenizer as a local HF directory and return its path."""
    path = Path(path)
    tiny_model(family, **kwargs).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


#: Every standard-layout decoder family transformers ships here that the runner is tested on
#: (exact logits + no backward below the cut, tests/test_families.py).
STANDARD_FAMILIES = (
    "llama", "qwen2", "qwen3", "mistral", "ministral", "ministral3", "gemma", "gemma2", "gemma3_text",
    "vaultgemma", "phi3", "olmo", "olmo2", "olmo3", "granite", "granite_swa", "starcoder2", "cohere",
    "cohere2",
    "glm", "glm4", "helium", "smollm3", "minicpm3", "nemotron", "exaone4", "seed_oss", "arcee", "apertus",
    "ernie4_5", "nanochat", "bitnet", "cwm", "diffllama", "hunyuan_v1_dense", "jais2", "stablelm",
)

# families whose attention has its own head geometry (multi-head latent attention)
_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
            num_key_value_heads=4, head_dim=None)


def tiny_standard_model(model_type: str, *, seed: int = 0, num_layers: int = 4, sliding_window: int = 5):
    """A random-init tiny float32 causal LM of any standard family, from its default config made small.

    Sliding-window layers (where the family has them) get window `sliding_window`, alternating with full
    attention when the family has per-layer types, so inputs longer than the window exercise both masks.
    """
    from transformers import AutoConfig

    small = dict(vocab_size=len(tiny_tokenizer()), hidden_size=64, intermediate_size=128,
                 num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if model_type == "minicpm3":
        small.update(_MLA)
    cfg = AutoConfig.for_model(model_type, **small)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        cfg.layer_types = (["sliding_attention", "full_attention"] * num_layers)[:num_layers] \
            if "sliding_attention" in types else [types[0]] * num_layers
    if getattr(cfg, "sliding_window", None) is not None:
        cfg.sliding_window = sliding_window
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.float().eval()
