"""`nm` keeps exactly N of every M consecutive input weights, the top N by the chosen score: hand-computed cases."""

import pytest
import torch
from torch import nn

from mthlib.masking import Masks, calibration_batches, entry_scores
from mthlib.registry.nm import NM, check_nm, top_n_per_group
from tests.conftest import make_tiny_chat_lm
from tests.registry.conftest import Lookup, lookup_batch

W = torch.tensor([
    [0.1, -5.0, 3.0, 0.2, 1.0, 1.0, -1.0, 0.5],
    [9.0, 0.0, 0.0, 8.0, 0.3, -0.4, 0.2, 0.1],
])


class OneMatrix(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(weight.clone())


def test_two_of_four_by_magnitude_with_ties_to_the_lower_column():
    masks = NM().compute(OneMatrix(W), None)
    # row 0: |-5| (1), 3 (2); then |1|, |1|, |-1| tie at 4, 5, 6 -> 4, 5; row 1: 9 (8), 8 (11); -0.4 (13), 0.3 (12)
    assert masks["w"].tolist() == [1, 2, 4, 5, 8, 11, 12, 13]
    assert NM(n=1, m=8).compute(OneMatrix(W), None)["w"].tolist() == [1, 8]


def test_every_group_keeps_exactly_n_and_they_are_its_top_n():
    weight = torch.randn(6, 24, generator=torch.Generator().manual_seed(0))
    for n, m in [(1, 4), (2, 4), (4, 8), (3, 6)]:
        kept = NM(n=n, m=m).compute(OneMatrix(weight), None).to_dense("w").reshape(-1, m)
        scores = weight.abs().reshape(-1, m)
        assert bool((kept.sum(dim=1) == n).all())
        lowest_kept = torch.where(kept, scores, torch.inf).min(dim=1).values
        highest_dropped = torch.where(kept, -torch.inf, scores).max(dim=1).values
        assert bool((lowest_kept > highest_dropped).all()), (n, m)


def _lookup() -> tuple[Lookup, list[dict]]:
    """Weight ``[1, 10, 1, 1 | 5, 5, 1, 1]`` as a 1x8 matrix; gradient ``[3, 1, 0, 0 | 0, 2, -4, 1]``."""
    model = Lookup(torch.tensor([[1.0, 10.0, 1.0, 1.0, 5.0, 5.0, 1.0, 1.0]]))
    return model, [lookup_batch([(0, 3), (1, 1), (5, 2), (6, -4), (7, 1)])]


@pytest.mark.parametrize("score, expected", [
    ("magnitude", [1, 4]),  # |w|: 10; then 5, 5 tie -> the lower column
    ("fisher", [0, 6]),  # g**2: 9 > 1; 16 > 4
    ("snip", [1, 5]),  # |g w|: 10 > 3; 10 > 4
])
def test_one_of_four_by_each_score_in_closed_form(score, expected):
    model, batches = _lookup()
    strategy = NM(n=1, m=4, score=score, num_samples=1)
    assert strategy.needs_calibration == (score in ("fisher", "snip"))
    assert strategy.compute(model, batches if strategy.needs_calibration else None)["weight"].tolist() == expected


def test_the_calibration_path_asks_for_data_only_for_data_scores():
    """``calibration_batches`` reads ``needs_calibration`` from the instance: set by ``score``."""
    assert calibration_batches(NM(score="random"), None, None, batch_size=1) is None
    with pytest.raises(ValueError, match="needs calibration batches"):
        calibration_batches(NM(score="snip"), None, None, batch_size=1)
    with pytest.raises(ValueError, match="score 'fisher' needs calibration batches; got none"):
        NM(score="fisher").compute(OneMatrix(W), None)
    assert not NM.needs_calibration  # the class default is untouched


def test_seed_changes_the_random_choice_and_repeats_it():
    model = OneMatrix(torch.ones(8, 16))
    first = NM(score="random", seed=1).compute(model, None)
    assert first == NM(score="random", seed=1).compute(model, None)
    assert first != NM(score="random", seed=2).compute(model, None)
    check_nm(first, 2, 4)
    scores = entry_scores(NM(score="random", seed=1), model, None, "random")["w"]  # the same draw, ranked
    assert first["w"].tolist() == top_n_per_group(scores, 2, 4).tolist()


def test_exclude_mask_entries_are_never_kept(tmp_path):
    path = tmp_path / "task1.safetensors"
    Masks({"w": torch.tensor([1, 2, 9])}, {"w": (2, 8)}).save(path)
    masks = NM(exclude_mask=str(path)).compute(OneMatrix(W), None)
    # row 0 group 0 loses 1 and 2 -> 3 (0.2), 0 (0.1); row 1 group 0 loses 9 -> 8, 11 as before
    assert masks["w"].tolist() == [0, 3, 4, 5, 8, 11, 12, 13]
    Masks({"w": torch.tensor([4, 5, 6])}, {"w": (2, 8)}).save(path)
    with pytest.raises(ValueError, match="the group at flat index 4 has fewer than 2 entries outside exclude_mask"):
        NM(exclude_mask=str(path)).compute(OneMatrix(W), None)


def test_check_nm_raises_on_a_group_with_the_wrong_count():
    check_nm(Masks({"w": torch.tensor([0, 3, 5, 6])}, {"w": (1, 8)}), 2, 4)
    with pytest.raises(ValueError, match=r"w breaks 2:4: row 0, columns 0-3 keep 3 entries"):
        check_nm(Masks({"w": torch.tensor([0, 1, 3, 5, 6])}, {"w": (1, 8)}), 2, 4)
    with pytest.raises(ValueError, match=r"w breaks 2:4: row 1, columns 4-7 keep 1 entries"):
        check_nm(Masks({"w": torch.tensor([0, 1, 4, 5, 8, 9, 12])}, {"w": (2, 8)}), 2, 4)
    with pytest.raises(ValueError, match="not a matrix whose last dimension is a multiple of 4"):
        check_nm(Masks({"w": torch.tensor([0, 1])}, {"w": (1, 6)}), 2, 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"n": 4, "m": 4}, "n:m needs 1 <= n < m"),
    ({"n": 5, "m": 4}, "n:m needs 1 <= n < m"),
    ({"n": 0, "m": 4}, "n:m needs 1 <= n < m"),
    ({"score": "hessian"}, "score must be one of 'magnitude', 'random', 'fisher', 'snip'; got 'hessian'"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"sparsity": 0.5}, "2:4 masks fix sparsity at 1 - n/m = 0.5 in every group: do not pass sparsity"),
    ({"allocation": "global"}, "do not pass allocation"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        NM(**kwargs)
    assert "\n" not in str(err.value)


def test_shapes_the_pattern_cannot_cover_are_one_line_errors():
    with pytest.raises(ValueError, match=r"input dimension \(the last\) is a multiple of 3; w has shape \(2, 8\)") as err:
        NM(n=1, m=3).compute(OneMatrix(W), None)
    assert "\n" not in str(err.value)
    model = make_tiny_chat_lm()[0]
    with pytest.raises(ValueError, match="model.layers.0.input_layernorm.weight has shape"):
        NM(include_norms=True).compute(model, None)


def test_sparsity_is_fixed_by_n_and_m_and_not_an_option():
    assert NM().sparsity == 0.5 and NM(n=1, m=8).sparsity == 0.875
    config = NM(n=1, m=3).config()["init_args"]
    assert "sparsity" not in config and "allocation" not in config and NM(**config).sparsity == 1 - 1 / 3


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 16)])
def test_runs_on_the_tiny_chat_model(n, m):
    model, _ = make_tiny_chat_lm()
    strategy = NM(n=n, m=m)
    masks = strategy.compute(model, None)
    params = strategy.eligible(model)
    assert list(masks.names) == list(params) and "model.embed_tokens.weight" in masks.names
    assert masks.total == sum(p.numel() for p in params.values()) * n // m
    check_nm(masks, n, m)
