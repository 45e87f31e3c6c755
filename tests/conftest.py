"""Shared fixtures: tiny seeded random-config models, so no test downloads anything."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download: read before huggingface_hub is imported, inherited by subprocesses

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_tiny_lm(seed: int = 0, tie: bool = True, vocab_size: int = 64, hidden: int = 32, layers: int = 2):
    """A seeded Llama-architecture model small enough for unit tests (CPU, fp32)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config).eval()


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_tokenizer():
    """A character-level tokenizer with ChatML special tokens (about 100 ids), built offline."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation + " \n"))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture
def tiny_tokenizer():
    """Character-level ChatML tokenizer matching :func:`make_tiny_chat_lm`."""
    return make_tiny_tokenizer()


def make_tiny_chat_lm(seed: int = 0, hidden: int = 32, layers: int = 2):
    """A tiny Llama whose vocabulary and special ids match :func:`make_tiny_tokenizer`."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_lm(seed=seed, vocab_size=len(tokenizer), hidden=hidden, layers=layers)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model, tokenizer


TINY_FIT_CONFIG = """
trainer:
  max_steps: 2
  limit_val_batches: 0
  enable_progress_bar: false
  enable_model_summary: false
checkpoint:
  every_n_train_steps: 10
model:
  model_name_or_path: {model}
  num_generations: 2
  max_completion_length: 4
  learning_rate: 0.01
  mask: {mask}
data:
  env:
    class_path: tests.grpo.toy.LetterA
    init_args: {{letters: abcdefghij}}
  batch_size: 1
  eval_size: 2
"""
"""A two-step ``mth fit`` config of a tiny saved model (``{model}``) on the toy letter task; ``{mask}`` is YAML."""


def save_tiny_chat_lm(folder, seed: int = 0) -> str:
    """Save :func:`make_tiny_chat_lm` with its tokenizer as a Hugging Face folder; return its path."""
    model, tokenizer = make_tiny_chat_lm(seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_lm():
    """A tied-embedding tiny Llama (embeddings shared with ``lm_head``)."""
    return make_tiny_lm(tie=True)


@pytest.fixture
def tiny_lm_untied():
    """A tiny Llama without tied weights (``lm_head`` is its own parameter)."""
    return make_tiny_lm(tie=False)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's model cache out of the user's home."""
    if "MTH_CACHE" not in os.environ:
        monkeypatch.setenv("MTH_CACHE", str(tmp_path_factory.getbasetemp() / "mth_cache"))


def attached(model, masks, sparse_backward: bool = True):
    """A :class:`~mthlib.masking.SparseState` recording ``model``'s base for ``masks``, attached to ``model``."""
    from mthlib.masking import SparseState

    return SparseState.capture(model, masks).attach(model, sparse_backward=sparse_backward)
