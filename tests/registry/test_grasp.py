"""`grasp` keeps the entries of lowest GraSP score S = -w * (H g): the paper's kept set, vital to gradient flow."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mthlib.registry.grasp import GraSP
from tests.conftest import make_tiny_chat_lm, make_tiny_lm
from tests.registry.conftest import Lookup, calibration, lookup_batch

# loss(w) = 1/2 w.A w + b.w per batch, w flattened: g = A w + b and H = A per batch.
A = torch.tensor([[3.0, 2, -1, 2], [2, 2, -1, 1], [-1, -1, -2, 1], [2, 1, 1, 0]])
B = torch.tensor([1.0, 1, -2, 1])
W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])


class Quadratic(nn.Module):
    """A one-matrix "LM" whose loss on every batch is the quadratic above (the batch is ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(W.clone())
        self.register_buffer("a", A.clone())
        self.register_buffer("b", B.clone())

    def forward(self, input_ids, attention_mask=None, labels=None):
        w = self.weight.reshape(-1)
        return SimpleNamespace(loss=0.5 * w @ self.a @ w + self.b @ w)


def quadratic_batches() -> list[dict]:
    """Two batches with a target, and one whose labels are all -100 (skipped by both passes)."""
    batch = lookup_batch([(0, 1)])
    return [batch, batch, {**batch, "labels": torch.full_like(batch["labels"], -100)}]


def test_scores_are_minus_weight_times_hessian_gradient_in_closed_form():
    # Per batch g = A w + b = [-2, -3.5, -6.5, 4] and H g = A g = [1.5, -0.5, 22.5, -14]; two batches sum
    # to g = 2 (A w + b) and H = 2 A, so H g = 4 A (A w + b) and S = -w * H g = 4 * [-1.5, -1, -67.5, 7].
    scores = GraSP().scores(Quadratic(), quadratic_batches())
    assert scores["weight"].tolist() == [[-6.0, -4.0], [-270.0, 28.0]]


def test_keeps_the_lowest_scores_not_the_paper_pruned_set():
    model = Quadratic()
    # keep = top k of w * H g = [6, 4, 270, -28]: entry 2, then entry 0.
    assert GraSP(sparsity=0.75).compute(model, quadratic_batches())["weight"].tolist() == [2]
    assert GraSP(sparsity=0.5).compute(model, quadratic_batches())["weight"].tolist() == [0, 2]
    # Not what the other signs or criteria would keep: the highest S (the set the paper prunes) is [1, 3],
    # the highest |S| is [2, 3], |g * w| (SNIP) and |w| are [1, 2].
    assert torch.equal(model.weight.detach(), W)


def _reference_hessian_gradient(model, batches, params):
    """H g by a central finite difference in float64, independent of the double-backward implementation."""
    names = list(params)

    def gradient(shift: dict | None, step: float) -> dict:
        with torch.no_grad():
            for name in names if shift else []:
                params[name].add_(shift[name], alpha=step)
        total = {name: torch.zeros_like(p) for name, p in params.items()}
        for batch in batches:
            for name, g in zip(names, torch.autograd.grad(model(**batch).loss, [params[n] for n in names])):
                total[name] += g
        with torch.no_grad():
            for name in names if shift else []:
                params[name].sub_(shift[name], alpha=step)
        return total

    g = gradient(None, 0.0)
    eps = 1e-4  # Llama's RMSNorm rounds to fp32 even in a float64 model: a smaller step loses to rounding
    plus, minus = gradient(g, eps), gradient(g, -eps)
    return {name: (plus[name] - minus[name]) / (2 * eps) for name in names}


def test_matches_a_finite_difference_reference_on_a_tiny_lm():
    batches = calibration(seed=3)
    strategy = GraSP(sparsity=0.9)
    scores = strategy.scores(make_tiny_lm(seed=0), batches)
    reference_model = make_tiny_lm(seed=0).double()
    params = strategy.eligible(reference_model)
    products = _reference_hessian_gradient(reference_model, batches, params)
    for name, p in params.items():
        expected = -(p.detach() * products[name]).float()
        torch.testing.assert_close(scores[name], expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max()))


def test_sdpa_and_eager_attention_give_the_same_scores():
    # sdpa's fused CPU kernel has no double backward; the strategy runs it on the math backend instead.
    sdpa = make_tiny_lm(seed=1)
    eager = make_tiny_lm(seed=1)
    eager.set_attn_implementation("eager")
    assert sdpa.config._attn_implementation == "sdpa"
    first, second = GraSP().scores(sdpa, calibration()), GraSP().scores(eager, calibration())
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-5 * float(first[name].abs().max()))


def test_model_is_untouched_and_exact_count_on_a_chat_lm():
    model, _ = make_tiny_chat_lm(seed=2)
    model.train()
    frozen = model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # eligible, yet frozen by the caller
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    strategy = GraSP(sparsity=0.95, num_samples=4)
    masks = strategy.compute(model, calibration(seed=5, vocab=90))
    assert masks.total == strategy.keep_count(sum(p.numel() for p in strategy.eligible(model).values()))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), name
        assert p.grad is None
    assert model.training and not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)
    scores = strategy.scores(model.eval(), calibration(seed=5, vocab=90))
    assert not model.training  # the mode found is the mode left, in eval as in train
    assert all(bool(torch.isfinite(s).all()) for s in scores.values())
    assert any(bool((s != 0).any()) for s in scores.values())


def _flash_cpu_attention(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0]


class FusedAttention(nn.Module):
    """A model whose loss goes through a fused attention kernel that has no second derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None, labels=None):
        q = self.weight.view(1, 1, 4, 8)
        return SimpleNamespace(loss=_flash_cpu_attention(q).pow(2).sum())


def test_bad_inputs_give_one_line_errors():
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        GraSP(num_samples=0)
    with pytest.raises(ValueError, match="needs calibration batches"):
        GraSP().compute(make_tiny_lm(), None)
    with pytest.raises(ValueError, match="Hessian is zero"):  # a linear loss: no gradient flow to preserve
        GraSP().compute(Lookup(torch.ones(2, 2)), [lookup_batch([(0, 1), (3, 2)])])
    with pytest.raises(ValueError, match="attn_implementation='eager'") as err:
        GraSP().compute(FusedAttention(), quadratic_batches())
    assert "\n" not in str(err.value)


def test_defaults():
    strategy = GraSP()
    assert strategy.num_samples == 128 and GraSP.needs_calibration and not GraSP.dynamic
    assert strategy.config()["init_args"]["num_samples"] == 128
