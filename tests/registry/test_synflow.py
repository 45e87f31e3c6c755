"""`synflow` keeps the entries carrying the most synaptic flow |w| * dR/d|w|, pruned over data-free rounds."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mthlib.masking import Masks
from mthlib.registry.synflow import SynFlow, _kill_lowest, _kth_smallest
from tests.conftest import make_tiny_chat_lm, make_tiny_lm
from tests.registry.conftest import Lookup


class TwoLayer(nn.Module):
    """Embedding ``E`` (V x d), then a bias-free linear head ``W`` (o x d); no nonlinearity.

    With all-ones input over the vocabulary, ``R = sum_j a_j b_j`` where ``a_j = sum_v |E[v, j]|``
    and ``b_j = sum_o |W[o, j]|``, so the scores are ``|E[v, j]| b_j`` and ``|W[o, j]| a_j``.
    """

    def __init__(self, embed: torch.Tensor, head: torch.Tensor) -> None:
        super().__init__()
        self.embed = nn.Embedding(*embed.shape, dtype=embed.dtype)
        self.head = nn.Linear(head.shape[1], head.shape[0], bias=False, dtype=head.dtype)
        with torch.no_grad():
            self.embed.weight.copy_(embed)
            self.head.weight.copy_(head)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(self, inputs_embeds):
        return SimpleNamespace(logits=self.head(inputs_embeds))


def test_single_shot_scores_are_path_sums_in_closed_form():
    model = TwoLayer(torch.tensor([[1.0, -2.0], [3.0, 0.0], [-1.0, 4.0]]), torch.tensor([[2.0, -1.0], [-3.0, 2.0]]))
    # a = [5, 6], b = [5, 3]; R = 5 * 5 + 6 * 3 = 43.
    scores = SynFlow().scores(model)
    assert scores["embed.weight"].tolist() == [[5.0, 6.0], [15.0, 0.0], [5.0, 12.0]]
    assert scores["head.weight"].tolist() == [[10.0, 6.0], [15.0, 12.0]]
    assert scores["embed.weight"].dtype == torch.float64
    # synaptic flow is conserved: each layer's scores sum to R
    assert float(scores["embed.weight"].sum()) == float(scores["head.weight"].sum()) == 43.0
    # single round: the top 3 scores 15, 15, 12; the 12-12 tie goes to the earlier parameter
    masks = SynFlow(sparsity=0.7, rounds=1).compute(model, None)
    assert masks["embed.weight"].tolist() == [2, 5] and masks["head.weight"].tolist() == [2]


def test_iterating_avoids_the_layer_collapse_of_single_shot_scores():
    # E: 4 x 2 ones (a = [4, 4]), W: 1 x 2 ones (b = [1, 1]). Scores: every E entry 1, every W entry 4.
    model = TwoLayer(torch.ones(4, 2), torch.ones(1, 2))
    # Keep 2 of 10. Single shot keeps both W entries and empties E: no path from input to output is left.
    once = SynFlow(sparsity=0.8, rounds=1).compute(model, None)
    assert once["embed.weight"].tolist() == [] and once["head.weight"].tolist() == [0, 1]
    # Ten rounds keep int(10 * 0.2 ** (r / 10)) = 8, 7, 6, 5, 4, 3, 3, 2, 2 entries. Pruning E raises the score of
    # W (a_j drops) until W[0, 1] ties the E entries and goes (round 5, ties drop the later entry); E[0, 1]
    # then carries no flow (b_1 = 0) and goes, and E[1, 0] loses a tie to E[0, 0]: one whole path survives.
    iterated = SynFlow(sparsity=0.8, rounds=10).compute(model, None)
    assert iterated["embed.weight"].tolist() == [0] and iterated["head.weight"].tolist() == [0]


def test_model_untouched_exact_count_and_flow_invariants_on_a_tiny_lm():
    model = make_tiny_lm(seed=0, hidden=64, layers=4)  # deep enough that sdpa's fused kernel would leave noise in q, k
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    strategy = SynFlow(sparsity=0.9, rounds=4)
    masks = strategy.compute(model, None)
    assert masks.total == strategy.keep_count(sum(p.numel() for p in strategy.eligible(model).values()))
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad is None
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), name
    scores = strategy.scores(model)
    for name, score in scores.items():
        assert bool(torch.isfinite(score).all()) and bool((score >= 0).all()), name  # frozen norms keep flow positive
    for layer in range(4):
        prefix = f"model.layers.{layer}."
        # one position: attention weights are constant, so no flow passes through q and k ...
        assert not scores[prefix + "self_attn.q_proj.weight"].any()
        assert not scores[prefix + "self_attn.k_proj.weight"].any()
        # ... and v -> o, up -> down are linear links of one chain, which conserve flow
        flow = {name[len(prefix):]: float(score.sum()) for name, score in scores.items() if name.startswith(prefix)}
        assert flow["self_attn.v_proj.weight"] == pytest.approx(flow["self_attn.o_proj.weight"], rel=1e-12)
        assert flow["mlp.up_proj.weight"] == pytest.approx(flow["mlp.down_proj.weight"], rel=1e-12)


def test_per_tensor_counts_seed_has_no_effect_and_a_chat_lm_runs():
    model, _ = make_tiny_chat_lm(seed=1)
    strategy = SynFlow(sparsity=0.95, allocation="per_tensor", rounds=3, seed=1)
    masks = strategy.compute(model, None)
    for name, p in strategy.eligible(model).items():
        assert masks.count(name) == strategy.keep_count(p.numel()), name
    assert SynFlow(sparsity=0.95, allocation="per_tensor", rounds=3, seed=7).compute(model, None) == masks
    assert all(bool(torch.isfinite(s).all()) for s in strategy.scores(model).values())


def test_exclude_mask_entries_are_never_chosen_but_keep_carrying_flow(tmp_path):
    path = tmp_path / "task1.safetensors"
    Masks({"head.weight": torch.tensor([0])}, {"head.weight": (1, 2)}).save(path)
    model = TwoLayer(torch.ones(4, 2), torch.ones(1, 2))
    masks = SynFlow(sparsity=0.8, rounds=10, exclude_mask=str(path)).compute(model, None)
    # W[0, 0] is neither pruned nor counted: the 9 other entries thin to 8, 7, 6, 5, 4, 3, 3, 2, 2. E's column 1
    # goes first (ties drop the later entry), then W[0, 1] ties E and goes, then E[0, 1] (no flow left): the
    # two kept entries are E[0, 0] and E[1, 0], both feeding the excluded W[0, 0].
    assert masks["embed.weight"].tolist() == [0, 2] and masks["head.weight"].tolist() == []


def test_pruning_ranks_exactly_whether_or_not_it_samples_a_bracket():
    generator = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, 50, (size,), generator=generator).double() for size in (300, 1, 700)]
    parts[0][::3] = torch.inf  # dead entries are never counted
    flat = torch.cat(parts).tolist()
    finite = sorted(v for v in flat if v != float("inf"))
    for k in (1, 200, 400, len(finite)):
        for sample_size in (1, 16, 1 << 20):  # 1 and 16: a sampled bracket (1,001 > 4 * sample_size entries)
            assert float(_kth_smallest(parts, k, sample_size=sample_size)) == finite[k - 1]
    # a bracket sampled too low is widened: the one entry sampled from this ramp (263) is below the 400th smallest
    ramp = torch.arange(1001.0)
    assert float(_kth_smallest([ramp[:300], ramp[300:301], ramp[301:]], 400, sample_size=1)) == 399.0
    # the 200 smallest finite entries die; among equal values the higher position goes first
    alive = [torch.ones(p.numel(), dtype=torch.bool) for p in parts]
    _kill_lowest(parts, alive, 200)
    order = sorted((v, -i) for i, v in enumerate(flat) if v != float("inf"))
    assert torch.nonzero(~torch.cat(alive)).view(-1).tolist() == sorted(-i for _, i in order[:200])


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"rounds must be >= 1"):
        SynFlow(rounds=0)
    path = tmp_path / "most.safetensors"  # 9 of the 10 entries: 1 left where 2 are wanted
    Masks({"embed.weight": torch.arange(8), "head.weight": torch.tensor([0])},
          {"embed.weight": (4, 2), "head.weight": (1, 2)}).save(path)
    strategy = SynFlow(sparsity=0.8, rounds=3, exclude_mask=str(path))
    with pytest.raises(ValueError, match="cannot keep 2 entries: only 1 of 10"):
        strategy.compute(TwoLayer(torch.ones(4, 2), torch.ones(1, 2)), None)
    with pytest.raises(ValueError, match="get_input_embeddings"):
        SynFlow().compute(Lookup(torch.ones(2, 2)), None)
    huge = TwoLayer(torch.full((2, 2), 1e200, dtype=torch.float64), torch.full((2, 2), 1e200, dtype=torch.float64))
    with pytest.raises(ValueError, match="overflow float64") as err:
        SynFlow().compute(huge, None)
    assert "\n" not in str(err.value)


def test_defaults():
    strategy = SynFlow()
    assert strategy.rounds == 20 and not SynFlow.needs_calibration and not SynFlow.dynamic
    assert strategy.config()["init_args"]["rounds"] == 20
