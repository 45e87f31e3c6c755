"""Time one variant's GRPO training step on a fixed rollout batch (no generation), in its own process.

Prints one JSON line: seconds per step (mean of the timed steps; the optimizer step's share
as ``optimizer_s``), one frozen-entry check's seconds (``verify_s``, outside the step), trainable
entries, optimizer-state bytes, peak RSS. ``bench/masking.py`` runs it once per variant so
every peak RSS is that variant's own.

    python bench/train_step.py --mask random --sparsity 0.99
    python bench/train_step.py --mask file --mask_path fisher99.safetensors --dtype bfloat16 --bf16_mixed
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time

import torch

from mthlib.data import PromptDataModule
from mthlib.grpo.gradients import clip_gradients
from mthlib.grpo.loss import Normalizer
from mthlib.grpo.objective import GRPOObjective
from mthlib.grpo.rollout import prompt_tokens, token_logprobs
from mthlib.masking import SparseAdamW, SparseState, build_mask
from mthlib.models import enable_activation_checkpointing, load_model
from workload import quickstart_env


def synthetic_rollout(tokenizer, prompts: int, generations: int, completion: int, seed: int = 0):
    """Real quickstart prompts followed by ``completion`` random tokens each (loss on those)."""
    rows = [prompt_tokens(tokenizer, episode) for episode in quickstart_env().episodes(seed, prompts)
            for _ in range(generations)]
    width = max(len(r) for r in rows) + completion
    gen = torch.Generator().manual_seed(seed)
    high = min(20000, len(tokenizer))  # ordinary tokens of a real vocabulary, any of a tiny test model's
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    attention = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        n = len(row)
        ids[i, :n] = torch.tensor(row)
        ids[i, n:n + completion] = torch.randint(min(100, high // 2), high, (completion,), generator=gen)
        attention[i, :n + completion] = 1
        loss_mask[i, n:n + completion] = 1
    return ids, attention, loss_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded' or a local Hugging Face folder")
    parser.add_argument("--mask", default="dense", help="registered strategy name, or 'dense'")
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument("--mask_path", default=None, help="the mask file of --mask file (mth masks build --out)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter dtype (bfloat16: a masked run keeps fp32 master values of its active entries)")
    parser.add_argument("--bf16_mixed", action="store_true", help="forward and loss under bf16 autocast, as bf16-mixed")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion", type=int, default=48)
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute decoder activations in backward")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per output-projection chunk")
    parser.add_argument("--pack_prefixes", action="store_true",
                        help="pack rows into prefix trees, shared prefixes computed once (GRPOModule's pack_prefixes)")
    parser.add_argument("--calibration", type=int, default=16, help="calibration sequences for gradient-based masks")
    parser.add_argument("--calibration_batch_size", type=int, default=8, help="sequences per calibration pass")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, args.dtype)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    ids, attention, loss_mask = synthetic_rollout(tokenizer, args.prompts, args.generations, args.completion)
    mask_seconds, state = 0.0, None
    if args.mask == "dense":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
        trainable = sum(p.numel() for p in model.parameters())
    else:
        strategy = build_mask("file", path=args.mask_path) if args.mask == "file" else build_mask(
            args.mask, sparsity=args.sparsity)
        batches = None
        if strategy.needs_calibration:
            data = PromptDataModule(env=quickstart_env())
            batches = list(data.calibration_batches(tokenizer, args.calibration, args.calibration_batch_size, seed=0))
        start = time.perf_counter()
        masks = strategy.compute(model, batches)
        mask_seconds = time.perf_counter() - start
        state = SparseState.capture(model, masks).attach(model)
        optimizer = SparseAdamW(state, lr=1e-6, weight_decay=0.0)
        trainable = masks.total
    advantages = torch.randn(ids.shape[0])
    norm = Normalizer(ids.shape[0], int(loss_mask.sum()), args.completion)
    objective = GRPOObjective(loss_type="dapo", epsilon=0.2)
    model.train()
    times, optimizer_times, verify_times = [], [], []
    autocast = (lambda: torch.autocast(model.device.type, torch.bfloat16)) if args.bf16_mixed else contextlib.nullcontext
    for _ in range(args.steps):
        start = time.perf_counter()
        with autocast():
            logps, _ = token_logprobs(model, ids, attention, loss_mask, chunk_size=args.chunk,
                                      pack_prefixes=args.pack_prefixes)
            loss = objective.loss(logps, logps.detach(), advantages, loss_mask, norm)[0]
        loss.backward()
        clip_gradients(model, optimizer, 1.0)
        before_optimizer = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        optimizer_times.append(time.perf_counter() - before_optimizer)
        if state is not None:  # the frozen-entry check a fit runs every verify_every steps, timed on its own
            before_verify = time.perf_counter()
            state.verify()
            verify_times.append(time.perf_counter() - before_verify)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    print(json.dumps({
        "variant": (args.mask if args.mask in ("dense", "file") else f"{args.mask} {args.sparsity:g}")
        + (f" {args.dtype}" if args.dtype != "float32" else "") + (" +bf16-mixed" if args.bf16_mixed else "")
        + (" +ckpt" if args.gradient_checkpointing else "")
        + (" +packed" if args.pack_prefixes else "")
        + (f" +mmap {os.environ['MALLOC_MMAP_THRESHOLD_']}" if "MALLOC_MMAP_THRESHOLD_" in os.environ else ""),
        "step_s": sum(times[1:]) / max(len(times) - 1, 1),
        "optimizer_s": sum(optimizer_times[1:]) / max(len(optimizer_times) - 1, 1),
        "verify_s": sum(verify_times) / len(verify_times) if verify_times else 0.0,
        "mask_s": mask_seconds,
        "trainable": trainable,
        "optimizer_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    main()
