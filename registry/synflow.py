"""SynFlow: keep the entries that carry the most synaptic flow, pruning the rest over many data-free rounds."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mthlib.masking import Batch, Masks, MaskStrategy, register_mask


@register_mask("synflow")
class SynFlow(MaskStrategy):
    """Train the entries carrying the most synaptic flow (weight of the paths through them), pruned over rounds.

    Source: Tanaka, Kunin, Yamins, Ganguli, "Pruning neural networks without any data by
    iteratively conserving synaptic flow", NeurIPS 2020 (arXiv:2006.05467).

    Selection rule (the paper's): every weight is replaced by ``|w|``, an all-ones input
    goes through the network, ``R`` is the sum of the outputs, and an entry's score is
    ``w * dR/dw``: the total weight of the input-to-output paths through it (the
    ``l1`` path norm). Scoring is repeated for ``rounds`` rounds; after round ``r`` only
    the ``int(n * keep ** (r / rounds))`` best-scoring entries survive (``keep = 1 -
    sparsity``; ``n`` all eligible entries with ``global``, each tensor's with
    ``per_tensor``), and pruned entries are set to 0 for the next round's scores, so a
    tensor thinned early gains score and is not emptied (the paper's "layer collapse").
    The last round leaves exactly ``k = keep_count(n)`` entries, the mask. Every round
    drops the lowest scores, tied entries the later parameter and higher flat index
    first, so the survivors are what :meth:`~mthlib.masking.MaskStrategy.top_k` would
    keep among the previous round's survivors (exact count, ties to the earlier
    parameter, then the lower index); ``top_k`` itself is not called, because it ranks
    one concatenated copy of all the scores (1 GiB in float64 on a 135M model, on top
    of the float64 network and its gradients), while a round prunes each tensor's
    scores in place. ``exclude_mask`` entries are never chosen and never pruned: they
    stay in the network with their ``|w|``.

    Adaptation to a causal LM (where it departs from the paper, and why):

    * Input. A token is a one-hot row that selects an embedding; the all-ones input over
      the vocabulary gives the sum of the ``|w|`` embedding rows, which is fed as
      ``inputs_embeds`` of one position. The embedding matrix is so the first linear
      layer with an all-ones input, as in the paper; a tied LM head is the same
      parameter and its score sums both uses. One position suffices: with identical
      positions attention averages identical values, so more positions give the same
      ``R``.
    * Attention. With one (or identical) positions the softmax weights are constant, so
      the only path through an attention block is ``v_proj`` then ``o_proj``; the
      ``q_proj`` and ``k_proj`` entries score 0. They are pruned first under ``global``
      allocation; under ``per_tensor`` their quota goes by the tie rule (lowest flat
      indices). SynFlow's path norm has no notion of attention patterns.
    * Norms. An RMS norm ``x * |g| / rms(x)`` makes ``R`` invariant to the scale of its
      input, so gradients before it are projected orthogonally to the activations and
      take both signs, which is no longer a flow (on SmolLM2-135M 76% of the first
      ``down_proj``'s gradients are negative); removing the norms instead lets every
      gated MLP square the activations, and ``R`` overflows float64 (NaN on
      SmolLM2-135M's 30 layers). Each module whose class name
      contains ``Norm`` is therefore replaced (by a forward hook on the private copy) by
      ``x * |g| / rms(x)`` with ``rms(x)`` held constant: the same value, linear in
      ``x`` with positive coefficients. A LayerNorm's mean subtraction is dropped by
      the same rule (``x * |g| / rms(x) + |b|``).
    * Gated MLP. ``silu(gate(x)) * up(x)`` is not a linear path; with positive inputs
      both factors are positive and increasing, so scores stay non-negative but flow is
      only approximately conserved.
    * Precision. Scores are computed and ranked in float64, the paper's choice. With the
      frozen norms nothing overflows float32 (SmolLM2-135M's scores lie in 1e-8..5e4),
      but float32 would round about a third of the distinct scores into ties (99.6M
      distinct values become 62.5M), leaving those choices to the index order.
    * Residual connections. The skip path joins the embeddings to the LM head directly,
      so a block's weights can all be pruned without disconnecting input from output:
      whole MLP matrices may get no entry, and a tied embedding, which carries flow at
      both ends, draws many entries. On SmolLM2-135M at sparsity 0.99 the MLP matrices
      left empty are 68 of 90 after one round, 51 after 5 and 19 after 20, with the
      embeddings taking 43% of the entries after 20 rounds; the attention's ``v``/``o``
      paths carry little flow.

    Everything runs on a deep copy of the model in float64 (eval mode); the model passed
    in is never written. No random choice: ``seed`` has no effect.

    Cost: per round, one forward and backward pass of a single position and a few
    passes over the scores to find the round's threshold; memory: a float64 copy of the
    model (twice an fp32 model), its gradients and one float64 score per eligible entry
    (the 135M embedded model: 3.8 GiB peak resident memory). The paper uses 100 rounds;
    the default here is 20, each pruning about a fifth of the survivors at sparsity
    0.99, because a round of the embedded model costs 3-25 s on a 2-core CPU (20 rounds:
    65 s with the machine partly shared, up to 8 minutes when it was busy) and the mask
    changes little beyond that: on a 2M-parameter
    12-layer Llama the masks of 20 and 50 rounds share 87% of their entries, those of
    50 and 100 rounds 95%. Set ``rounds: 100`` for the paper's schedule.

    Args:
        rounds: Pruning rounds (1: single-shot scores, no iteration).
        **options: The shared options (``sparsity``, ``allocation``, ``include``, ...) of
            :class:`~mthlib.masking.MaskStrategy`.
    """

    def __init__(self, rounds: int = 20, **options: Any) -> None:
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1 (pruning rounds; 1 is single-shot); got {rounds}")
        super().__init__(**options)
        self.rounds = rounds

    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Prune over ``rounds`` rounds to ``keep ** (r / rounds)``; the last round leaves exactly ``k`` entries."""
        flow = _SynapticFlow(model, list(self.eligible(model)))
        alive = {name: torch.ones(p.shape, dtype=torch.bool, device=p.device) for name, p in flow.params.items()}
        blocked = self._blocked(flow.params)
        keep = round(1.0 - self.sparsity, 12)
        for r in range(1, self.rounds + 1):
            self._prune(flow.scores(), alive, blocked, keep ** (r / self.rounds))
            flow.remove(alive)
        del flow
        masks = Masks.from_dense({name: flags & ~blocked[name] if name in blocked else flags
                                  for name, flags in alive.items()})
        wanted = (self.keep_count(masks.numel) if self.allocation == "global"
                  else sum(self.keep_count(math.prod(masks.shape(name))) for name in masks.names))
        if masks.total < wanted:
            raise ValueError(
                f"cannot keep {wanted} entries: only {masks.total} of {masks.numel} are not in exclude_mask"
            )
        return masks

    def scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Single-shot SynFlow scores ``|w| * dR/d|w|`` (float64) of every eligible entry of the unpruned model."""
        return _SynapticFlow(model, list(self.eligible(model))).scores()

    def _blocked(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense booleans of the ``exclude_mask`` entries, per eligible parameter that has some."""
        indices = self.excluded_indices({name: tuple(p.shape) for name, p in params.items()})
        excluded = Masks(indices, {name: tuple(params[name].shape) for name in indices})
        return {name: excluded.to_dense(name).to(params[name].device) for name in indices}

    def _prune(self, scores: dict[str, torch.Tensor], alive: dict[str, torch.Tensor],
               blocked: Mapping[str, torch.Tensor], density: float) -> None:
        """Mark dead (in ``alive``) the lowest-scoring survivors until ``int(n * density)`` remain.

        ``n`` counts all entries of the group (the model with ``global``, a tensor with
        ``per_tensor``), as :meth:`~mthlib.masking.MaskStrategy.keep_count` does;
        ``exclude_mask`` entries are never pruned nor counted as survivors. Overwrites
        ``scores`` (dead entries become ``inf``).
        """
        groups = [list(scores)] if self.allocation == "global" else [[name] for name in scores]
        for names in groups:
            target = int(sum(scores[n].numel() for n in names) * round(density, 12))
            parts, survivors = [], 0
            for n in names:
                open_ = alive[n] & ~blocked[n] if n in blocked else alive[n]
                survivors += int(open_.sum())
                parts.append(scores[n].masked_fill_(~open_, math.inf).view(-1))
            if survivors > target:
                _kill_lowest(parts, [alive[n].view(-1) for n in names], survivors - target)


def _kill_lowest(parts: Sequence[torch.Tensor], alive: Sequence[torch.Tensor], count: int) -> None:
    """Set ``alive`` to False at the ``count`` smallest finite entries of ``parts`` taken end to end.

    Ties at the threshold go in the mirror image of the keep rule (the later part, then
    the higher index, first), so a pruning round drops exactly what a keep at the same
    count would not keep.
    """
    threshold = _kth_smallest(parts, count)
    for part, flags in zip(parts, alive):
        below = part < threshold
        count -= int(below.sum())
        flags.masked_fill_(below, False)
    for part, flags in zip(reversed(parts), reversed(alive)):
        if count == 0:
            break
        ties = torch.nonzero(part == threshold).view(-1)[-count:]
        flags[ties] = False
        count -= ties.numel()


def _kth_smallest(parts: Sequence[torch.Tensor], k: int, sample_size: int = 1 << 20) -> torch.Tensor:
    """The ``k``-th smallest finite entry of ``parts`` taken together, exactly, ranking only a narrow window of them.

    A fixed-seed sample brackets it between two sample quantiles around ``k / n``; only
    the entries inside the bracket are ranked, and the bracket widens until it holds
    the answer, so the result never depends on the sample. No part is copied.
    """
    dtype, device = parts[0].dtype, parts[0].device
    lowest = torch.tensor(-math.inf, dtype=dtype, device=device)
    largest = torch.tensor(torch.finfo(dtype).max, dtype=dtype, device=device)  # every finite entry, no inf
    total = sum(p.numel() for p in parts)
    if total > 4 * sample_size:
        sample = _sample(parts, sample_size)
        level, margin = k / total, 2e-3
        while margin < 1.0:
            low = torch.quantile(sample, level - margin, interpolation="lower") if level > margin else lowest
            high = torch.quantile(sample, min(1.0, level + margin), interpolation="higher").clamp(max=largest)
            under, window = _between(parts, low, high)
            if under < k <= under + window.numel():
                return torch.kthvalue(window, k - under).values
            margin *= 4
    under, window = _between(parts, lowest, largest)
    return torch.kthvalue(window, k - under).values


def _between(parts: Sequence[torch.Tensor], low: torch.Tensor, high: torch.Tensor) -> tuple[int, torch.Tensor]:
    """How many entries of ``parts`` are below ``low``, and the entries in ``[low, high]``."""
    under = sum(int(torch.count_nonzero(p < low)) for p in parts)
    return under, torch.cat([p[(p >= low) & (p <= high)] for p in parts])


def _sample(parts: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """``size`` entries of ``parts`` taken together, drawn with replacement by a generator seeded with 0."""
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.numel())
    device = parts[0].device
    generator = torch.Generator(device=device).manual_seed(0)
    picks = torch.sort(torch.randint(starts[-1], (size,), generator=generator, device=device)).values
    cuts = torch.searchsorted(picks, torch.tensor(starts, device=device)).tolist()
    return torch.cat([p[picks[cuts[i]: cuts[i + 1]] - starts[i]] for i, p in enumerate(parts)])


class _SynapticFlow:
    """A float64 copy of a causal LM with ``|w|`` weights and linearized norms; scores entries by ``w * dR/dw``.

    Args:
        model: The causal LM (copied, never written); it needs ``get_input_embeddings()``
            and a forward taking ``inputs_embeds`` that returns ``logits``.
        names: The eligible parameter names (as in ``model.named_parameters()``).
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        get_embeddings = getattr(model, "get_input_embeddings", None)
        if get_embeddings is None or get_embeddings() is None:
            raise ValueError(f"synflow needs a causal LM with get_input_embeddings(); {type(model).__name__} has none")
        net = copy.deepcopy(model).to(torch.float64).eval()
        params = dict(net.named_parameters())
        with torch.no_grad():
            for p in params.values():
                p.grad = None
                p.requires_grad_(False).abs_()
        self.params = {name: params[name].requires_grad_(True) for name in names}
        for module in net.modules():
            if "norm" in type(module).__name__.lower():
                module.register_forward_hook(_frozen_rms)
        self.net = net
        self.embeddings = net.get_input_embeddings()

    def scores(self) -> dict[str, torch.Tensor]:
        """``w * dR/dw`` for every eligible entry (0 at pruned entries), ``R`` the summed logits of the all-ones input.

        Raises:
            ValueError: ``R`` or a score is not finite (the path products overflowed float64).
        """
        ones_input = self.embeddings.weight.sum(dim=0).view(1, 1, -1)
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel leaves ~1e-10 noise where the math is exactly 0
            total = self.net(inputs_embeds=ones_input).logits.sum()
            if not bool(torch.isfinite(total)):
                raise ValueError(f"synflow's path sum R is {float(total.detach())}: the path products overflow float64")
            grads = list(torch.autograd.grad(total, list(self.params.values()), allow_unused=True))
        scores = {}
        for i, (name, p) in enumerate(self.params.items()):
            grad, grads[i] = grads[i], None  # free each gradient once its score exists
            scores[name] = torch.zeros_like(p) if grad is None else grad * p.detach()
            if not bool(torch.isfinite(scores[name]).all()):
                raise ValueError(f"synflow scores of {name} are not finite: the path products overflow float64")
        return scores

    @torch.no_grad()
    def remove(self, alive: Mapping[str, torch.Tensor]) -> None:
        """Set the dead entries (``False`` in ``alive``) to 0, so later rounds score without them."""
        for name, flags in alive.items():
            self.params[name].masked_fill_(~flags, 0.0)


def _frozen_rms(module: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
    """Forward hook: the norm's output becomes ``x * |g| / rms(x) (+ |b|)``, ``rms(x)`` detached (linear in ``x``)."""
    x = args[0]
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, torch.Tensor):
        y = y * weight
    if isinstance(bias, torch.Tensor):
        y = y + bias
    return y
