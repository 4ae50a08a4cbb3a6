"""Tiny random models and a tiny tokenizer for fast CPU tests (qcorda's tests and eval/ import them from here)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

VOCAB = 384


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from qcorda.data import BUNDLED

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    lines = BUNDLED["gsm8k-train"].read_text().splitlines()[:200] + BUNDLED["wikitext2"].read_text().splitlines()[:200]
    tok.train_from_iterator(lines, trainer)
    return tok.to_str()


def tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tok.padding_side = "right"
    return tok


def config(arch: str = "llama", **kw):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        c = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common)
    elif arch == "qwen2":
        c = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **common)
    elif arch == "gemma":
        c = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16, **common)
    elif arch == "gpt2":
        c = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        raise ValueError(arch)
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def model(arch: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(arch, **kw), dtype=torch.float32)
    m.eval()
    return m


def save(tmp_path, arch: str = "llama", seed: int = 0):
    """A tiny model + tokenizer saved as an HF directory ``tmp_path/tiny-ARCH`` (``tmp_path``: a str or Path)."""
    path = Path(tmp_path) / f"tiny-{arch}"
    model(arch, seed).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path
