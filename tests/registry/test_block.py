"""`block` keeps whole tiles, the best by mean entry score, within one tile of k: hand-computed cases."""

import pytest
import torch
from torch import nn

from mthlib.masking import Masks
from mthlib.registry.block import Block, check_blocks, tile_sizes
from tests.conftest import make_tiny_chat_lm
from tests.registry.conftest import Lookup, lookup_batch

# 2x2 tiles of a 4x4 matrix, mean |w|: top-left 1, top-right 4, bottom-left 3, bottom-right 4 (a tie)
A = torch.tensor([
    [1.0, -1.0, 4.0, 4.0],
    [1.0, 1.0, -4.0, 4.0],
    [3.0, 3.0, 2.0, 6.0],
    [-3.0, 3.0, 4.0, 4.0],
])
TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT = [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]


class Matrices(nn.Module):
    def __init__(self, *weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(w.clone()) for w in weights])


def test_the_best_whole_tiles_with_ties_to_the_earlier_tile():
    model = Matrices(A)
    assert Block(block_size=2, sparsity=0.5).compute(model, None)["weights.0"].tolist() == sorted(TOP_RIGHT + BOTTOM_RIGHT)
    # one tile: the 4-4 tie goes to the top-right tile (row-major first)
    assert Block(block_size=2, sparsity=0.75).compute(model, None)["weights.0"].tolist() == TOP_RIGHT
    keep_three = Block(block_size=2, sparsity=0.25).compute(model, None)["weights.0"].tolist()
    assert keep_three == sorted(TOP_RIGHT + BOTTOM_LEFT + BOTTOM_RIGHT)


def test_whole_tiles_give_exactly_floor_k_over_b_squared_tiles():
    model = Matrices(A)
    for sparsity in (0.9, 0.7, 0.6, 0.3, 0.0):
        strategy = Block(block_size=2, sparsity=sparsity)
        if strategy.keep_count(16) < 4:
            continue
        assert strategy.compute(model, None).total == 4 * (strategy.keep_count(16) // 4)


def test_global_ranks_tiles_of_all_tensors_and_ties_go_to_the_earlier_tensor():
    model = Matrices(A, torch.full((2, 2), 4.0))  # its one tile ties with A's best
    both = Block(block_size=2, sparsity=0.8).compute(model, None)  # keep_count(20) = 4: one tile
    assert both["weights.0"].tolist() == TOP_RIGHT and both.count("weights.1") == 0
    both = Block(block_size=2, sparsity=0.6).compute(model, None)  # keep_count(20) = 8: the three 4-tiles -> two
    assert both["weights.0"].tolist() == sorted(TOP_RIGHT + BOTTOM_RIGHT) and both.count("weights.1") == 0
    both = Block(block_size=2, sparsity=0.4).compute(model, None)  # 12 entries: all three 4-tiles
    assert both["weights.0"].tolist() == sorted(TOP_RIGHT + BOTTOM_RIGHT) and both["weights.1"].tolist() == [0, 1, 2, 3]
    per = Block(block_size=2, sparsity=0.5, allocation="per_tensor").compute(model, None)
    assert per["weights.0"].tolist() == sorted(TOP_RIGHT + BOTTOM_RIGHT) and per.count("weights.1") == 0  # k = 2 < 4


def test_ragged_edge_tiles_score_by_their_mean_and_count_their_real_entries():
    # 5x4 with 2x2 tiles: the last tile row has two 1x2 tiles; the bottom-left one (10, 10) has the best mean,
    # though its sum (20) is below the 9-tile's (36)
    weight = torch.zeros(5, 4)
    weight[0:2, 2:4] = 9.0
    weight[4, 0:2] = 10.0
    model = Matrices(weight)
    assert tile_sizes((5, 4), 2).tolist() == [[4, 4], [4, 4], [2, 2]]
    assert Block(block_size=2, sparsity=0.7).compute(model, None)["weights.0"].tolist() == [2, 3, 6, 7, 16, 17]  # k = 6
    # k = 5: after the edge tile (2) the 9-tile (4) would pass k, so the count stops at 2, within one tile of k
    assert Block(block_size=2, sparsity=0.75).compute(model, None)["weights.0"].tolist() == [16, 17]


def test_fisher_and_snip_tile_scores_in_closed_form():
    # 2x4 weight, 2x2 tiles: left = flat [0, 1, 4, 5], right = [2, 3, 6, 7]
    model = Lookup(torch.tensor([[1.0, 1.0, 10.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    batches = [lookup_batch([(0, 3), (1, 3), (2, 1), (3, 1)])]  # g = [3, 3, 1, 1 | 0, 0, 0, 0]
    fisher = Block(block_size=2, sparsity=0.5, score="fisher", num_samples=1)
    assert fisher.needs_calibration and fisher.compute(model, batches)["weight"].tolist() == [0, 1, 4, 5]  # 18/4 > 2/4
    snip = Block(block_size=2, sparsity=0.5, score="snip", num_samples=1)
    assert snip.compute(model, batches)["weight"].tolist() == [2, 3, 6, 7]  # |g w|: 11/4 > 6/4
    assert not Block(score="random").needs_calibration and not Block.needs_calibration


def test_seed_changes_the_random_choice_and_repeats_it():
    model = Matrices(torch.ones(16, 16))
    first = Block(block_size=2, sparsity=0.75, score="random", seed=1).compute(model, None)
    assert first == Block(block_size=2, sparsity=0.75, score="random", seed=1).compute(model, None)
    assert first != Block(block_size=2, sparsity=0.75, score="random", seed=2).compute(model, None)
    assert first.total == 64
    check_blocks(first, 2)


def test_tiles_holding_exclude_mask_entries_are_never_kept(tmp_path):
    path = tmp_path / "task1.safetensors"
    Masks({"weights.0": torch.tensor([7])}, {"weights.0": (4, 4)}).save(path)
    masks = Block(block_size=2, sparsity=0.5, exclude_mask=str(path)).compute(Matrices(A), None)
    assert masks["weights.0"].tolist() == sorted(BOTTOM_LEFT + BOTTOM_RIGHT)  # top-right is ruled out
    Masks({"weights.0": torch.tensor([0, 2, 8])}, {"weights.0": (4, 4)}).save(path)
    with pytest.raises(ValueError, match="cannot keep 8 entries in whole tiles: only 4 lie in tiles free of exclude_mask"):
        Block(block_size=2, sparsity=0.5, exclude_mask=str(path)).compute(Matrices(A), None)


def test_check_blocks_raises_on_a_partial_tile():
    check_blocks(Masks({"w": torch.tensor([2, 3, 6, 7, 16, 17])}, {"w": (5, 4)}), 2)
    with pytest.raises(ValueError, match="w keeps 3 of the 4 entries of the tile at rows 0-1, columns 2-3"):
        check_blocks(Masks({"w": torch.tensor([2, 3, 6])}, {"w": (4, 4)}), 2)
    with pytest.raises(ValueError, match="w keeps 1 of the 2 entries of the tile at rows 4-4, columns 0-1"):
        check_blocks(Masks({"w": torch.tensor([16])}, {"w": (5, 4)}), 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 0}, "block_size must be >= 1"),
    ({"score": "hessian"}, "score must be one of 'magnitude', 'random', 'fisher', 'snip'; got 'hessian'"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"allocation": "rows"}, "allocation must be 'global' or 'per_tensor'"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        Block(**kwargs)
    assert "\n" not in str(err.value)


def test_nothing_to_keep_and_vectors_are_one_line_errors():
    with pytest.raises(ValueError, match="no whole 4x4 tile fits in the 0.5 of entries to keep") as err:
        Block(block_size=4, sparsity=0.5, allocation="per_tensor").compute(Matrices(torch.ones(2, 4)), None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"block masks tile matrices; model.layers.0.input_layernorm.weight has shape \(32,\)"):
        Block(include_norms=True).compute(make_tiny_chat_lm()[0], None)


@pytest.mark.parametrize("allocation", ["global", "per_tensor"])
def test_runs_on_the_tiny_chat_model(allocation):
    model, _ = make_tiny_chat_lm()  # embeddings 100 x 32: 16-tiles with a ragged last tile row of 4
    strategy = Block(block_size=16, sparsity=0.5, allocation=allocation)
    masks = strategy.compute(model, None)
    params = strategy.eligible(model)
    assert list(masks.names) == list(params) and "model.embed_tokens.weight" in masks.names
    check_blocks(masks, 16)
    groups = [params] if allocation == "global" else [{name: p} for name, p in params.items()]
    for group in groups:
        k = strategy.keep_count(sum(p.numel() for p in group.values()))
        assert k - 256 < sum(masks.count(name) for name in group) <= k
