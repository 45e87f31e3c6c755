"""Structured masks on the embedded model: build time of N:M and block masks vs magnitude, and the 2:4 kernel path.

Every mask scores by ``|w|`` (no data), so the time difference is the structure's: a sort
of every group of M for ``nm``, a mean per tile and one sort of the tiles for ``block``,
against :meth:`~mthlib.masking.MaskStrategy.top_k` over all entries for ``magnitude`` at
the same density. Each build ends with the strategy's own check (``check_nm``,
``check_blocks``), which is part of the time. Then the script asks PyTorch whether
its semi-structured (2:4) sparse path runs on this machine; on a CPU it does not, and the
table says so instead of reporting a speedup.

    python bench/structured_masks.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from mthlib.masking import Masks, MaskStrategy, build_mask
from mthlib.models import load_model

ROWS: list[tuple[str, dict]] = [
    ("magnitude", {"sparsity": 0.5}),
    ("nm", {"n": 2, "m": 4}),
    ("nm", {"n": 4, "m": 8}),
    ("magnitude", {"sparsity": 0.99}),
    ("block", {"block_size": 16, "sparsity": 0.99}),
    ("block", {"block_size": 32, "sparsity": 0.99}),
]


def timed_build(strategy: MaskStrategy, model: torch.nn.Module) -> tuple[Masks, float]:
    start = time.perf_counter()
    masks = strategy.compute(model, None)
    return masks, time.perf_counter() - start


def semi_structured_status(masks: Masks, model: torch.nn.Module) -> str:
    """Try PyTorch's 2:4 path on one 2:4-pruned projection of the model; the outcome in one line."""
    name = next(n for n in masks.names if "q_proj" in n)
    weight = dict(model.named_parameters())[name].detach()
    pruned = (weight * masks.to_dense(name)).half().contiguous()
    cusparselt = torch.backends.cusparselt.is_available()
    try:
        sparse = torch.sparse.to_sparse_semi_structured(pruned)
        x = torch.randn(pruned.shape[1], 64, dtype=pruned.dtype, device=pruned.device)
        torch.mm(sparse, x)
    except Exception as err:  # the outcome is what this reports
        reason = str(err).strip().splitlines()[0]
        return f"not available (cuda: {torch.cuda.is_available()}, cuSPARSELt: {cusparselt}): {type(err).__name__}: {reason}"
    return f"available (cuda: {torch.cuda.is_available()}, cuSPARSELt: {cusparselt})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model()
    reference: dict[float, float] = {}
    two_four = None
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), embedded model, scores |w|\n")
    print("| mask | arguments | trained | trained entries | build s | vs magnitude at the same density |")
    print("|---|---|---|---|---|---|")
    for name, kwargs in ROWS:
        strategy = build_mask(name, **kwargs)
        masks, seconds = timed_build(strategy, model)
        sparsity = round(strategy.sparsity, 12)
        if name == "magnitude":
            reference[sparsity] = seconds
        if name == "nm" and (kwargs["n"], kwargs["m"]) == (2, 4):
            two_four = masks
        ratio = f"{seconds / reference[sparsity]:.2f}x" if name != "magnitude" else "-"
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        print(f"| {name} | {shown} | {masks.density:.4%} | {masks.total:,} | {seconds:.2f} | {ratio} |")
    print("\nBlock densities sit just under 1% because whole tiles are kept while the count stays at most k.")
    print(f"PyTorch semi-structured 2:4 path on this machine: {semi_structured_status(two_four, model)}")


if __name__ == "__main__":
    main()
