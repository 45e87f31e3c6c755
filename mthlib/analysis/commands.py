"""The ``mth analyze`` subcommands: typed functions whose docstrings are the ``--help`` text.

Each prints its tables to stdout and, with ``out``, writes ``<name>.md``,
``<name>.json`` and PNG figures into that folder. A base named by something other
than an existing path (e.g. ``embedded``) is loaded with :func:`mthlib.models.load_model`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from mthlib.analysis.compare import VIEWS, CompareDtype, View
from mthlib.analysis.consecutive import ConsecutiveResult, consecutive_changes
from mthlib.analysis.overlap import OverlapResult, subnetwork_overlap
from mthlib.analysis.plots import consecutive_plot, overlap_heatmaps, sparsity_heatmaps
from mthlib.analysis.rank import RankResult, update_rank
from mthlib.analysis.report import Reportable, render_text, write_report
from mthlib.analysis.sparsity import DEFAULT_TOLERANCES, LayerAverage, SparsityResult, update_sparsity


def _emit(result: Reportable, name: str, out: str | None, plot: Callable[[Reportable, Path], list[Path]] | None) -> None:
    print(render_text(result.tables()), end="")
    if out is None:
        return
    written = write_report(result, out, name)
    if plot is not None:
        written += plot(result, Path(out))
    print(f"wrote {', '.join(os.fspath(p) for p in written)}")


def sparsity(
    base: str,
    finetuned: str,
    out: str | None = None,
    tolerances: Sequence[float] = DEFAULT_TOLERANCES,
    views: Sequence[View] = VIEWS,
    check_fingerprint: bool = True,
    layer_average: LayerAverage = "pooled",
    compare_dtype: CompareDtype = "float64",
) -> SparsityResult:
    """Update sparsity 1 - nnz(|θ1 - θ0| > tol) / n, overall, per layer and per type.

    Args:
        base: The model before fine-tuning: an HF folder, a safetensors file or a model name.
        finetuned: The model after: an HF folder, a safetensors file, a sparse delta or a run folder.
        out: Folder for sparsity.md, sparsity.json and heatmaps; None prints only.
        tolerances: An entry counts as updated when it moved by more than the tolerance.
        views: "stored" compares values as stored; "bf16" rounds both sides to bfloat16 first.
        check_fingerprint: Refuse a delta made from a different base.
        layer_average: A layer's sparsity: "pooled", 1 - changed / n over all its entries; or "unweighted",
            the mean of its parameters' sparsities (the paper's script). Types and the total are pooled.
        compare_dtype: Arithmetic of the bf16 view: "float64" compares the rounded values exactly; "bf16"
            takes the difference in bf16 and rounds the tolerance to bf16 (the paper's script).
    """
    result = update_sparsity(base, finetuned, tolerances, views, check_fingerprint=check_fingerprint,
                             layer_average=layer_average, compare_dtype=compare_dtype)
    _emit(result, "sparsity", out, sparsity_heatmaps)
    return result


def rank(
    base: str,
    finetuned: str,
    out: str | None = None,
    include_embeddings: bool = False,
    rtol: float | None = None,
    dtype: Literal["float32", "float64"] = "float32",
    check_fingerprint: bool = True,
) -> RankResult:
    """Rank of every 2-D update matrix as a percentage of full rank, and the mean.

    Args:
        base: The model before fine-tuning: an HF folder, a safetensors file or a model name.
        finetuned: The model after: an HF folder, a safetensors file, a sparse delta or a run folder.
        out: Folder for rank.md and rank.json; None prints only.
        include_embeddings: Also rank embedding and lm_head matrices (large SVDs).
        rtol: Singular values below rtol * S.max() count as zero; None uses max(M, N) * eps of dtype.
        dtype: Precision of the SVD.
        check_fingerprint: Refuse a delta made from a different base.
    """
    result = update_rank(base, finetuned, include_embeddings=include_embeddings, rtol=rtol, dtype=dtype,
                         check_fingerprint=check_fingerprint)
    _emit(result, "rank", out, None)
    return result


def overlap(
    inputs: list[str],
    base: str | None = None,
    out: str | None = None,
    tol: float = 1e-5,
    delta_sets: Literal["stored", "changed"] = "stored",
    check_fingerprint: bool = True,
) -> OverlapResult:
    """Pairwise overlap o1, o2 and Jaccard of subnetworks, beside random baselines.

    Args:
        inputs: Two or more mask files, sparse deltas, run folders or fine-tuned models.
        base: The common base; needed for fine-tuned models, and when given it sets n (all its entries).
        out: Folder for overlap.md, overlap.json and heatmaps; None prints only.
        tol: A fine-tuned model's subnetwork is the entries that moved by more than tol.
        delta_sets: A delta's subnetwork is its stored entries, or those that changed (needs base).
        check_fingerprint: Refuse a delta made from a different base.
    """
    result = subnetwork_overlap(inputs, base, tol=tol, delta_sets=delta_sets, check_fingerprint=check_fingerprint)
    _emit(result, "overlap", out, overlap_heatmaps)
    return result


def consecutive(
    run_dir: str,
    base: str | None = None,
    out: str | None = None,
    tol: float = 1e-5,
    check_fingerprint: bool = True,
) -> ConsecutiveResult:
    """Entries that change between a run's consecutive deltas; never / cancelled / net updated.

    Args:
        run_dir: Run folder holding deltas/*.safetensors (sorted by their step metadata).
        base: The base the deltas apply to; None uses the base_model they record.
        out: Folder for consecutive.md, consecutive.json and a plot; None prints only.
        tol: Values within tol of each other count as equal.
        check_fingerprint: Refuse a base whose fingerprint differs from the deltas'.
    """
    result = consecutive_changes(run_dir, base, tol=tol, check_fingerprint=check_fingerprint)
    _emit(result, "consecutive", out, consecutive_plot)
    return result
