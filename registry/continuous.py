"""Continuous sparsification: learn a gate on each candidate entry's update, then keep the ``k`` most open gates."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask


@register_mask("continuous")
class Continuous(MaskStrategy):
    """Train the entries whose learned update gates stay open (continuous sparsification).

    Source: Savarese, Silva, Maire, "Winning the Lottery with Continuous Sparsification",
    NeurIPS 2020 (arXiv:1912.04427): sigmoid gates ``sigmoid(s / T)`` whose temperature
    ``T`` falls exponentially, so soft gates harden into a mask, with an L1 penalty on the
    gates; Louizos, Welling, Kingma, "Learning Sparse Neural Networks through L0
    Regularization", ICLR 2018 (arXiv:1712.01312): the penalty on the expected number of
    open gates. Gating the *update* rather than the weight follows diff pruning (Guo, Rush,
    Kim, "Parameter-Efficient Transfer Learning with Diff Pruning", ACL 2021,
    arXiv:2012.07463): a fine-tuning mask must say which entries gain most from changing,
    not which weights the model needs.

    Gate phase: on the ``C`` candidate entries the effective weight is
    ``w = w_base + sigmoid(s / T_t) * delta`` (the base model is never written: the forward
    pass runs :func:`torch.func.functional_call` with these tensors). ``s`` starts at 0
    (every gate half open) and ``delta`` at 0. Each of the ``steps`` steps ``t = 0 ..
    steps - 1`` takes the next calibration batch in turn and the objective

    ``J = L_batch + penalty * mean_candidates(sigmoid(s / T_t))``,

    ``L_batch`` being the batch's causal-LM loss (Hugging Face's mean over label tokens)
    and the mean the expected fraction of open gates; then

    * ``delta`` takes an Adam step (``lr = update_lr``, PyTorch's default betas): the
      change the following fine-tune (Adam-type, at about this learning rate) could make;
    * ``s`` takes a normalized gradient step ``s -= gate_lr * G / rms(G)``, ``G = dJ/ds``
      and the RMS over every candidate of every tensor: one global step size, so each
      gate moves in proportion to its own gradient ``G = (dL/dw * delta + penalty / C) *
      g (1 - g) / T_t`` (``g = sigmoid(s / T_t)``) and the ranking keeps its magnitudes
      (a per-entry Adam step would move every gate by about ``gate_lr`` and tie them).

    A gate opens while the loss decrease its entry's update buys outweighs its share of the
    penalty; an entry whose best change is small or quickly reached (however steep its
    gradient at the base) needs no open gate, since ``delta`` alone reaches it.

    Temperature: ``T_t = temperature_start * (temperature_end / temperature_start) **
    (t / (steps - 1))`` (``temperature_start`` when ``steps == 1``), exponential from start
    to end as in Savarese et al. (their ``beta = 1 / T`` grows by a constant factor).

    Candidates: with ``candidates = c`` the gates sit on the entries with the largest
    ``|g|``, ``g`` the log-likelihood gradient summed over the calibration batches, ``c``
    times as many as the mask keeps (``keep_count`` computed at density ``c * (1 -
    sparsity)``, capped at every entry; per tensor under ``per_tensor``); with ``None`` on
    every eligible entry. A candidate holds 24 bytes (``s``, ``delta``, Adam's two moments,
    an int64 index) and about 20 more during a step (gradients, gates): gating every entry
    of SmolLM2-135M would add about 6 GB to its 0.5 GB of fp32 weights, ``c = 10`` at
    sparsity 0.99 about 0.6 GB. First-order ``|g|`` is where a fine-tune's first steps go;
    the gates then re-rank these candidates by what changing them achieves.

    Selection rule: keep ``k = keep_count(n)`` candidates with the largest final ``s``
    (:meth:`~mthlib.masking.MaskStrategy.top_k` over scores that are ``-inf`` outside the
    candidates: exact count, ``global`` or ``per_tensor``, ties to the earlier parameter,
    then the lower flat index; ``exclude_mask`` entries are never chosen).

    Objective: the gates learn from the calibration batches' causal-LM loss (the prompts'
    reference replies, the data :class:`~mthlib.registry.fisher.Fisher` and
    :class:`~mthlib.registry.snip.Snip` use), not from the GRPO loss: a strategy sees the
    base model and calibration batches, not the environment's rewards or rollouts. The
    gradient of a reference reply's log-likelihood is the REINFORCE term of that reply with
    reward 1 (off-policy: the reply is the reference's, not a sample of the model), so the
    gates learn which entries move the model towards correct answers fastest; whether
    GRPO's own signal would rank them alike is untested.

    Cost: one forward and backward pass per calibration batch for the candidates (skipped
    when they are every entry), then ``steps`` forward and backward passes of one batch
    each; memory: the fp32 ``|g|`` and final score buffers of ``fisher``, one copy of
    the eligible weights during each pass, and about 44 bytes per candidate. No random choice:
    ``seed`` seeds the calibration stream only. Under data-parallel training each process
    passes its share of the batches and every step averages the gradients of ``s`` and
    ``delta`` over the processes, so every process chooses the same mask.

    Args:
        candidates: Gated entries per kept entry (``None``: every eligible entry).
        steps: Gate training steps (one calibration batch each, cycling through them).
        gate_lr: RMS change of the gate logits ``s`` per step.
        update_lr: Adam learning rate of the gated update ``delta``.
        penalty: Weight of the expected fraction of open gates in the objective, in units
            of the loss (nats): opening every candidate costs ``penalty``.
        temperature_start: Gate temperature at the first step.
        temperature_end: Gate temperature at the last step (``<= temperature_start``).
        num_samples: Calibration sequences.
        **options: The shared options (``sparsity``, ``allocation``, ``include``, ``seed``, ...)
            of :class:`~mthlib.masking.MaskStrategy`.
    """

    needs_calibration = True

    def __init__(
        self,
        candidates: int | None = 10,
        steps: int = 100,
        gate_lr: float = 0.1,
        update_lr: float = 1e-4,
        penalty: float = 0.1,
        temperature_start: float = 1.0,
        temperature_end: float = 0.01,
        num_samples: int = 64,
        **options: Any,
    ) -> None:
        if candidates is not None and candidates < 1:
            raise ValueError(f"candidates must be >= 1 (gated entries per kept entry) or None (all); got {candidates}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (gate training steps); got {steps}")
        if not (gate_lr > 0 and update_lr > 0):
            raise ValueError(f"gate_lr and update_lr must be > 0; got {gate_lr}, {update_lr}")
        if not penalty >= 0:
            raise ValueError(f"penalty must be >= 0 (weight of the expected gate density); got {penalty}")
        if not 0 < temperature_end <= temperature_start < math.inf:
            got = f"{temperature_start}, {temperature_end}"
            raise ValueError(f"temperatures must satisfy 0 < temperature_end <= temperature_start; got {got}")
        super().__init__(**options)
        self.candidates = candidates
        self.steps = steps
        self.gate_lr = gate_lr
        self.update_lr = update_lr
        self.penalty = penalty
        self.temperature_start = temperature_start
        self.temperature_end = temperature_end
        self.use_calibration(num_samples)

    def temperature(self, step: int) -> float:
        """Gate temperature at ``step``: ``T_start * (T_end / T_start) ** (step / (steps - 1))`` (one step: ``T_start``)."""
        if self.steps == 1:
            return self.temperature_start
        ratio = self.temperature_end / self.temperature_start
        return self.temperature_start * ratio ** (step / (self.steps - 1))

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Train the gates on ``batches`` and keep the ``k`` candidates with the largest gate logits."""
        pool, logits = self.train_gates(model, batches)
        params = self.eligible(model)
        scores = {}
        for name, p in params.items():
            score = torch.full((p.numel(),), -math.inf, dtype=torch.float32)
            score[pool[name]] = logits[name]
            scores[name] = score.view(p.shape)
        return self.top_k(scores)

    def train_gates(self, model: nn.Module, batches: Iterable[Batch] | None) -> tuple[Masks, dict[str, torch.Tensor]]:
        """Run the gate phase; return the candidates and their final gate logits ``s`` (fp32, CPU, aligned with them).

        Raises:
            ValueError: No calibration batch has a target token.
        """
        if batches is None:
            raise ValueError("continuous needs calibration batches (input_ids, attention_mask, labels)")
        usable = [b for b in batches if "labels" not in b or not bool((b["labels"] == -100).all())]
        params = self.eligible(model)
        device = next(iter(params.values())).device
        if _summed_over_processes(len(usable), device) == 0:
            raise ValueError("no calibration batches with target tokens were given; continuous needs at least one")
        pool = self._candidates(model, params, usable)
        gates = _GatedUpdates(pool, device, self.update_lr)
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                for step in range(self.steps):
                    batch = usable[step % len(usable)] if usable else None
                    gates.step(model, params, batch, self.temperature(step), self.penalty, self.gate_lr)
        finally:
            model.train(was_training)
        return pool, {name: s.detach().cpu() for name, s in gates.logits.items()}

    def _candidates(self, model: nn.Module, params: dict[str, nn.Parameter], batches: list[Batch]) -> Masks:
        """The gated entries: the top ``|g|`` at ``candidates`` times the kept density, or every eligible entry."""
        keep = round(1.0 - self.sparsity, 12)
        if self.candidates is None or self.candidates * keep >= 1.0:
            shapes = {name: p.shape for name, p in params.items()}
            return Masks({name: torch.arange(p.numel()) for name, p in params.items()}, shapes)
        wider = copy.copy(self)  # the same options and exclusion at a lower sparsity: its top_k picks the candidates
        wider.sparsity = 1.0 - self.candidates * keep
        return wider.top_k(self.accumulate(model, batches, lambda weight, grad: grad.abs()))


class _GatedUpdates:
    """The gate phase's state on the candidates: gate logits ``s``, updates ``delta`` (fp32) and Adam on ``delta``."""

    def __init__(self, pool: Masks, device: torch.device, update_lr: float) -> None:
        self.index = {name: idx.to(device) for name, idx in pool.items()}
        self.logits = {name: _zero_leaf(idx.numel(), device) for name, idx in self.index.items()}
        self.updates = {name: _zero_leaf(idx.numel(), device) for name, idx in self.index.items()}
        self.adam = torch.optim.Adam(list(self.updates.values()), lr=update_lr)
        self.total = sum(idx.numel() for idx in self.index.values())

    def weights(self, params: dict[str, nn.Parameter], gates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``w_base + gate * delta`` at the candidates, as new tensors (the parameters are only read)."""
        out = {}
        for name, index in self.index.items():
            base = params[name].detach()
            change = (gates[name] * self.updates[name]).to(base.dtype)
            out[name] = base.reshape(-1).index_add(0, index, change).view(base.shape)
        return out

    def step(self, model: nn.Module, params: dict[str, nn.Parameter], batch: Batch | None, temperature: float,
             penalty: float, gate_lr: float) -> None:
        """One gate step: loss gradients (averaged over processes), Adam on ``delta``, a normalized step on ``s``."""
        names = list(self.index)
        gates = {name: torch.sigmoid(self.logits[name] / temperature) for name in names}
        leaves = [self.logits[n] for n in names] + [self.updates[n] for n in names]
        if batch is not None:
            device = leaves[0].device
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            loss = functional_call(model, self.weights(params, gates), args=(), kwargs=inputs).loss
            if loss is None:
                raise ValueError("calibration batches need 'labels' so the model returns a loss")
            grads = list(torch.autograd.grad(loss, leaves))
        else:
            grads = [torch.zeros_like(leaf) for leaf in leaves]
        grads = _averaged_over_processes(grads, batch is not None)
        with torch.no_grad():
            for name, grad in zip(names, grads[len(names):]):
                self.updates[name].grad = grad
            self.adam.step()
            moves = [grad + penalty / self.total * gates[name] * (1 - gates[name]) / temperature
                     for name, grad in zip(names, grads[: len(names)])]
            rms = math.sqrt(sum(float(move.square().sum()) for move in moves) / self.total)
            if rms > 0:
                for name, move in zip(names, moves):
                    self.logits[name].sub_(move, alpha=gate_lr / rms)


def _zero_leaf(numel: int, device: torch.device) -> torch.Tensor:
    """An fp32 vector of zeros that autograd differentiates."""
    return torch.zeros(numel, device=device, requires_grad=True)


def _summed_over_processes(value: int, device: torch.device) -> int:
    """``value`` summed over the processes of a running process group (itself in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    counted = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(counted)
    return int(counted)


def _averaged_over_processes(grads: list[torch.Tensor], contributed: bool) -> list[torch.Tensor]:
    """Gradients averaged over the processes that had a batch this step (unchanged in a single process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads] + [torch.ones(1, device=grads[0].device) * float(contributed)])
    dist.all_reduce(flat)
    flat = flat[:-1] / max(float(flat[-1]), 1.0)
    return [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
