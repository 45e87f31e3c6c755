"""The :class:`MaskStrategy` base class: eligibility, exact counts, tie-breaking, gradient passes.

A strategy subclasses :class:`MaskStrategy`, registers itself with
:func:`~mthlib.masking.register_mask` and implements :meth:`MaskStrategy.compute`;
usually that is one line combining :meth:`~MaskStrategy.accumulate` (or
:meth:`~MaskStrategy.squared_grads`) with :meth:`~MaskStrategy.top_k`. Everything that
must be the same for every strategy (which parameters may be trained, how many entries
are kept, how ties break, how tied weights count) lives here.

Contract for subclasses: ``__init__`` takes only named, typed, defaulted arguments
(no ``*args``/``**kwargs``) and stores each one as an attribute of the same name,
because :meth:`MaskStrategy.config` reads them back to record the full configuration.
"""

import abc
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mthlib.distributed import all_reduce_sum_
from mthlib.masking.masks import Masks
from mthlib.masking.optim import gathering_paused
from mthlib.masking.sparse_backward import dense_weight_gradients

Allocation = Literal["global", "per_tensor"]
"""``global``: one top-k over every eligible entry; ``per_tensor``: the same density in every tensor."""

ParameterKind = Literal["matrix", "embedding", "norm", "bias", "other"]

Batch = Mapping[str, torch.Tensor]
"""A calibration batch: ``input_ids`` and ``attention_mask`` ``(B, L)``, ``labels`` ``(B, L)`` (-100 = no loss)."""

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_fn(weight, grad) -> score`` of one parameter, all three of the parameter's shape."""


def parameter_kinds(model: nn.Module) -> dict[str, ParameterKind]:
    """Classify each parameter of ``model`` (tied ones once, under their first name).

    ``embedding``: the weight of an :class:`~torch.nn.Embedding` or of the model's output
    embeddings (``get_output_embeddings()``, the LM head); ``matrix``: any other parameter
    with two or more dimensions; ``norm``: a 1-D parameter whose name contains ``norm`` or
    whose module's class name does (``LayerNorm``, ``RMSNorm``), biases of norms included;
    ``bias``: another 1-D parameter named ``*bias``; ``other``: the rest.
    """
    embeddings: set[int] = set()
    owners: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            embeddings.add(id(module.weight))
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), type(module).__name__)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(getattr(output, "weight", None), torch.Tensor):
        embeddings.add(id(output.weight))
    kinds: dict[str, ParameterKind] = {}
    for name, param in model.named_parameters():
        if id(param) in embeddings:
            kinds[name] = "embedding"
        elif param.dim() >= 2:
            kinds[name] = "matrix"
        elif "norm" in name.lower() or "norm" in owners.get(id(param), "").lower():
            kinds[name] = "norm"
        elif name.rsplit(".", 1)[-1] == "bias":
            kinds[name] = "bias"
        else:
            kinds[name] = "other"
    return kinds


class MaskStrategy(abc.ABC):
    """Base class of every mask strategy: turns a model (and calibration batches) into :class:`~mthlib.masking.Masks`.

    Eligibility: by default every parameter with two or more dimensions (embeddings
    included unless ``include_embeddings=False``); layer-norm weights only with
    ``include_norms``, biases only with ``include_biases``; other 1-D parameters never.
    ``include`` then *narrows* that selection to names matching one of its patterns (the
    kind flags still apply, so ``include=["*norm*"]`` needs ``include_norms=True``), and
    ``exclude`` removes matching names. Patterns are :func:`fnmatch.fnmatchcase` globs on
    names as in :meth:`~torch.nn.Module.named_parameters`; tied weights (embeddings shared
    with the LM head) appear once, under their first name, and are counted once.

    Counts: :meth:`keep_count` gives ``k = int(n * keep)`` with ``keep = round(1 - sparsity, 12)``,
    the blog's ``int(numel * keep_ratio)``; ``n`` is all eligible entries (``global``) or one
    tensor's entries (``per_tensor``).

    Args:
        sparsity: Fraction of eligible entries that stay frozen (0.99 trains 1%).
        allocation: ``global`` top-k over the model, or ``per_tensor`` with the same density in every tensor.
        include: Name patterns of parameters that may be trained (``None``: all of the default kinds).
        exclude: Name patterns removed after ``include``; a pattern matching nothing is ignored.
        include_norms: Let layer-norm weights (and norm biases) be trained.
        include_biases: Let biases be trained.
        include_embeddings: Let the input embeddings and the LM head be trained.
        seed: Seed of every random choice the strategy makes (sampling, calibration order).
        exclude_mask: Path of a :class:`~mthlib.masking.Masks` file whose active entries may
            never be selected (sequential multi-task training: task 1's entries stay frozen
            for task 2). :meth:`top_k` drops them before ranking; strategies that do not use
            :meth:`top_k` read them with :meth:`exclusion`.

    Raises:
        ValueError: ``sparsity`` outside [0, 1) or an unknown ``allocation``.
    """

    name: ClassVar[str] = ""
    """The registered short name (set by :func:`~mthlib.masking.register_mask`)."""
    needs_calibration: ClassVar[bool] = False
    """Whether :meth:`compute` needs calibration batches (gradient-based strategies)."""
    dynamic: ClassVar[bool] = False
    """Whether the mask changes during training through :meth:`update`."""
    num_samples: int = 0
    """Calibration sequences the strategy wants."""
    update_every: int = 0
    """Optimizer steps between two :meth:`update` calls (dynamic strategies)."""

    def __init__(
        self,
        sparsity: float = 0.99,
        allocation: Allocation = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_norms: bool = False,
        include_biases: bool = False,
        include_embeddings: bool = True,
        seed: int = 0,
        exclude_mask: str | None = None,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (fraction of entries that stay frozen); got {sparsity}")
        if allocation not in ("global", "per_tensor"):
            raise ValueError(f"allocation must be 'global' or 'per_tensor'; got {allocation!r}")
        self.sparsity = sparsity
        self.allocation = allocation
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.include_norms = include_norms
        self.include_biases = include_biases
        self.include_embeddings = include_embeddings
        self.seed = seed
        self.exclude_mask = exclude_mask
        self._exclusion: Masks | None = None

    # -- what a strategy implements ---------------------------------------------------------
    @abc.abstractmethod
    def compute(self, model: nn.Module, batches: Iterable[Batch] | None) -> Masks:
        """Choose the trainable entries of ``model``.

        Args:
            model: The base causal LM.
            batches: Calibration batches when :attr:`needs_calibration`, else ``None``.

        Returns:
            Masks over the :meth:`eligible` parameters.
        """

    def update(
        self,
        masks: Masks,
        model: nn.Module,
        step: int,
        grads: Mapping[str, torch.Tensor] | None,
        base_values: Mapping[str, torch.Tensor],
        batches: Iterable[Batch] | None,
    ) -> Masks:
        """Re-choose the mask during training (dynamic strategies only); the count must stay the same.

        Args:
            masks: The current masks.
            model: The model being trained.
            step: The global optimizer step.
            grads: Name to the gradient of the last step at the active entries (fp32,
                aligned with ``masks[name]``), when the optimizer keeps them.
            base_values: Name to the base model's values at the active entries (aligned
                with ``masks[name]``), so a strategy can measure how far entries moved.
            batches: Fresh calibration batches when :attr:`needs_calibration`, else ``None``
                (e.g. to compute dense gradients with :meth:`accumulate`).
        """
        raise NotImplementedError(f"{type(self).__name__} is not a dynamic strategy; it has no update()")

    # -- eligibility and counts -------------------------------------------------------------
    def eligible(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters this strategy may train, in :meth:`~torch.nn.Module.named_parameters` order.

        Raises:
            ValueError: An ``include`` pattern matches no parameter, or nothing is eligible.
        """
        params = dict(model.named_parameters())
        kinds = parameter_kinds(model)
        allowed = {"matrix": True, "embedding": self.include_embeddings, "norm": self.include_norms,
                   "bias": self.include_biases, "other": False}
        selected = {name: p for name, p in params.items() if allowed[kinds[name]]}
        if self.include is not None:
            for pattern in self.include:
                self._check_include(pattern, params, selected, kinds)
            selected = {n: p for n, p in selected.items() if any(fnmatchcase(n, pat) for pat in self.include)}
        if self.exclude:
            selected = {n: p for n, p in selected.items() if not any(fnmatchcase(n, pat) for pat in self.exclude)}
        if not selected:
            raise ValueError(f"no parameter is eligible for {type(self).__name__}: check include/exclude and the include_* flags")
        return selected

    @staticmethod
    def _check_include(pattern: str, params: Mapping[str, nn.Parameter], selected: Mapping[str, nn.Parameter],
                       kinds: Mapping[str, str]) -> None:
        matches = [n for n in params if fnmatchcase(n, pattern)]
        if not matches:
            examples = ", ".join(list(params)[:4])
            raise ValueError(f"include pattern {pattern!r} matches no parameter; names look like: {examples}")
        if not any(n in selected for n in matches):
            kind = kinds[matches[0]]
            flag = {"norm": "include_norms", "bias": "include_biases", "embedding": "include_embeddings"}.get(kind)
            fix = f"set {flag}=True" if flag else "such parameters are never eligible"
            raise ValueError(
                f"include pattern {pattern!r} matches only ineligible parameters (e.g. {matches[0]}, a {kind}); {fix}"
            )

    def keep_count(self, n: int) -> int:
        """Active entries kept out of ``n``: ``int(n * round(1 - sparsity, 12))`` (the blog's ``int(numel * keep_ratio)``)."""
        return int(n * round(1.0 - self.sparsity, 12))

    def exclusion(self) -> Masks | None:
        """The masks loaded from ``exclude_mask`` (cached), or ``None``."""
        if self.exclude_mask is None:
            return None
        if self._exclusion is None:
            self._exclusion = Masks.load(self.exclude_mask)
        return self._exclusion

    # -- selection --------------------------------------------------------------------------
    def top_k(self, scores: Mapping[str, torch.Tensor]) -> Masks:
        """Keep the highest-scoring entries.

        ``global``: ``k = keep_count(sum of numel)`` over all tensors; ``per_tensor``:
        ``keep_count(numel)`` in each. Ties break by higher score, then earlier parameter
        (the order of ``scores``, i.e. eligible order), then lower flat index. Entries of
        ``exclude_mask`` are never chosen. Memory: one fp32 (fp64 for fp64 scores) copy
        of the scores at a time.

        Args:
            scores: Parameter name to scores of the parameter's shape, in eligible order.

        Raises:
            ValueError: A score is NaN, or fewer than ``k`` entries are left after the exclusion.
        """
        if not scores:
            raise ValueError("top_k needs scores for at least one parameter")
        for name, score in scores.items():
            if bool(torch.isnan(score).any()):
                raise ValueError(f"scores of {name} contain NaN")
        shapes = {name: tuple(score.shape) for name, score in scores.items()}
        excluded = self._excluded_indices(shapes)
        if self.allocation == "global":
            k = self.keep_count(sum(s.numel() for s in scores.values()))
            chosen = _select(scores, k, excluded)
        else:
            chosen = {}
            for name, score in scores.items():
                chosen.update(_select({name: score}, self.keep_count(score.numel()), excluded))
        return Masks(chosen, shapes)

    def _excluded_indices(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        exclusion = self.exclusion()
        if exclusion is None:
            return {}
        out = {}
        for name, shape in shapes.items():
            if name in exclusion:
                if exclusion.shape(name) != shape:
                    raise ValueError(
                        f"exclude_mask {self.exclude_mask} has shape {exclusion.shape(name)} for {name}; the model has {shape}"
                    )
                out[name] = exclusion[name]
        return out

    # -- gradient passes --------------------------------------------------------------------
    def accumulate(self, model: nn.Module, batches: Iterable[Batch], score_fn: ScoreFn) -> dict[str, torch.Tensor]:
        """Sum the causal-LM loss gradient of eligible parameters over ``batches``, then score.

        Each batch contributes the gradient of ``model(**batch).loss`` (Hugging Face's mean
        over label tokens). The model runs in eval mode (no dropout); ``requires_grad``,
        existing ``.grad`` and the train/eval mode are restored afterwards. Gradients are
        folded into fp32 buffers as soon as they are produced, so dense ``.grad`` tensors
        never accumulate. Safe during sparse training: a :class:`~mthlib.masking.SparseAdamW`
        on the same model neither sees nor loses these gradients. Under data-parallel
        training the sums cover every process's batches (each process passes its share).

        Returns:
            Name to ``score_fn(weight, summed_grad)`` for every eligible parameter.
        """
        params = self.eligible(model)
        grads = _gradient_pass(model, params, batches, squared=False, per_sample=False)
        return {name: score_fn(params[name].detach(), grads.pop(name)) for name in list(grads)}

    def squared_grads(self, model: nn.Module, batches: Iterable[Batch], per_sample: bool = False) -> dict[str, torch.Tensor]:
        """Squared gradients of eligible parameters: the diagonal Fisher estimates of the blog and of EWC.

        Args:
            model: The causal LM.
            batches: Calibration batches.
            per_sample: ``False``: sum over batches of (batch gradient)**2 (with a single
                batch this is the blog's ``theta.grad ** 2``; :class:`~mthlib.registry.fisher.Fisher`
                squares the gradient summed over all batches instead). ``True``: the empirical Fisher, the
                sum over single sequences of (sequence gradient)**2 (one backward pass per
                sequence: exact, not fast).

        Returns:
            Name to an fp32 tensor of the parameter's shape.
        """
        return _gradient_pass(model, self.eligible(model), batches, squared=True, per_sample=per_sample)

    # -- configuration ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The full configuration: ``{"class_path", "name", "init_args"}``, JSON-serialisable.

        ``init_args`` holds every ``__init__`` argument, read back from the attribute of
        the same name (tuples become lists).

        Raises:
            TypeError: ``__init__`` takes ``*args``/``**kwargs`` or an argument is not stored.
        """
        cls = type(self)
        origin = cls.__dict__.get("_alias_of") or cls
        init_args = {}
        for pname, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"{origin.__name__}.__init__ takes *{pname}; strategies take only named arguments")
            if not hasattr(self, pname):
                raise TypeError(
                    f"{origin.__name__}.__init__ takes {pname!r} but does not store it; set self.{pname} = {pname}"
                )
            value = getattr(self, pname)
            init_args[pname] = list(value) if isinstance(value, tuple) else value
        return {"class_path": f"{origin.__module__}.{origin.__qualname__}", "name": self.name, "init_args": init_args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config()["init_args"].items())
        return f"{type(self).__name__}({args})"


def _select(scores: Mapping[str, torch.Tensor], k: int, excluded: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``k`` best entries of ``scores`` taken together (ties: tensor order, then flat index)."""
    numel = sum(s.numel() for s in scores.values())
    blocked = sum(int(excluded[name].numel()) for name in scores if name in excluded)
    if k > numel - blocked:
        raise ValueError(f"cannot keep {k} entries: only {numel - blocked} of {numel} are not in exclude_mask")
    if k == 0:
        return {name: torch.zeros(0, dtype=torch.int64) for name in scores}
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else torch.float32
    values = torch.cat([s.detach().reshape(-1).to(dtype) for s in scores.values()])
    offsets, offset = {}, 0
    for name, score in scores.items():
        offsets[name] = offset
        if name in excluded and excluded[name].numel():
            values[offset + excluded[name].to(values.device)] = -math.inf
        offset += score.numel()
    threshold = _kth_largest(values, k)
    remaining = k - int(torch.count_nonzero(values > threshold))
    chosen = {}
    for name, score in scores.items():
        flat = values[offsets[name]: offsets[name] + score.numel()]
        above = torch.nonzero(flat > threshold).view(-1)
        taken = _first_ties(flat, threshold, remaining, excluded.get(name))
        remaining -= int(taken.numel())
        chosen[name] = torch.sort(torch.cat([above, taken])).values.cpu()
    return chosen


def _first_ties(
    flat: torch.Tensor, threshold: torch.Tensor, limit: int, excluded: torch.Tensor | None, chunk: int = 1 << 22
) -> torch.Tensor:
    """The first ``limit`` positions where ``flat == threshold``, outside ``excluded``, in order.

    Searched a chunk at a time, so a huge tie class (e.g. millions of zero scores) costs
    the positions actually taken, not an index of every tied entry.
    """
    found = [torch.zeros(0, dtype=torch.int64, device=flat.device)]
    for start in range(0, flat.numel(), chunk):
        if limit <= 0:
            break
        part = torch.nonzero(flat[start: start + chunk] == threshold).view(-1) + start
        if excluded is not None and part.numel():
            part = part[~torch.isin(part, excluded.to(part.device))]
        part = part[:limit]
        found.append(part)
        limit -= part.numel()
    return torch.cat(found)


def _kth_largest(values: torch.Tensor, k: int, sample_size: int = 1 << 20) -> torch.Tensor:
    """The ``k``-th largest entry of the 1-D ``values``, exactly, ranking only a small part of them.

    :func:`torch.kthvalue` on the whole vector would copy it and add int64 indices (three
    times the scores' memory: 1.5 GiB for a 134M-parameter model). Instead a fixed-seed
    random sample gives a lower bound that about ``2k`` entries exceed, and only the
    entries at or above it are ranked; an unlucky bound is lowered until enough pass.
    """
    n = values.numel()
    if n <= 4 * sample_size:
        return torch.kthvalue(values, n - k + 1).values
    generator = torch.Generator(device=values.device).manual_seed(0)
    sample = values[torch.randint(n, (sample_size,), generator=generator, device=values.device)]
    level = 1.0 - min(1.0, 2.0 * k / n + 1e-3)
    while True:
        bound = torch.quantile(sample, level, interpolation="lower") if level > 0 else values.min()
        above = values[values >= bound]
        if above.numel() >= k:
            return torch.kthvalue(above, above.numel() - k + 1).values
        level = max(0.0, 2.0 * level - 1.0)


def _gradient_pass(
    model: nn.Module, params: Mapping[str, nn.Parameter], batches: Iterable[Batch], squared: bool, per_sample: bool
) -> dict[str, torch.Tensor]:
    """Fold the loss gradients of ``params`` into fp32 buffers (sum of g, or of g**2).

    Under ``torch.distributed`` (data-parallel training) each process passes its own share
    of the calibration batches and the sums are all-reduced, so every process gets the
    statistics of all batches and chooses the same mask.
    """
    buffers = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    by_id = {id(p): buffers[name] for name, p in params.items()}

    def fold(param: torch.Tensor) -> None:
        grad = param.grad.float()
        if squared:
            by_id[id(param)].addcmul_(grad, grad)
        else:
            by_id[id(param)].add_(grad)
        param.grad = None

    everything = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in everything]
    was_training = model.training
    handles = []
    device = everything[0].device
    passes = 0
    try:
        for p in everything:
            p.grad = None
            p.requires_grad_(id(p) in by_id)
        handles = [p.register_post_accumulate_grad_hook(fold) for p in params.values()]
        model.eval()
        with torch.enable_grad(), gathering_paused(everything), dense_weight_gradients():
            for batch in batches:
                for piece in (_rows(batch) if per_sample else [batch]):
                    if "labels" in piece and bool((piece["labels"] == -100).all()):
                        continue  # no target token: Hugging Face's mean loss would be NaN
                    loss = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in piece.items()}).loss
                    if loss is None:
                        raise ValueError("calibration batches need 'labels' so the model returns a loss")
                    loss.backward()
                    passes += 1
        counted = torch.tensor([passes], dtype=torch.int64, device=device)
        all_reduce_sum_([counted, *buffers.values()])
        if int(counted) == 0:
            raise ValueError("no calibration batches with target tokens were given; the strategy needs at least one")
    finally:
        for handle in handles:
            handle.remove()
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(was_training)
    return buffers


def _rows(batch: Batch) -> Iterable[dict[str, Any]]:
    """Split a batch into single-sequence batches (tensors whose first dimension is the batch)."""
    size = int(batch["input_ids"].shape[0])
    for i in range(size):
        yield {k: v[i: i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v
               for k, v in batch.items()}
