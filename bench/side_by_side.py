"""mthlib next to TRL on one GRPO workload: seconds per step, generation throughput and peak memory.

The project's goals are stated against TRL: a 99%-sparse Fisher run should take at most a
quarter of TRL full fine-tuning's time per step (a fifth of TRL with a SHiRA adapter at the
same ~1% of trainable entries) in at most 15% of its peak memory. This script measures all
of them in one invocation, on the same model, prompts (the quickstart's alphabet sort, stream
seed 0, in order), batch (P prompts x G completions), completion length and sampling, fp32
(``--bf16_mixed``: autocast), on-policy (one optimizer step per generation), ``beta=0``, DAPO
loss, group-scaled rewards:

* ``trl_full``, ``trl_shira``: ``trl.GRPOTrainer``, full fine-tuning and a PEFT ``ShiraConfig``
  adapter on every attention and MLP projection (``r`` chosen for ~1% of their entries);
* ``hf_generate``: Hugging Face ``generate`` alone on the same batches (the sampling floor);
* ``mthlib_dense``, ``mthlib_random99``, ``mthlib_fisher99``: ``mth fit`` on
  ``configs/quickstart.yaml`` (Fisher's mask built first with ``mth masks build``, then
  trained as a ``file`` mask, so its build is not in the step time);
* ``mthlib_mask0``: the dense run through the masking machinery: a random mask of sparsity 0
  (every maskable entry trained) with its gradient hooks and sparse optimizer; its train time
  over the dense run's is the masking overhead (the frozen-entry check runs every 50 steps;
  ``bench/masking.py`` times one check).

``--rollout_dtype bfloat16`` makes the mthlib variants sample from a bf16 copy of the policy
(the native engine's ``rollout_dtype``; needs ``--rollout_engine native``). ``--bf16_mixed``
trains every training variant under bf16 autocast with fp32 weights (TRL's ``bf16=True``,
Lightning's ``precision: bf16-mixed``). ``--mthlib_dtype bfloat16`` gives the mthlib variants
bf16 weights instead, as the quickstart has them (``--model.dtype``; a masked run keeps fp32
master values of its active entries, a dense one updates the bf16 weights directly, so at
``--lr_full`` most of its updates round away: it stands for the cost of a dense step only).

Sampled completions differ in length from variant to variant (a Fisher run soon writes all
48 tokens, a dense one ~25), and the train part grows with them, so per-step train times mix
the mask's cost with what the policy wrote. The two goals about the training step itself are
therefore measured on one fixed batch as well (``--fixed_steps``, 0 to skip): the quickstart's
prompts with ``--max_new_tokens`` completion tokens each, timed by ``bench/train_step.py`` for
dense, mask0, random99 and fisher99 (its mask from the fit's file) in the run's dtype and
autocast, with prefix trees, checkpointing and the quickstart's log-prob chunk: forward,
backward, clipping and the optimizer step, plus a fiftieth of one frozen-entry check (a fit
runs it every 50 steps).

Every variant runs in its own process, so each peak RSS (``os.wait4``) is that variant's
alone. Times are means over steps 2..N (step 1 warms up). Python children print one JSON
line; the ``mth fit`` runs are read from their CSVLogger ``metrics.csv``.

    python bench/side_by_side.py [--steps 4] [--only trl_full,mthlib_fisher99] [--out bench_runs/side_by_side]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import yaml

from mthlib.analysis.plot_run import read_metrics
from workload import QUICKSTART, quickstart_config, quickstart_env

VARIANTS = ("trl_full", "trl_shira", "hf_generate", "mthlib_dense", "mthlib_mask0", "mthlib_random99", "mthlib_fisher99")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOALS = [  # (label, numerator, denominator, column, bound; a negative bound is a floor: ratio >= -bound)
    ("fisher99 s/step vs TRL full", "mthlib_fisher99", "trl_full", "step_s", 0.25),
    ("fisher99 s/step vs TRL+SHiRA", "mthlib_fisher99", "trl_shira", "step_s", 0.2),
    ("fisher99 peak RSS vs TRL full", "mthlib_fisher99", "trl_full", "rss_gib", 0.15),
    ("random99 train s/step (step minus generation) vs mthlib dense", "mthlib_random99", "mthlib_dense", "train_s", 0.6),
    ("random99 forward+backward+optimizer vs dense, one fixed batch", "fixed_random99", "fixed_dense", "train_s", 0.6),
    ("fisher99 forward+backward+optimizer vs dense, one fixed batch", "fixed_fisher99", "fixed_dense", "train_s", 0.6),
    ("mthlib random99 rollout tokens/s vs HF generate", "mthlib_random99", "hf_generate", "tokens_per_s", -3.0),
    ("masking overhead: mask0 train s/step vs mthlib dense", "mthlib_mask0", "mthlib_dense", "train_s", 1.03),
    ("masking overhead: mask0 vs dense, one fixed batch", "fixed_mask0", "fixed_dense", "train_s", 1.03),
]
FIXED_BATCH = {  # fixed-batch variant -> bench/train_step.py's mask arguments
    "dense": ["--mask", "dense"],
    "mask0": ["--mask", "random", "--sparsity", "0.0"],
    "random99": ["--mask", "random", "--sparsity", "0.99"],
    "fisher99": ["--mask", "file"],  # with --mask_path: the mask mthlib_fisher99 trained
}
VERIFY_EVERY = 50  # MaskCallback's default: steps between two frozen-entry checks
BENCH_EXTRA = {"trl_full": ("trl",), "trl_shira": ("trl", "peft")}  # variant -> what it imports from the bench extra


def missing_packages(variants: list[str]) -> list[str]:
    """The packages of the ``bench`` extra that ``variants`` import and this environment lacks."""
    needed = dict.fromkeys(package for variant in variants for package in BENCH_EXTRA.get(variant, ()))
    return [package for package in needed if importlib.util.find_spec(package) is None]


def mean_after_warmup(values: list[float]) -> float:
    timed = values[1:] or values
    return sum(timed) / len(timed) if timed else float("nan")


# -- children: one variant each, one JSON line on stdout -------------------------------------------------------
def trl_variant(args: argparse.Namespace, shira: bool) -> dict:
    """TRL's GRPOTrainer for ``args.steps`` steps; per-step wall, generation seconds and generated tokens."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    env = quickstart_env()
    episodes = env.episodes(0, args.prompts * args.steps)
    dataset = Dataset.from_list([{"prompt": e.messages(), "index": i} for i, e in enumerate(episodes)])

    def reward(prompts, completions, index, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [env.score(episodes[i], [text])["reward"] for i, text in zip(index, texts)]

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_numel = sum(p.numel() for p in model.parameters())
    linears = [m for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS]
    targeted, peft_config = sum(m.weight.numel() for m in linears), None
    if shira:
        from peft import ShiraConfig

        # SHiRA trains r*(m+n) entries of an m x n weight: one r for ~1% of all targeted entries (at least 1)
        r = max(1, round(0.01 * targeted / sum(sum(m.weight.shape) for m in linears)))
        peft_config = ShiraConfig(r=r, target_modules=PROJECTIONS, random_seed=0)
    scratch = tempfile.TemporaryDirectory(prefix="sbs_trl_")  # TRL wants an output folder; nothing is saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecation notice
        config = GRPOConfig(
            output_dir=scratch.name, report_to=[], use_cpu=True, bf16=args.bf16_mixed, seed=0,
            per_device_train_batch_size=args.prompts * args.generations, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1,  # on-policy: one optimizer step per generation
            num_generations=args.generations, max_completion_length=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=1.0, beta=0.0, loss_type="dapo",
            scale_rewards="group", learning_rate=args.lr_sparse if shira else args.lr_full,
            max_steps=args.steps, logging_steps=1, save_strategy="no", shuffle_dataset=False,
            gradient_checkpointing=args.gradient_checkpointing, lr_scheduler_type="constant",  # as mthlib
        )
    steps, generation, lengths = [], defaultdict(float), []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    sample = trainer._generate_single_turn  # wrapped on this instance only: the seconds spent sampling

    def timed_sample(*a, **k):
        start = time.perf_counter()
        try:
            return sample(*a, **k)
        finally:
            generation[len(steps)] += time.perf_counter() - start

    trainer._generate_single_turn = timed_sample
    trainer.train()
    scratch.cleanup()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"trainable_fraction": trainable / base_numel, "targeted_fraction": trainable / targeted, "step_s": steps,
            "generation_s": [generation[i] for i in range(len(steps))],
            "tokens": [n * args.prompts * args.generations for n in lengths]}


def hf_generate_variant(args: argparse.Namespace) -> dict:
    """``model.generate`` alone on the same batches: all of its time is generation."""
    import torch

    from mthlib.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    tokenizer.padding_side = "left"
    env, steps, tokens = quickstart_env(), [], []
    for step in range(args.steps):
        episodes = env.episodes(0, args.prompts, start=step * args.prompts)
        texts = [tokenizer.apply_chat_template(e.messages(), tokenize=False, add_generation_prompt=True)
                 for e in episodes for _ in range(args.generations)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=1.0,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        steps.append(time.perf_counter() - start)
        is_eos = out[:, batch["input_ids"].shape[1]:] == tokenizer.eos_token_id
        seen = is_eos.int().cumsum(1)
        tokens.append(int(((seen == 0) | (is_eos & (seen == 1))).sum()))  # sampled tokens up to the first EOS
    return {"trainable_fraction": None, "step_s": steps, "generation_s": steps, "tokens": tokens}


# -- parent: run each variant in its own process -------------------------------------------------------------
def run_measured(command: list[str], log: Path) -> tuple[str, float]:
    """Run ``command`` (stderr to ``log``); its stdout and peak RSS in GiB. Raises on failure."""
    with log.open("w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    with log.open("a") as err:
        err.write(stdout)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log}")
    return stdout, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def python_child(variant: str, args: argparse.Namespace, out: Path) -> dict:
    """Run this script as ``--child variant``; the child's JSON line and peak RSS."""
    command = [sys.executable, __file__, *sys.argv[1:], "--model", args.model, "--child", variant]
    stdout, rss = run_measured(command, out / f"{variant}.log")
    return {**json.loads(stdout.strip().splitlines()[-1]), "rss_gib": rss}


def mthlib_variant(variant: str, args: argparse.Namespace, out: Path) -> dict:
    """``mth fit`` on the quickstart with this variant's mask; per-step figures from its ``metrics.csv``."""
    cli = [sys.executable, "-m", "mthlib.cli"]
    overrides = ["--model.model_name_or_path", args.model, "--trainer.max_steps", str(args.steps),
                 "--trainer.limit_val_batches", "0", "--trainer.logger.init_args.save_dir", str(out / variant),
                 "--data.batch_size", str(args.prompts), "--model.num_generations", str(args.generations),
                 "--model.max_completion_length", str(args.max_new_tokens), "--model.temperature", str(args.temperature),
                 "--model.top_k", str(args.top_k), "--model.gradient_checkpointing", str(args.gradient_checkpointing).lower(),
                 "--model.rollout_engine", args.rollout_engine]
    if args.rollout_dtype:
        overrides += ["--model.rollout_dtype", args.rollout_dtype]
    if args.bf16_mixed:
        overrides += ["--trainer.precision", "bf16-mixed"]
    overrides += ["--model.dtype", args.mthlib_dtype, "--model.learning_rate"]
    if variant == "mthlib_dense":
        overrides += [str(args.lr_full), "--model.mask", "null"]
    elif variant == "mthlib_mask0":
        overrides += [str(args.lr_full), "--model.mask", "random", "--model.mask.sparsity", "0.0"]
    elif variant == "mthlib_random99":
        overrides += [str(args.lr_sparse), "--model.mask", "random", "--model.mask.sparsity", "0.99"]
    else:  # the mask fit would compute for the same model and data, built once outside the timed run
        mask = out / "fisher99.safetensors"
        overlay = out / "fisher99_build.yaml"
        overlay.write_text(yaml.safe_dump({"model": {"model_name_or_path": args.model, "dtype": args.mthlib_dtype, "mask": {
            "class_path": "fisher", "init_args": {"sparsity": 0.99, "num_samples": args.fisher_samples}}}}))
        start = time.perf_counter()
        run_measured(cli + ["masks", "build", "--config", str(QUICKSTART), "--config", str(overlay),
                            "--out", str(mask)], out / "fisher99_build.log")
        print(f"fisher99 mask built in {time.perf_counter() - start:.1f} s", flush=True)
        overrides += [str(args.lr_sparse), "--model.mask", "file", "--model.mask.path", str(mask)]
    _, rss = run_measured(cli + ["fit", "--config", str(QUICKSTART), *overrides], out / f"{variant}.log")
    curves = read_metrics(next((out / variant).rglob("metrics.csv")))
    values = {name: [value for _, value in curves.get(name, [])] for name in
              ("timing/step_s", "timing/generation_s", "completions/mean_length", "mask/trainable_fraction")}
    fraction = values["mask/trainable_fraction"]
    return {"trainable_fraction": fraction[-1] if fraction else 1.0, "rss_gib": rss,
            "step_s": values["timing/step_s"], "generation_s": values["timing/generation_s"],
            "tokens": [length * args.prompts * args.generations for length in values["completions/mean_length"]]}


def fixed_batch_variant(name: str, args: argparse.Namespace, out: Path) -> dict | None:
    """``bench/train_step.py`` for ``name`` on the fixed batch; ``None`` for fisher99 without a built mask."""
    mask = out / "fisher99.safetensors"
    if name == "fisher99" and not mask.is_file():
        return None
    chunk = quickstart_config()["model"]["logprob_chunk_size"]
    command = [sys.executable, str(Path(__file__).with_name("train_step.py")), *FIXED_BATCH[name], "--model", args.model,
               "--steps", str(args.fixed_steps), "--prompts", str(args.prompts), "--generations", str(args.generations),
               "--completion", str(args.max_new_tokens), "--chunk", str(chunk), "--pack_prefixes",
               "--dtype", args.mthlib_dtype]
    command += ["--mask_path", str(mask)] if name == "fisher99" else []
    command += ["--gradient_checkpointing"] if args.gradient_checkpointing else []
    command += ["--bf16_mixed"] if args.bf16_mixed else []
    stdout, rss = run_measured(command, out / f"fixed_{name}.log")
    timed = json.loads(stdout.strip().splitlines()[-1])
    return {"trainable_fraction": None, "rss_gib": rss, "step_s": timed["step_s"], "generation_s": float("nan"),
            "train_s": timed["step_s"] + timed["verify_s"] / VERIFY_EVERY, "tokens_per_s": float("nan"),
            "optimizer_s": timed["optimizer_s"], "verify_s": timed["verify_s"]}


def summarize(raw: dict) -> dict:
    """Means over steps 2..N: s/step, generation s/step, generated tokens per generation second."""
    generation, step = mean_after_warmup(raw["generation_s"]), mean_after_warmup(raw["step_s"])
    return {"trainable_fraction": raw["trainable_fraction"], "rss_gib": raw["rss_gib"],
            "step_s": step, "generation_s": generation, "train_s": step - generation,
            "tokens_per_s": mean_after_warmup(raw["tokens"]) / generation if raw["tokens"] else float("nan")}


def print_report(results: dict[str, dict]) -> None:
    def fmt(value, spec: str) -> str:
        return "–" if value is None or value != value else format(value, spec)

    base = results.get("trl_full", {})
    print("\n| variant | trainable fraction | s/step | generation s/step | train s/step | generated tokens/s "
          "| peak RSS GiB | s/step ÷ trl_full | peak RSS ÷ trl_full |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        step_ratio = r["step_s"] / base["step_s"] if base and not name.startswith("fixed_") else None  # no sampling
        rss_ratio = r["rss_gib"] / base["rss_gib"] if base else None
        print(f"| {name} | {fmt(r['trainable_fraction'], '.4%')} | {r['step_s']:.3f} | {fmt(r['generation_s'], '.3f')} "
              f"| {fmt(r['train_s'], '.3f')} | {fmt(r['tokens_per_s'], '.1f')} | {r['rss_gib']:.2f} | {fmt(step_ratio, '.3f')} | {fmt(rss_ratio, '.3f')} |")
    print()
    for label, num, den, column, bound in GOALS:
        if num in results and den in results:
            ratio = results[num][column] / results[den][column]
            met = ratio >= -bound if bound < 0 else ratio <= bound
            goal = f">= {-bound}x" if bound < 0 else f"<= {bound}x"
            print(f"{label}: {ratio:.3f}x (goal {goal}: {'met' if met else 'not met'})")
        else:
            print(f"{label}: not measured (needs {num} and {den})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="'embedded' or a local Hugging Face folder")
    parser.add_argument("--steps", type=int, default=4, help="training steps (or generate batches) per variant")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--lr_full", type=float, default=1e-5, help="learning rate of trl_full and mthlib_dense")
    parser.add_argument("--lr_sparse", type=float, default=1e-3, help="learning rate of the sparse variants")
    parser.add_argument("--gradient_checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                        help="true/false, for every training variant (the quickstart's: true)")
    parser.add_argument("--rollout_engine", choices=("hf", "native"), default="hf", help="mthlib's --model.rollout_engine")
    parser.add_argument("--rollout_dtype", choices=("bfloat16",), default=None,
                        help="mthlib's --model.rollout_dtype (sample from a bf16 copy; native engine)")
    parser.add_argument("--mthlib_dtype", choices=("float32", "bfloat16"), default="float32",
                        help="mthlib's --model.dtype: bfloat16 keeps bf16 weights (a masked run updates fp32 master "
                             "values of its active entries) and the native engine samples from the policy itself")
    parser.add_argument("--bf16_mixed", action="store_true",
                        help="train under bf16 autocast (fp32 weights): TRL's bf16=True, mthlib's --trainer.precision bf16-mixed")
    parser.add_argument("--fisher_samples", type=int, default=64, help="calibration samples of the Fisher mask")
    parser.add_argument("--fixed_steps", type=int, default=4,
                        help="steps of each fixed-batch variant (means over steps 2..N); 0 skips them")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants, from: " + ", ".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="keep run folders here and write side_by_side.json")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = {"trl_full": lambda: trl_variant(args, shira=False), "trl_shira": lambda: trl_variant(args, shira=True),
               "hf_generate": lambda: hf_generate_variant(args)}[args.child]
        print(json.dumps(run()), flush=True)
        return
    variants = args.only.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    missing = missing_packages(variants)
    if missing:
        needing = [v for v in variants if set(BENCH_EXTRA.get(v, ())) & set(missing)]
        raise SystemExit(f"not installed: {', '.join(missing)} (for {', '.join(needing)}); pip install -e \".[bench]\", "
                         "or leave those variants out with --only")
    from mthlib.models import resolve_model_path

    args.model = resolve_model_path(args.model)  # TRL and generate read the same local folder mthlib trains
    scratch = tempfile.TemporaryDirectory(prefix="side_by_side_")  # run folders are kept only with --out
    out = args.out or Path(scratch.name)
    out.mkdir(parents=True, exist_ok=True)
    raw, results = {}, {}
    for variant in variants:
        print(f"running {variant} ...", flush=True)
        measure = mthlib_variant if variant.startswith("mthlib") else python_child
        raw[variant] = measure(variant, args, out)
        results[variant] = summarize(raw[variant])
        print(f"{variant}: {json.dumps(results[variant])}", flush=True)
    for name in FIXED_BATCH if args.fixed_steps else ():
        print(f"timing fixed_{name} ...", flush=True)
        fixed = fixed_batch_variant(name, args, out)
        if fixed is not None:
            results[f"fixed_{name}"] = fixed
            print(f"fixed_{name}: {json.dumps(fixed)}", flush=True)
    print_report(results)
    if args.out:
        (out / "side_by_side.json").write_text(json.dumps(
            {"settings": {k: str(v) for k, v in vars(args).items()}, "per_step": raw, "summary": results}, indent=2))
    scratch.cleanup()


if __name__ == "__main__":
    main()
