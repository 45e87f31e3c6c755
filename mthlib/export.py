"""``mth export``: turn a sparse delta into a Hugging Face folder, a shareable delta folder or a PEFT adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from torch import nn

from mthlib.utils import atomic_dir
from mthlib.deltas import SparseDelta, apply_delta, load_delta, write_delta
from mthlib.peft_export import require_peft, write_shira_adapter

DELTA_FILENAME = "delta.safetensors"


def export_model(
    delta: SparseDelta | str | os.PathLike,
    out: str | os.PathLike,
    *,
    base_model: nn.Module | None = None,
    tokenizer: Any | None = None,
    base: str | None = None,
    format: Literal["hf", "delta", "peft"] = "hf",
    overwrite: bool = False,
) -> Path:
    """Write a fine-tuned model folder from a sparse delta.

    The folder is built in a temporary directory beside ``out`` and renamed into
    place, so ``out`` is either absent, the previous folder, or complete.

    Args:
        delta: A :class:`~mthlib.deltas.SparseDelta` or a path to one.
        out: Folder to create.
        base_model: The base model in memory; it is modified in place (the delta
            is applied to it, or PEFT wraps its adapted layers). When absent, the
            base is loaded with :func:`mthlib.models.load_model` from ``base`` or,
            failing that, the delta's recorded ``base_model``, in the dtype of the
            delta's values.
        tokenizer: Saved beside the weights when given (or when the loader returns one).
        base: Name or path of the base to load when ``base_model`` is absent.
        format: ``"hf"`` writes ``save_pretrained`` safetensors weights (plus the
            tokenizer) that :meth:`~transformers.AutoModelForCausalLM.from_pretrained`
            loads; ``"delta"`` writes the delta file and a README model card naming
            its base, so a user applies it with :func:`~mthlib.deltas.apply_delta`;
            ``"peft"`` writes a SHiRA adapter that ``peft.PeftModel.from_pretrained`` loads over
            the base (:mod:`mthlib.peft_export`: Linear weights only, padded to SHiRA's layout).
        overwrite: Replace an existing ``out`` folder.

    Returns:
        The folder written.

    Raises:
        ValueError: The delta breaks the format (e.g. a NaN or Inf value), or (``"peft"``)
            SHiRA cannot represent it or peft is missing; nothing is written.
    """
    if format not in ("hf", "delta", "peft"):
        raise ValueError(f"format must be 'hf', 'delta' or 'peft', not {format!r}")
    if format == "peft":
        require_peft()
    if isinstance(delta, SparseDelta):
        delta.validate()  # checked as a file is on load (e.g. no NaN or Inf value), before the base loads
    loaded = delta if isinstance(delta, SparseDelta) else load_delta(delta)
    target = Path(out)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if format in ("hf", "peft") and base_model is None:
        base_model, loaded_tokenizer = _load_base(base or loaded.base_model, _values_dtype(loaded))
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    details = ""
    with atomic_dir(target) as tmp:
        if format == "hf":
            apply_delta(base_model, loaded)
            base_model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        elif format == "peft":
            details = write_shira_adapter(base_model, loaded, tmp).describe()
        else:
            write_delta(loaded, tmp / DELTA_FILENAME)
        (tmp / "README.md").write_text(model_card(loaded, format, details))
    return target


def _values_dtype(delta: SparseDelta) -> str:
    """The dtype the base must be loaded in for an exact scatter (float32 for an empty delta)."""
    dtypes = {str(values.dtype).removeprefix("torch.") for values in delta.values.values()}
    if len(dtypes) > 1:
        raise ValueError(f"the delta mixes value dtypes {sorted(dtypes)}; pass base_model loaded to match")
    return dtypes.pop() if dtypes else "float32"


def _load_base(name: str, dtype: str) -> tuple[nn.Module, Any]:
    from mthlib.models import load_model

    return load_model(name, dtype=dtype)


def model_card(delta: SparseDelta, format: Literal["hf", "delta", "peft"], details: str = "") -> str:
    """A README.md model card: base, fingerprint, strategy, step, ``details`` and how to use the folder."""
    strategy = json.dumps(delta.strategy, indent=2, sort_keys=True)
    if format == "hf":
        usage = (
            "```python\nfrom transformers import AutoModelForCausalLM\n"
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n```\n'
        )
    elif format == "peft":
        usage = (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            f'base = AutoModelForCausalLM.from_pretrained("{delta.base_model}", dtype="{_values_dtype(delta)}")\n'
            'model = PeftModel.from_pretrained(base, "path/to/this/folder")\n```\n'
        )
    else:
        usage = (
            "```python\nfrom mthlib.deltas import apply_delta\n"
            f"# load the base model {delta.base_model!r} in the dtype it was trained in, then:\n"
            f'apply_delta(model, "{DELTA_FILENAME}")  # checks the base fingerprint first\n```\n'
        )
    return (
        "---\n"
        f"base_model: {delta.base_model}\n"
        "tags:\n- mthlib\n- sparse-delta\n"
        "---\n\n"
        f"# Sparse fine-tune of {delta.base_model}\n\n"
        f"Trained with mthlib {delta.metadata['mthlib_version']}: only {delta.num_entries} entries differ from the base.\n\n"
        "| field | value |\n|---|---|\n"
        f"| base model | `{delta.base_model}` |\n"
        f"| base fingerprint | `{delta.base_fingerprint}` |\n"
        f"| step | {delta.step} |\n"
        f"| sparsity | {delta.sparsity} |\n"
        f"| trained entries | {delta.num_entries} |\n\n"
        + (f"{details}\n\n" if details else "")
        + f"## Mask strategy\n\n```json\n{strategy}\n```\n\n"
        f"## Usage\n\n{usage}"
    )
