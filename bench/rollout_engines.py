"""Rollout engines side by side: Hugging Face ``generate`` against mthlib's native decode loop.

Samples the same GRPO batch (P prompts x G completions of the quickstart's environment) with
every engine on the embedded model and prints seconds, generated tokens per second and the
ratio to ``generate``, measured in this run. The first call of each engine is a warm-up.
``native+bf16`` samples from a bf16 copy of the policy, synced before every batch (timed).

    python bench/rollout_engines.py --prompts 2 --generations 8 --max_new_tokens 48
"""

from __future__ import annotations

import argparse
import time

import torch

from mthlib.grpo.engines import SamplingConfig, make_engine
from mthlib.grpo.rollout import prompt_tokens
from mthlib.models import load_model
from workload import quickstart_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="hf,native,native+bf16",
                        help="comma-separated: hf, native, with +compile and/or +bf16 (sample from a bf16 copy)")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, args.dtype)
    contexts = [prompt_tokens(tokenizer, episode) for episode in quickstart_env().episodes(0, args.prompts)
                for _ in range(args.generations)]
    sampling = SamplingConfig(max_completion_length=args.max_new_tokens, temperature=0.7, top_k=50)
    rows = []
    for name in args.engines.split(","):
        base, *options = name.split("+")
        engine = make_engine(base, seed=0, compile="compile" in options,
                             rollout_dtype="bfloat16" if "bf16" in options else None)
        engine.load_weights(model, None)
        engine.sample_turn(model, tokenizer, contexts, sampling)  # warm-up (and compilation)
        seconds, tokens = [], []
        for repeat in range(args.repeats):
            torch.manual_seed(repeat)
            start = time.perf_counter()
            engine.load_weights(model, None)  # a bf16 copy's sync is part of each batch's time
            out = engine.sample_turn(model, tokenizer, contexts, sampling)
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(row) for row, _ in out))
        best = min(seconds)
        rows.append((name, best, sum(tokens) / sum(seconds), tokens[seconds.index(best)]))
    base = rows[0][2]
    print(f"{len(contexts)} rows ({args.prompts} prompts x {args.generations}), up to {args.max_new_tokens} new tokens, "
          f"{args.dtype}, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"| engine | s per batch (best) | generated tokens/s (mean) | tokens in best | ratio to {rows[0][0]} |")
    print("|---|---|---|---|---|")
    for name, best, rate, count in rows:
        print(f"| {name} | {best:.2f} | {rate:.1f} | {count} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
