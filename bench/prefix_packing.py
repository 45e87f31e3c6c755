"""Log-probabilities on prefix trees against one padded row per completion, on a sampled GRPO batch.

Samples P prompts x G completions of the quickstart's environment from the embedded model
(native engine, bf16 copy, the quickstart's sampling), then times the log-prob forward and
backward of the whole batch (gradient checkpointing, 256-token chunks) with the rows padded
(``pack_prefixes=False``, the baseline) and packed into prefix trees, in fp32 and under bf16
autocast. Prints tokens through the decoder, seconds (best of ``--repeats``), the speed-up,
and how far each variant's log-probs and gradient are from fp32 rows.

    python bench/prefix_packing.py --prompts 2 --generations 8 --max_new_tokens 48
"""

from __future__ import annotations

import argparse
import time

import torch

from mthlib.grpo.engines import SamplingConfig, make_engine
from mthlib.grpo.prefix_tree import pack_prefix_trees, scores_per_token
from mthlib.grpo.rollout import generate_rollout, token_logprobs
from mthlib.models import enable_activation_checkpointing, load_model
from workload import quickstart_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model()
    enable_activation_checkpointing(model)
    episodes = [episode for episode in quickstart_env().episodes(0, args.prompts) for _ in range(args.generations)]
    engine = make_engine("native", seed=0, rollout_dtype="bfloat16")
    with engine.weights_of(model, None):
        rollout = generate_rollout(model, tokenizer, episodes, SamplingConfig(args.max_new_tokens, 0.7, top_k=50), engine)
    ids, attention, loss_mask = rollout.input_ids, rollout.attention_mask, rollout.loss_mask
    trees = pack_prefix_trees(ids, attention, scores_per_token(model))
    print(f"{len(rollout)} rows of up to {ids.shape[1]} tokens: {int(attention.sum())} real tokens, "
          f"{int(loss_mask.sum())} sampled; {trees.num_tokens} tree nodes in {trees.input_ids.shape[0]} pack(s)")
    model.train()
    results = {}
    for precision in ("fp32", "bf16-mixed"):
        for packed in (False, True):
            seconds = []
            for _ in range(args.repeats):
                model.zero_grad()
                start = time.perf_counter()
                with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
                    logps, _ = token_logprobs(model, ids, attention, loss_mask, 0.7, 256, pack_prefixes=packed)
                logps.sum().backward()
                seconds.append(time.perf_counter() - start)
            gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
            results[precision, packed] = (min(seconds), logps.detach().double(), gradient)
    _, reference_logps, reference_gradient = results["fp32", False]
    print("| precision | log-probs on | decoder tokens | s (fwd+bwd) | vs rows | max log-prob diff vs fp32 rows "
          "| gradient rel. diff vs fp32 rows |")
    print("|---|---|---|---|---|---|---|")
    for (precision, packed), (seconds, logps, gradient) in results.items():
        baseline = results[precision, False][0]
        tokens = trees.num_tokens if packed else ids.numel()
        diff = (logps - reference_logps).abs().max().item()
        relative = ((gradient - reference_gradient).norm() / reference_gradient.norm()).item()
        print(f"| {precision} | {'prefix trees' if packed else 'padded rows'} | {tokens} | {seconds:.2f} | "
              f"{baseline / seconds:.2f}x | {diff:.1e} | {relative:.1e} |")


if __name__ == "__main__":
    main()
