"""Tests of the MaskStrategy base class: eligibility, exact counts, top-k with ties, gradient passes, config."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from jsonargparse import ArgumentParser
from torch import nn

from mthlib.masking import Masks, MaskStrategy, parameter_kinds
from mthlib.masking.selection import kth_largest, select_top


class ScoreByWeight(MaskStrategy):
    """Test strategy: keep the largest |w| (a user-defined strategy, not registered)."""

    def compute(self, model, batches):
        return self.top_k({n: p.detach().abs() for n, p in self.eligible(model).items()})


class Forgetful(MaskStrategy):
    """Takes an init argument it does not store."""

    def __init__(self, sparsity: float = 0.99, extra: int = 3) -> None:
        super().__init__(sparsity)

    def compute(self, model, batches):
        raise AssertionError("not called")


class ShortForm(MaskStrategy):
    """Own argument plus the shared options, passed on with ``**options``."""

    def __init__(self, power: float = 1.0, **options) -> None:
        super().__init__(**options)
        self.power = power

    def compute(self, model, batches):
        raise AssertionError("not called")


class OwnDefault(ShortForm):
    """A second level: a different sparsity default, a fixed allocation, the rest forwarded twice."""

    def __init__(self, sparsity: float = 0.5, **options) -> None:
        super().__init__(sparsity=sparsity, allocation="per_tensor", **options)


class Swallows(MaskStrategy):
    """Takes ``**options`` but never passes them on."""

    def __init__(self, **options) -> None:
        super().__init__()

    def compute(self, model, batches):
        raise AssertionError("not called")


class Varargs(MaskStrategy):
    """Takes ``*args``."""

    def __init__(self, *args) -> None:
        super().__init__()

    def compute(self, model, batches):
        raise AssertionError("not called")


class BiasNet(nn.Module):
    """Linear layers with biases plus a LayerNorm and a free 1-D parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.proj = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.ones(3))


def _names(strategy: MaskStrategy, model: nn.Module) -> list[str]:
    return list(strategy.eligible(model))


def test_sparsity_must_be_a_fraction_in_range():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\) \(fraction of entries that stay frozen\)"):
            ScoreByWeight(sparsity=bad)
    with pytest.raises(ValueError, match="allocation"):
        ScoreByWeight(allocation="per_layer")


def test_parameter_kinds():
    kinds = parameter_kinds(BiasNet())
    assert kinds == {"embed.weight": "embedding", "proj.weight": "matrix", "proj.bias": "bias",
                     "ln.weight": "norm", "ln.bias": "norm", "scale": "other"}


def test_default_eligibility_is_matrices_and_embeddings_tied_once(tiny_lm, tiny_lm_untied):
    names = _names(ScoreByWeight(), tiny_lm)
    assert names[0] == "model.embed_tokens.weight"
    assert "lm_head.weight" not in names  # tied to the embeddings: counted once
    assert not any("norm" in n for n in names)
    assert len(names) == 1 + 2 * 7
    untied = _names(ScoreByWeight(), tiny_lm_untied)
    assert untied[-1] == "lm_head.weight" and len(untied) == len(names) + 1
    no_embed = _names(ScoreByWeight(include_embeddings=False), tiny_lm_untied)
    assert "model.embed_tokens.weight" not in no_embed and "lm_head.weight" not in no_embed
    numel = sum(p.numel() for p in ScoreByWeight().eligible(tiny_lm).values())
    assert numel == sum(p.numel() for p in tiny_lm.parameters() if p.dim() >= 2)


def test_kind_flags():
    model = BiasNet()
    assert _names(ScoreByWeight(), model) == ["embed.weight", "proj.weight"]
    assert _names(ScoreByWeight(include_biases=True), model) == ["embed.weight", "proj.weight", "proj.bias"]
    assert _names(ScoreByWeight(include_norms=True), model) == ["embed.weight", "proj.weight", "ln.weight", "ln.bias"]


def test_include_narrows_and_exclude_removes(tiny_lm):
    strategy = ScoreByWeight(include=["model.layers.0.*"], exclude=["*.mlp.*"])
    assert _names(strategy, tiny_lm) == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"]
    # the kind flags still apply inside include: norms need include_norms
    norms = _names(ScoreByWeight(include=["*norm*"], include_norms=True), tiny_lm)
    assert norms[-1] == "model.norm.weight" and len(norms) == 5
    # an exclude pattern matching nothing is a mistake (a typo would silently train what it meant to freeze)
    with pytest.raises(ValueError, match=r"exclude pattern 'nothing\.\*' matches no parameter; names look like"):
        ScoreByWeight(exclude=["nothing.*"]).eligible(tiny_lm)


def test_include_matching_nothing_names_parameters(tiny_lm):
    with pytest.raises(ValueError, match=r"'attn\.\*' matches no parameter; names look like: model\.embed_tokens"):
        ScoreByWeight(include=["attn.*"]).eligible(tiny_lm)
    with pytest.raises(ValueError, match="set include_norms=True"):
        ScoreByWeight(include=["*norm*"]).eligible(tiny_lm)
    with pytest.raises(ValueError, match="no parameter is eligible"):
        ScoreByWeight(exclude=["*"]).eligible(tiny_lm)


@pytest.mark.parametrize(
    ("sparsity", "n", "k"),
    [(0.99, 1000, 10), (0.99, 12345, 123), (0.999, 1_000_000, 1000), (0.9, 10, 1), (0.0, 7, 7), (0.5, 3, 1)],
)
def test_keep_count_is_exact(sparsity, n, k):
    # 0.9 is the case the rounding is for: int(10 * (1 - 0.9)) would be 0.
    assert ScoreByWeight(sparsity=sparsity).keep_count(n) == k


def _tie_scores() -> dict[str, torch.Tensor]:
    return {"a": torch.tensor([[3.0, 1.0], [2.0, 2.0]]), "b": torch.tensor([2.0, 5.0, 0.0, 2.0, 1.0, 0.0])}


def test_top_k_global_breaks_ties_by_parameter_then_index():
    masks = ScoreByWeight(sparsity=0.7).top_k(_tie_scores())  # k = 3 of 10: 5, 3, then the first 2
    assert masks["a"].tolist() == [0, 2] and masks["b"].tolist() == [1]
    masks = ScoreByWeight(sparsity=0.4).top_k(_tie_scores())  # k = 6: all four 2s
    assert masks["a"].tolist() == [0, 2, 3] and masks["b"].tolist() == [0, 1, 3]
    assert masks.names == ("a", "b") and masks.shape("a") == (2, 2)


def test_top_k_per_tensor():
    masks = ScoreByWeight(sparsity=0.6, allocation="per_tensor").top_k(_tie_scores())
    assert masks["a"].tolist() == [0]          # keep_count(4) = 1
    assert masks["b"].tolist() == [0, 1]       # keep_count(6) = 2: 5, then the first 2
    masks = ScoreByWeight(sparsity=0.0, allocation="per_tensor").top_k(_tie_scores())
    assert masks.total == 10


def test_top_k_is_exact_against_a_sort():
    gen = torch.Generator().manual_seed(3)
    scores = {"x": torch.randint(0, 50, (40, 30), generator=gen).float(), "y": torch.randint(0, 50, (700,), generator=gen).float()}
    masks = ScoreByWeight(sparsity=0.9).top_k(scores)
    flat = torch.cat([scores["x"].view(-1), scores["y"].view(-1)])
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[: masks.total]
    assert masks.total == int(1900 * 0.1)
    assert torch.cat([masks["x"], masks["y"] + 1200]).tolist() == sorted(order)


def test_top_k_rejects_nan():
    with pytest.raises(ValueError, match="scores of a contain NaN"):
        ScoreByWeight().top_k({"a": torch.tensor([1.0, float("nan")])})


def test_exclude_mask_entries_are_never_chosen(tmp_path):
    path = tmp_path / "task1.safetensors"
    Masks({"b": torch.tensor([1])}, {"a": (2, 2), "b": (6,)}).save(path)
    masks = ScoreByWeight(sparsity=0.7, exclude_mask=str(path)).top_k(_tie_scores())
    assert masks["a"].tolist() == [0, 2, 3] and masks["b"].tolist() == []
    full = ScoreByWeight(sparsity=0.0, exclude_mask=str(path))
    with pytest.raises(ValueError, match="only 9 of 10 are not in exclude_mask"):
        full.top_k(_tie_scores())
    Masks({"b": torch.tensor([1])}, {"b": (7,)}).save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="shape"):
        ScoreByWeight(exclude_mask=str(tmp_path / "bad.safetensors")).top_k(_tie_scores())


class Bilinear(nn.Module):
    """loss = sum_b labels_b . (W x_b): dloss/dW = labels^T x, known in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
        self.gain = nn.Parameter(torch.tensor([2.0, 2.0]))  # 1-D "other": never eligible

    def forward(self, input_ids, attention_mask, labels):
        hidden = input_ids.float() @ self.weight.T * self.gain
        return SimpleNamespace(loss=(hidden * labels.float()).sum())


def _bilinear_batches():
    x1, y1 = torch.tensor([[1, 2], [3, 0]]), torch.tensor([[1, 1], [0, 1]])
    x2, y2 = torch.tensor([[0, 1]]), torch.tensor([[2, 1]])
    return [dict(input_ids=x, attention_mask=torch.ones_like(x), labels=y) for x, y in ((x1, y1), (x2, y2))]


def test_accumulate_matches_the_analytic_gradient():
    model = Bilinear().train()
    model.gain.requires_grad_(True)
    batches = _bilinear_batches()
    scores = ScoreByWeight().accumulate(model, iter(batches), lambda w, g: g * w)
    grad = sum(2.0 * b["labels"].float().T @ b["input_ids"].float() for b in batches)
    assert list(scores) == ["weight"]
    assert torch.allclose(scores["weight"], grad * model.weight.detach())
    assert model.training and model.gain.requires_grad and model.weight.requires_grad
    assert model.weight.grad is None and model.gain.grad is None


def test_squared_grads_batch_and_per_sample():
    model = Bilinear()
    batches = _bilinear_batches()
    per_batch = [2.0 * b["labels"].float().T @ b["input_ids"].float() for b in batches]
    got = ScoreByWeight().squared_grads(model, batches)
    assert torch.allclose(got["weight"], sum(g**2 for g in per_batch))
    rows = [(x, y) for b in batches for x, y in zip(b["input_ids"].float(), b["labels"].float())]
    fisher = sum((2.0 * torch.outer(y, x)) ** 2 for x, y in rows)
    got = ScoreByWeight().squared_grads(model, batches, per_sample=True)
    assert torch.allclose(got["weight"], fisher)
    assert not torch.allclose(fisher, sum(g**2 for g in per_batch))


def test_accumulate_on_a_causal_lm_sums_batch_gradients(tiny_lm_untied):
    model = tiny_lm_untied
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 64, (2, 6), generator=gen)
        labels = ids.clone()
        labels[:, :2] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    strategy = ScoreByWeight(include=["model.layers.1.*", "lm_head.weight"])
    scores = strategy.accumulate(model, batches, lambda w, g: g)
    model.zero_grad()
    for batch in batches:
        model(**batch).loss.backward()
    for name, param in strategy.eligible(model).items():
        assert torch.allclose(scores[name], param.grad, atol=1e-6), name
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="no calibration batches"):
        strategy.accumulate(model, [], lambda w, g: g)
    with pytest.raises(ValueError, match="labels"):
        strategy.accumulate(model, [{"input_ids": batches[0]["input_ids"]}], lambda w, g: g)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_config_reads_back_every_init_argument():
    strategy = ScoreByWeight(sparsity=0.9, include=["a.*"], seed=7)
    config = strategy.config()
    assert config["class_path"] == f"{__name__}.ScoreByWeight"
    assert config["init_args"] == {
        "sparsity": 0.9, "allocation": "global", "include": ["a.*"], "exclude": None, "include_norms": False,
        "include_biases": False, "include_embeddings": True, "seed": 7, "exclude_mask": None,
    }
    assert json.loads(json.dumps(config)) == config
    assert repr(strategy).startswith("ScoreByWeight(sparsity=0.9, allocation='global'")
    with pytest.raises(TypeError, match="takes 'extra' but does not store it; set self.extra = extra"):
        Forgetful().config()


SHARED_OPTIONS = ["sparsity", "allocation", "include", "exclude", "include_norms", "include_biases",
                  "include_embeddings", "seed", "exclude_mask"]


def test_config_follows_options_to_the_shared_arguments():
    short = ShortForm(power=2.0, seed=3, include=["a.*"])
    assert list(short.config()["init_args"]) == ["power", *SHARED_OPTIONS]
    assert short.config()["init_args"] == {"power": 2.0, "sparsity": 0.99, "allocation": "global",
                                            "include": ["a.*"], "exclude": None, "include_norms": False,
                                            "include_biases": False, "include_embeddings": True, "seed": 3,
                                            "exclude_mask": None}
    assert repr(short).startswith("ShortForm(power=2.0, sparsity=0.99, allocation='global', include=['a.*']")
    # own default recorded once, in its own place; the fixed allocation is not an option
    nested = OwnDefault(power=3.0, seed=1)
    assert list(nested.config()["init_args"]) == ["sparsity", "power", *SHARED_OPTIONS[2:]]
    assert nested.sparsity == 0.5 and nested.allocation == "per_tensor" and nested.config()["init_args"]["seed"] == 1
    with pytest.raises(TypeError, match="multiple values for keyword argument 'allocation'"):
        OwnDefault(allocation="global")
    with pytest.raises(TypeError, match="unexpected keyword argument 'sead'"):
        ShortForm(sead=1)
    for cls in (ShortForm, OwnDefault):  # the same arguments, in the same order, as the command line shows
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "mask")
        assert list(vars(parser.get_defaults().mask)) == list(cls().config()["init_args"])


def test_config_refuses_swallowed_options_and_varargs():
    with pytest.raises(TypeError, match=r"Swallows.__init__ takes \*\*options but does not pass them on"):
        Swallows().config()
    with pytest.raises(TypeError, match=r"Varargs.__init__ takes \*args; use named arguments only"):
        Varargs().config()


def test_config_of_a_class_without_source_keeps_every_shared_option():
    namespace: dict = {"MaskStrategy": MaskStrategy}
    exec(  # noqa: S102  (a class whose source inspect cannot find, as in an interactive session)
        "class Typed(MaskStrategy):\n"
        "    def __init__(self, k: int = 1, **options):\n"
        "        super().__init__(allocation='per_tensor', **options)\n"
        "        self.k = k\n"
        "    def compute(self, model, batches):\n"
        "        return None\n",
        namespace,
    )
    assert list(namespace["Typed"]().config()["init_args"]) == ["k", *SHARED_OPTIONS]


def test_static_strategies_have_no_update(tiny_lm):
    strategy = ScoreByWeight()
    masks = strategy.compute(tiny_lm, None)
    with pytest.raises(NotImplementedError, match="not a dynamic strategy"):
        strategy.update(masks, tiny_lm, 1, None, {}, None)


def test_sequences_without_target_tokens_are_skipped(tiny_lm_untied):
    ids = torch.randint(3, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[1] = -100  # the second sequence has no target token: its mean loss would be NaN
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    strategy = ScoreByWeight(include=["lm_head.weight"])
    fisher = strategy.squared_grads(tiny_lm_untied, [batch], per_sample=True)["lm_head.weight"]
    first = strategy.squared_grads(tiny_lm_untied, [{k: v[:1] for k, v in batch.items()}])["lm_head.weight"]
    assert torch.isfinite(fisher).all() and torch.allclose(fisher, first)
    with pytest.raises(ValueError, match="target tokens"):
        strategy.squared_grads(tiny_lm_untied, [{k: v[1:] for k, v in batch.items()}])


def test_accumulate_during_sparse_training_leaves_the_optimizer_alone(tiny_lm_untied):
    from mthlib.masking import SparseAdamW, SparseState

    model = tiny_lm_untied
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model(**batch).loss.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    masks = Masks({"lm_head.weight": torch.tensor([0, 7])}, {"lm_head.weight": (64, 32)})
    state = SparseState.capture(model, masks).attach(model)
    optimizer = SparseAdamW(state)
    with state.calibrating():
        grads = ScoreByWeight(include=["lm_head.weight"]).accumulate(model, [batch], lambda w, g: g)
    assert torch.allclose(grads["lm_head.weight"], expected, atol=1e-6)
    assert not optimizer.sparse_grads
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    model(**batch).loss.backward()
    assert torch.allclose(optimizer.sparse_grads["lm_head.weight"], expected.view(-1)[[0, 7]], atol=1e-6)


@pytest.mark.parametrize("k", [1, 37, 1_000, 50_000, 99_999, 100_000])
def test_kth_largest_equals_kthvalue_with_ties_and_excluded_entries(k):
    values = torch.randn(100_000, generator=torch.Generator().manual_seed(k))
    values[::7] = 0.25  # many ties
    values[:500] = -math.inf  # excluded entries
    assert torch.equal(kth_largest(values, k, sample_size=1_000), torch.kthvalue(values, values.numel() - k + 1).values)


@pytest.mark.parametrize("k", [1, 300, 999, 1_000, 1_001, 50_000])
def test_kth_largest_ranks_only_finite_entries_when_most_are_minus_inf(k, monkeypatch):
    values = torch.full((200_000,), -math.inf)
    finite = torch.randperm(values.numel(), generator=torch.Generator().manual_seed(1))[:1_000]
    values[finite] = torch.randn(1_000, generator=torch.Generator().manual_seed(2))
    expected = torch.kthvalue(values, values.numel() - k + 1).values
    ranked = []
    kthvalue = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda v, *a, **kw: ranked.append(v.numel()) or kthvalue(v, *a, **kw))
    assert torch.equal(kth_largest(values, k, sample_size=100), expected)
    assert all(size <= 1_000 for size in ranked)  # never the 199,000 entries at -inf


def test_select_top_over_mostly_minus_inf_scores_keeps_the_finite_best():
    scores = {"a": torch.full((300, 400), -math.inf), "b": torch.full((500,), -math.inf)}
    scores["a"].view(-1)[torch.arange(0, 120_000, 97)] = torch.arange(1_238, dtype=torch.float32)
    scores["b"][[3, 4]] = torch.tensor([5_000.0, 0.5])
    chosen = select_top(scores, 10, excluded={})
    assert chosen["b"].tolist() == [3]
    assert chosen["a"].tolist() == [97 * i for i in range(1_229, 1_238)]
