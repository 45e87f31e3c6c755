"""Four parts of a GRPO step, each against the plain way of computing the same values, in one run.

* ``decode step``: one batch-16 decode step of the quickstart's contexts on the packed bf16
  copy, through the model's forward against :func:`mthlib.grpo.decode_step.decode_logits`
  (their logits compared bitwise);
* ``log-probs``: forward and backward of the sampled tokens' log-probabilities over one
  ``(chunk, vocabulary)`` chunk of bf16 logits, composed ``torch`` ops (divide,
  ``logsumexp``, ``softmax``, as the loss computed them before) against
  :func:`mthlib.grpo.token_scores.token_scores`;
* ``active-entry gradient``: the sampled product of a 1%-active weight gradient of each MLP /
  attention shape over the fixed batch's tree nodes, ``x`` as it comes (its columns strided)
  against ``x^T`` written contiguous and handed over transposed, as the masked layers do;
* ``tree attention``: one layer's attention over the fixed batch's prefix trees (the
  quickstart's 2 prompts x 8 completions of 48 tokens), as under activation checkpointing
  (a forward without gradients, then forward and backward): transformers' ``sdpa`` with the
  trees' 4-D mask against :func:`mthlib.grpo.tree_attention.block_attention`.

Prints milliseconds (median of ``--repeats``) and the ratio to the plain way.

    python bench/step_parts.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mthlib.grpo.decode_step import decode_logits
from mthlib.grpo.engines import NativeEngine
from mthlib.grpo.kv_cache import prefill
from mthlib.grpo.prefix_tree import pack_prefix_trees, scores_per_token
from mthlib.grpo.rollout import prompt_tokens
from mthlib.grpo.token_scores import token_scores
from mthlib.grpo.tree_attention import block_attention, tree_blocks
from mthlib.models import load_model
from train_step import synthetic_rollout
from workload import quickstart_env


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run`` in ms after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def decode_rows(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
) -> list[tuple[str, str, float, float, str]]:
    engine = NativeEngine(dtype="bfloat16")
    engine.load_weights(model, None)
    copy = engine.policy_copy(model)
    contexts = [prompt_tokens(tokenizer, episode) for episode in quickstart_env().episodes(0, 2) for _ in range(8)]
    results = {}
    for name in ("forward", "decode_logits"):
        with torch.no_grad():
            _, cache, mask, last = prefill(copy, contexts, tokenizer.pad_token_id, max_new_tokens=args.steps + 1)
            tokens = torch.full((len(contexts),), tokenizer.eos_token_id)
            logits, times = [], []
            for _ in range(args.steps):
                mask = torch.cat([mask, mask.new_ones(len(contexts), 1)], dim=1)
                last = last + 1
                start = time.perf_counter()
                if name == "forward":
                    out = copy(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                               cache=cache, use_cache=True).logits[:, -1]
                else:
                    out = decode_logits(copy, tokens, last, mask, cache)
                times.append(time.perf_counter() - start)
                logits.append(out)
                tokens = out.argmax(dim=-1)
        results[name] = (1e3 * statistics.median(times[1:]), torch.stack(logits))
    same = torch.equal(results["forward"][1], results["decode_logits"][1])
    return [("decode step (batch 16, packed bf16)", "forward → decode_logits", results["forward"][0],
             results["decode_logits"][0], f"logits bitwise equal: {same}")]


def composed(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The log-probabilities and entropies as composed ops computed them before ``token_scores``."""
    scaled = logits.float() / temperature
    logz = torch.logsumexp(scaled, dim=-1)
    picked = scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logz
    with torch.no_grad():
        entropy = logz - (torch.softmax(scaled, dim=-1) * scaled).sum(dim=-1)
    return picked, entropy


def logprob_rows(args: argparse.Namespace) -> list[tuple[str, str, float, float, str]]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.chunk, 49152, generator=gen).bfloat16().requires_grad_()
    targets = torch.randint(0, 49152, (args.chunk,), generator=gen)
    upstream = torch.randn(args.chunk, generator=gen)
    times = {}
    for name, fn in (("composed", composed), ("token_scores", token_scores)):
        def run(fn=fn):
            picked, _ = fn(logits, targets, 0.7)
            (picked * upstream).sum().backward()
            logits.grad = None
        times[name] = median_ms(run, args.repeats)
    with torch.no_grad():
        (before, before_entropy), (after, after_entropy) = (fn(logits, targets, 0.7) for fn in (composed, token_scores))
    same = torch.allclose(before, after, atol=1e-5) and torch.allclose(before_entropy, after_entropy, atol=1e-4)
    return [(f"log-probs ({args.chunk} x 49152 bf16, fwd+bwd)", "composed ops → token_scores", times["composed"],
             times["token_scores"], f"values equal to 1e-5: {same}")]


def sampled_rows(args: argparse.Namespace) -> list[tuple[str, str, float, float, str]]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for out, inp in ((1536, 576), (576, 1536), (576, 576)):
        active = torch.randperm(out * inp, generator=gen)[: out * inp // 100].sort().values
        rows_idx, cols = active // inp, active % inp
        crow = torch.zeros(out + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows_idx, minlength=out).cumsum(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(active.numel()), (out, inp),
                                              check_invariants=False)
        grad = torch.randn(args.tokens, out, generator=gen).bfloat16()
        x = torch.randn(args.tokens, inp, generator=gen).bfloat16()
        grad_t = lambda: torch.empty(out, args.tokens).copy_(grad.t())  # noqa: E731

        def strided():
            return torch.sparse.sampled_addmm(pattern, grad_t(), x.float(), beta=0.0)

        def contiguous():
            x_t = torch.empty(inp, args.tokens).copy_(x.t())
            return torch.sparse.sampled_addmm(pattern, grad_t(), x_t.t(), beta=0.0)

        same = torch.allclose(strided().values(), contiguous().values(), rtol=1e-5, atol=1e-5)
        rows.append((f"active-entry gradient {out}x{inp}, 1%, {args.tokens} tokens", "x strided → x^T rows",
                     median_ms(strided, args.repeats), median_ms(contiguous, args.repeats), f"values equal: {same}"))
    return rows


def attention_rows(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
) -> list[tuple[str, str, float, float, str]]:
    ids, attention, _ = synthetic_rollout(tokenizer, prompts=2, generations=8, completion=48)
    trees = pack_prefix_trees(ids, attention, scores_per_token(model))
    blocks = tree_blocks(trees.attention_mask)
    layer = model.base_model.layers[0].self_attn
    packs, width = trees.input_ids.shape
    config, gen = model.config, torch.Generator().manual_seed(0)
    shapes = {"query": config.num_attention_heads, "key": config.num_key_value_heads, "value": config.num_key_value_heads}
    qkv = {name: torch.randn(packs, width, heads, layer.head_dim, generator=gen).bfloat16().requires_grad_()
           for name, heads in shapes.items()}
    upstream = torch.randn(packs, width, config.num_attention_heads * layer.head_dim, generator=gen).bfloat16()

    def masked_sdpa():
        q, k, v = (qkv[name].transpose(1, 2) for name in shapes)
        out, _ = sdpa_attention_forward(layer, q, k, v, trees.attention_mask, dropout=0.0, scaling=layer.scaling)
        return out.reshape(packs, width, -1)

    def blocked():
        return block_attention(qkv["query"], qkv["key"], qkv["value"], blocks, layer.scaling)

    times = {}
    for name, fn in (("sdpa", masked_sdpa), ("blocks", blocked)):
        def run(fn=fn):
            with torch.no_grad():
                fn()
            (fn() * upstream).sum().backward()
            for tensor in qkv.values():
                tensor.grad = None
        times[name] = median_ms(run, args.repeats)
    with torch.no_grad():
        gap = (masked_sdpa().float() - blocked().float()).abs().max().item()
    share = blocks.scores / (packs * width * width)
    return [(f"tree attention, one layer ({packs} packs of {width} nodes, fwd + fwd/bwd)",
             f"sdpa, 4-D mask → blocks of {blocks.size} ({share:.0%} of the scores)", times["sdpa"], times["blocks"],
             f"largest difference {gap:.3g} (bf16 outputs)")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded' or a local Hugging Face folder (Llama-like)")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed (median of all but the first)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per log-prob chunk (the quickstart's)")
    parser.add_argument("--tokens", type=int, default=922, help="tokens of the sampled products (the fixed batch's tree nodes)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, "bfloat16")  # the bf16 policy both model parts use
    rows = (decode_rows(args, model, tokenizer) + logprob_rows(args) + sampled_rows(args)
            + attention_rows(args, model, tokenizer))
    print("| part | change | before ms | after ms | after ÷ before | check |")
    print("|---|---|---|---|---|---|")
    for part, change, before, after, check in rows:
        print(f"| {part} | {change} | {before:.2f} | {after:.2f} | {after / before:.2f}x | {check} |")


if __name__ == "__main__":
    main()
