"""The :class:`MaskStrategy` base class: eligibility, exact counts, tie-breaking, gradient passes.

A strategy subclasses :class:`MaskStrategy`, registers itself with
:func:`~mthlib.masking.register_mask` and implements :meth:`MaskStrategy.compute`;
usually that is one line combining :meth:`~MaskStrategy.accumulate` (or
:meth:`~MaskStrategy.squared_grads`) with :meth:`~MaskStrategy.top_k`. Everything that
must be the same for every strategy (which parameters may be trained, how many entries
are kept, how ties break, how tied weights count) lives here.

Contract for subclasses: ``__init__`` declares only the strategy's own arguments (named,
typed, defaulted, each stored as an attribute of the same name; no ``*args``) and
``**options``, passed on unchanged with ``super().__init__(**options)``. The options every
strategy shares (``sparsity``, ``allocation``, ``include``, ``exclude``, ``include_norms``,
``include_biases``, ``include_embeddings``, ``seed``, ``exclude_mask``) are declared once,
in :class:`MaskStrategy`'s signature, and documented once, in its ``Args:``. jsonargparse
follows ``**options`` to that signature, so YAML (flat: ``init_args: {sparsity: 0.99,
seed: 1}``), the command line and ``--help`` show them for every strategy, and a
misspelled option is still an error. A strategy whose default differs declares that one
option and passes it on (``sparsity: float = 0.0``, then
``super().__init__(sparsity=sparsity, **options)``); a strategy that fixes an option
passes a constant (``super().__init__(allocation="per_tensor", **options)``), which takes
it out of the options. :meth:`MaskStrategy.config` records exactly the arguments
jsonargparse shows, read back from the attributes. ``registry/magnitude.py`` is a
complete example.
"""

from __future__ import annotations

import abc
import ast
import inspect
import textwrap
from collections.abc import Callable, Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mthlib.masking.calibration import Batch, gradient_sums
from mthlib.masking.kinds import parameter_kinds
from mthlib.masking.masks import Masks
from mthlib.masking.selection import select_top

Allocation = Literal["global", "per_tensor"]
"""``global``: one top-k over every eligible entry; ``per_tensor``: the same density in every tensor."""


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``score_fn(weight, grad) -> score`` of one parameter, all three of the parameter's shape."""


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

    The arguments below are the options every strategy shares: a subclass takes them as
    ``**options`` and passes them on (see the module docstring), so they are documented
    here only. :meth:`top_k` drops ``exclude_mask`` entries before ranking; a strategy
    that does not use :meth:`top_k` reads them with :meth:`exclusion`.

    Args:
        sparsity: Fraction of eligible entries that stay frozen (0.99 trains 1%).
        allocation: ``global`` top-k over the model, or ``per_tensor`` with the same density in every tensor.
        include: Name patterns of parameters that may be trained (``None``: all of the default kinds).
        exclude: Name patterns removed after ``include``; a pattern must match some parameter (a typo is an error).
        include_norms: Let layer-norm weights (and norm biases) be trained.
        include_biases: Let biases be trained.
        include_embeddings: Let the input embeddings and the LM head be trained.
        seed: Seed of every random choice the strategy makes (sampling, calibration order).
        exclude_mask: Path of a :class:`~mthlib.masking.Masks` file (or sparse delta) whose
            active entries are never selected (sequential multi-task training: task 1's
            entries stay frozen for task 2).

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

    def use_calibration(self, num_samples: int, needed: bool = True) -> None:
        """Declare the calibration this strategy's :meth:`compute` wants: ``num_samples`` sequences.

        The one check every calibrating strategy shares (``num_samples >= 1``, one line
        otherwise). ``needed=False`` keeps the option but asks for no batches (a strategy
        whose chosen score needs no data, such as ``nm`` with ``score: magnitude``).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (calibration sequences); got {num_samples}")
        self.num_samples = num_samples
        self.needs_calibration = needed

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
            ValueError: An ``include`` or ``exclude`` pattern matches no parameter (the message
                shows what names look like), or nothing is eligible.
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
            for pattern in self.exclude:
                if not any(fnmatchcase(n, pattern) for n in params):
                    raise ValueError(_no_match("exclude", pattern, params))
            selected = {n: p for n, p in selected.items() if not any(fnmatchcase(n, pat) for pat in self.exclude)}
        if not selected:
            raise ValueError(f"no parameter is eligible for {type(self).__name__}: check include/exclude and the include_* flags")
        return selected

    @staticmethod
    def _check_include(pattern: str, params: Mapping[str, nn.Parameter], selected: Mapping[str, nn.Parameter],
                       kinds: Mapping[str, str]) -> None:
        matches = [n for n in params if fnmatchcase(n, pattern)]
        if not matches:
            raise ValueError(_no_match("include", pattern, params))
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
        excluded = self.excluded_indices(shapes)
        if self.allocation == "global":
            k = self.keep_count(sum(s.numel() for s in scores.values()))
            chosen = select_top(scores, k, excluded)
        else:
            chosen = {}
            for name, score in scores.items():
                chosen.update(select_top({name: score}, self.keep_count(score.numel()), excluded))
        return Masks(chosen, shapes)

    def excluded_indices(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """The ``exclude_mask`` entries (sorted flat indices) of each parameter in ``shapes`` that has some.

        For strategies that select without :meth:`top_k` (which applies them itself).

        Raises:
            ValueError: The mask file's shape of a parameter differs from the model's.
        """
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
        on the same model neither sees nor loses these gradients when the pass runs inside
        :meth:`~mthlib.masking.SparseState.calibrating`. Under data-parallel
        training the sums cover every process's batches (each process passes its share).

        Returns:
            Name to ``score_fn(weight, summed_grad)`` for every eligible parameter.
        """
        params = self.eligible(model)
        grads = gradient_sums(model, params, batches, squared=False, per_sample=False)
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
        return gradient_sums(model, self.eligible(model), batches, squared=True, per_sample=per_sample)

    # -- configuration ----------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The full configuration: ``{"class_path", "name", "init_args"}``, JSON-serialisable.

        ``init_args`` holds every argument the class accepts, as YAML and the command line
        see them: the strategy's own ``__init__`` arguments, then the shared options it
        takes through ``**options`` (except those its ``super().__init__`` call fixes),
        each read back from the attribute of the same name (tuples become lists).

        Raises:
            TypeError: ``__init__`` takes ``*args``, takes ``**options`` without passing
                them to ``super().__init__``, or does not store an argument.
        """
        cls = type(self)
        origin = cls.__dict__.get("_alias_of") or cls
        init_args = {}
        for pname in self._argument_names():
            if not hasattr(self, pname):
                raise TypeError(
                    f"{origin.__name__}.__init__ takes {pname!r} but does not store it; set self.{pname} = {pname}"
                )
            value = getattr(self, pname)
            init_args[pname] = list(value) if isinstance(value, tuple) else value
        return {"class_path": f"{origin.__module__}.{origin.__qualname__}", "name": self.name, "init_args": init_args}

    @classmethod
    def _argument_names(cls) -> list[str]:
        """Own ``__init__`` arguments, then via ``**options`` the parents' not given explicitly (as jsonargparse)."""
        names: list[str] = []
        given_positionally, given_by_name = 0, set()
        for klass in [k for k in cls.__mro__ if "__init__" in vars(k)]:
            forwarded = None
            params = list(inspect.signature(klass.__init__).parameters.values())[1:]
            for index, param in enumerate(params):
                if param.kind is param.VAR_POSITIONAL:
                    raise TypeError(f"{klass.__name__}.__init__ takes *{param.name}; use named arguments only")
                if param.kind is param.VAR_KEYWORD:
                    forwarded = param.name
                elif index >= given_positionally and param.name not in given_by_name and param.name not in names:
                    names.append(param.name)
            if forwarded is None:
                break
            given_positionally, named = cls._super_init_arguments(klass, forwarded)
            given_by_name |= named
        return names

    @staticmethod
    def _super_init_arguments(klass: type, options: str) -> tuple[int, set[str]]:
        """The number of positional arguments and the named ones ``klass.__init__`` gives ``super().__init__``.

        Read from the source, as jsonargparse does; without source, none. Raises
        :class:`TypeError` when the source has no ``super().__init__(..., **options)`` call.
        """
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass.__init__)))
        except (OSError, TypeError, SyntaxError):
            return 0, set()
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                    and isinstance(node.func.value, ast.Call) and getattr(node.func.value.func, "id", None) == "super"
                    and any(kw.arg is None for kw in node.keywords)):
                return len(node.args), {kw.arg for kw in node.keywords if kw.arg is not None}
        raise TypeError(
            f"{klass.__name__}.__init__ takes **{options} but does not pass them on; call super().__init__(**{options})"
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config()["init_args"].items())
        return f"{type(self).__name__}({args})"


def _no_match(option: str, pattern: str, params: Mapping[str, nn.Parameter]) -> str:
    """The error line for an ``include``/``exclude`` pattern that matches no parameter name."""
    examples = ", ".join(list(params)[:4])
    return f"{option} pattern {pattern!r} matches no parameter; names look like: {examples} (patterns are fnmatch globs)"
