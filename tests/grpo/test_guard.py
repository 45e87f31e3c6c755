"""NonFiniteGuard: a NaN/Inf step is skipped and counted, a run of them stops in one line, a jump warns once."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mthlib.grpo.guard import NonFiniteError, NonFiniteGuard
from mthlib.masking import SparseAdamW
from tests.conftest import attached, make_tiny_lm
from tests.grpo.test_objective_distributed import free_port
from tests.masking.test_optim import batch, random_masks

NAN, INF = float("nan"), float("inf")


def quantities(**bad: object) -> dict[str, torch.Tensor | None]:
    """Finite rewards, advantages, loss and gradient norm, with the named ones replaced (``gradient_norm`` etc.)."""
    values: dict[str, torch.Tensor | None] = {
        "reward": torch.tensor([0.5, 1.0, 0.0]), "advantage": torch.tensor([0.1, 1.2, -1.3]),
        "loss": torch.tensor(0.25), "gradient norm": torch.tensor(3.0),
    }
    for key, value in bad.items():
        values[key.replace("_", " ")] = None if value is None else torch.as_tensor(value, dtype=torch.float32)
    return values


def test_a_finite_step_passes_and_counts_nothing():
    guard = NonFiniteGuard()
    assert guard.check(quantities(), step=1)
    assert (guard.skipped_steps, guard.consecutive, guard.first_bad) == (0, 0, None)


def test_a_bad_step_is_counted_and_a_good_step_ends_the_run_of_bad_ones():
    guard = NonFiniteGuard(max_bad_steps=2)
    assert not guard.check(quantities(reward=[0.5, NAN, 1.0]), step=3)
    assert (guard.skipped_steps, guard.consecutive, guard.first_bad) == (1, 1, ("reward", "NaN", 3))
    assert guard.check(quantities(), step=4)
    assert (guard.skipped_steps, guard.consecutive, guard.first_bad) == (1, 0, None)
    assert not guard.check(quantities(loss=INF), step=5)  # a new run of bad steps: not the second in a row
    assert (guard.skipped_steps, guard.consecutive, guard.first_bad) == (2, 1, ("loss", "Inf", 5))


def test_a_run_of_bad_steps_stops_in_one_line_naming_the_first_bad_quantity_and_its_step():
    guard = NonFiniteGuard(max_bad_steps=3)
    assert not guard.check(quantities(reward=[NAN, 0.0, 1.0]), step=4)
    assert not guard.check(quantities(loss=INF), step=5)
    with pytest.raises(NonFiniteError) as raised:
        guard.check(quantities(gradient_norm=NAN), step=6)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError) and "\n" not in message
    assert message.startswith(
        "reward is NaN at step 4 (3 consecutive non-finite steps; model.max_bad_steps is 3): "
        "the environment's score returned a non-finite reward."
    )
    assert message.endswith("hold the weights of step 3")
    assert guard.skipped_steps == 3


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ({"loss": INF}, "loss is Inf at step 1 "),
        ({"gradient_norm": NAN, "loss": -INF}, "loss is Inf at step 1 "),  # checked in order: loss before gradients
        ({"gradient_norm": [INF, NAN]}, "gradient norm is NaN at step 1 "),  # NaN is named over Inf
        ({"advantage": [0.0, NAN, 1.0]}, "advantage is NaN at step 1 "),
        ({"reward": None, "advantage": None, "loss": NAN}, "loss is NaN at step 1 "),  # None: not checked
    ],
)
def test_the_first_bad_quantity_in_order_is_named_with_nan_or_inf(bad, expected):
    with pytest.raises(NonFiniteError, match="^" + expected):
        NonFiniteGuard(max_bad_steps=1).check(quantities(**bad), step=1)


@pytest.mark.parametrize(
    ("quantity", "hint"),
    [("reward", "the environment's score"), ("advantage", "the rewards are too large"),
     ("loss", "lower model.learning_rate or set model.max_grad_norm"),
     ("gradient_norm", "lower model.learning_rate or set model.max_grad_norm")],
)
def test_the_message_says_what_to_change_for_each_quantity(quantity, hint):
    with pytest.raises(NonFiniteError, match=hint):
        NonFiniteGuard(max_bad_steps=1).check(quantities(**{quantity: NAN}), step=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"max_bad_steps": 0}, "max_bad_steps must be >= 1"), ({"divergence_factor": 1.0}, "divergence_factor must be > 1")],
)
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        NonFiniteGuard(**options)


def test_non_finite_weights_after_a_step_stop_naming_the_parameter():
    guard = NonFiniteGuard()
    guard.check_weights([("a", torch.ones(3)), ("b", torch.ones(2))], step=7, learning_rate=1e3)
    named = [("a", torch.ones(3)), ("b", torch.tensor([1.0, INF])), ("c", torch.tensor([NAN]))]
    with pytest.raises(NonFiniteError, match=r"^weights of b are Inf after the optimizer step at step 7 \(learning rate 1000\)"):
        guard.check_weights(named, step=7, learning_rate=1e3)


# -- divergence -----------------------------------------------------------------------------
def warnings_in(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mthlib.grpo.guard" and r.levelno == logging.WARNING]


def test_a_jump_above_factor_times_the_running_median_warns_once_per_quantity(caplog):
    guard = NonFiniteGuard(divergence_factor=100.0)
    for step, loss in enumerate([1.0, -1.0, 1.0, 95.0], start=1):  # 95x the median: no warning
        guard.watch({"loss": loss, "kl": 0.01}, step)
    assert warnings_in(caplog) == []
    guard.watch({"loss": -250.0, "kl": 0.01}, 5)
    guard.watch({"loss": 900.0, "kl": 0.01}, 6)  # still far above the median, but warned once already
    guard.watch({"loss": 1.0, "kl": 5.0}, 7)
    assert warnings_in(caplog) == [
        "warning: loss jumped to -250 at step 5, 250x its running median 1: training may be diverging "
        "(lower model.learning_rate or set model.max_grad_norm)",
        "warning: kl jumped to 5 at step 7, 500x its running median 0.01: training may be diverging "
        "(lower model.learning_rate or set model.max_grad_norm)",
    ]


def test_zeros_are_left_out_of_the_median_and_a_history_of_zeros_is_judged_against_the_floor(caplog):
    guard = NonFiniteGuard()
    guard.watch({"kl": 0.0}, 1)
    guard.watch({"kl": 50.0}, 2)  # one value of history: not judged
    assert warnings_in(caplog) == []
    guard = NonFiniteGuard()
    for step, loss in enumerate([0.5, 0.0, 0.0, 0.0, 0.0, 20.0], start=1):  # steps without signal: loss exactly 0
        guard.watch({"loss": loss}, step)
    assert warnings_in(caplog) == []  # 40x the median of the nonzero losses
    for step in (1, 2):
        guard.watch({"kl": 0.0}, step)
    guard.watch({"kl": 0.9}, 3)  # below 100x the floor 0.01
    assert warnings_in(caplog) == []
    guard = NonFiniteGuard()
    for step in (1, 2):
        guard.watch({"kl": 0.0}, step)
    guard.watch({"kl": 3.5}, 3)  # the policy left the base in one step
    assert warnings_in(caplog) == ["warning: kl jumped to 3.5 at step 3, 350x its running median 0.01: "
                                   "training may be diverging (lower model.learning_rate or set model.max_grad_norm)"]


def test_the_running_median_covers_the_last_window_steps(caplog):
    values = [1.0, 1.0, 1.0, 60.0, 60.0, 60.0, 5000.0]
    short, default = NonFiniteGuard(window=3), NonFiniteGuard()
    for step, value in enumerate(values, start=1):
        short.watch({"loss": value}, step)
    assert warnings_in(caplog) == [] and short.history["loss"] == [60.0, 60.0, 5000.0]
    for step, value in enumerate(values, start=1):
        default.watch({"loss": value}, step)  # the median of all six before is 30.5: 5000 > 100 x 30.5
    assert len(warnings_in(caplog)) == 1


def test_divergence_factor_none_never_warns(caplog):
    guard = NonFiniteGuard(divergence_factor=None)
    for step, value in enumerate([1.0, 1.0, 1e9], start=1):
        guard.watch({"loss": value}, step)
    assert warnings_in(caplog) == []
    assert NonFiniteGuard(divergence_factor=10.0).divergence_factor == 10.0


def test_a_lower_divergence_factor_warns_at_a_smaller_jump(caplog):
    guard = NonFiniteGuard(divergence_factor=10.0)
    for step, value in enumerate([1.0, 1.0, 20.0], start=1):
        guard.watch({"loss": value}, step)
    assert warnings_in(caplog) == ["warning: loss jumped to 20 at step 3, 20x its running median 1: training may be "
                                   "diverging (lower model.learning_rate or set model.max_grad_norm)"]


# -- resume ---------------------------------------------------------------------------------
def test_a_restored_guard_continues_the_run_of_bad_steps_and_remembers_its_warnings(caplog):
    guard = NonFiniteGuard(max_bad_steps=3)
    for step in (1, 2, 3):
        guard.watch({"loss": 1.0}, step)
    guard.watch({"loss": 1e4}, 4)
    assert not guard.check(quantities(reward=[NAN, 1.0, 0.0]), step=5)
    assert not guard.check(quantities(loss=INF), step=6)
    state = json.loads(json.dumps(guard.state_dict()))  # plain data: numbers, strings, lists
    restored = NonFiniteGuard(max_bad_steps=3)
    restored.load_state_dict(state)
    assert restored.history == guard.history and restored.skipped_steps == 2
    restored.watch({"loss": 1e6}, 7)
    assert len(warnings_in(caplog)) == 1  # the loss warned before the save: not again
    with pytest.raises(NonFiniteError, match=r"^reward is NaN at step 5 \(3 consecutive"):
        restored.check(quantities(gradient_norm=NAN), step=7)


# -- the guarded optimizer step -------------------------------------------------------------
def state_of(optimizer: torch.optim.Optimizer) -> dict:
    return copy.deepcopy(optimizer.state_dict()["state"])


def assert_same(a, b) -> None:
    """Nested dicts / lists of tensors and numbers, bitwise equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_a_skipped_dense_step_changes_no_weight_and_no_moment_and_clears_the_gradients():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    guard = NonFiniteGuard()
    layer(torch.randn(2, 4)).sum().backward()
    assert guard.step(optimizer, quantities(), {"loss": [torch.tensor(1.0)]}, 1, layer)
    weights, moments = copy.deepcopy(layer.state_dict()), state_of(optimizer)
    layer(torch.randn(2, 4)).sum().backward()
    assert not guard.step(optimizer, quantities(loss=NAN), {"loss": [torch.tensor(NAN)]}, 2, layer)
    assert_same(layer.state_dict(), weights)
    assert_same(state_of(optimizer), moments)  # weight decay and the step counter too
    assert all(p.grad is None for p in layer.parameters())
    assert guard.history["loss"] == [1.0]  # a skipped step's metrics are not watched
    layer(torch.randn(2, 4)).sum().backward()
    assert guard.step(optimizer, quantities(), {"loss": [torch.tensor(2.0)]}, 3, layer)
    assert not torch.equal(layer.weight, weights["weight"])


def test_a_skipped_sparse_step_changes_no_active_entry_or_moment_and_clears_the_gradient_sums():
    model = make_tiny_lm(seed=1)
    state = attached(model, random_masks(model))
    optimizer = SparseAdamW(state, lr=1e-2, weight_decay=0.1)
    guard = NonFiniteGuard()
    model(**batch(0)).loss.backward()
    assert guard.step(optimizer, quantities(), {}, 1, model, state)
    values, moments = state.trained_values(), state_of(optimizer)
    model(**batch(1)).loss.backward()
    assert state.gradients.buffers  # the gradient sums a skipped step must drop
    assert not guard.step(optimizer, quantities(gradient_norm=INF), {}, 2, model, state)
    assert state.gradients.buffers == {}
    assert_same(state.trained_values(), values)
    assert_same(state_of(optimizer), moments)
    model(**batch(2)).loss.backward()
    assert guard.step(optimizer, quantities(), {}, 3, model, state)
    assert any(not torch.equal(values[name], now) for name, now in state.trained_values().items())


@pytest.mark.parametrize("masked", [False, True, "complete"])
def test_a_step_that_leaves_a_trained_value_non_finite_stops_at_once(masked):
    """Dense, masked, and masks holding every entry (read in place, not gathered)."""
    model = make_tiny_lm(seed=2)
    density = 1.0 if masked == "complete" else 0.1
    state = attached(model, random_masks(model, density=density)) if masked else None
    optimizer = SparseAdamW(state, lr=INF) if masked else torch.optim.AdamW(model.parameters(), lr=INF)
    model(**batch(0)).loss.backward()
    with pytest.raises(NonFiniteError, match=r"^weights of model\.\S+ are (NaN|Inf) after the optimizer step at step 4 "
                                             r"\(learning rate inf\): lower model.learning_rate"):
        NonFiniteGuard().step(optimizer, quantities(), {}, 4, model, state)


def test_the_guarded_step_watches_the_loss_and_kl_of_the_steps_it_takes(caplog):
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    guard = NonFiniteGuard()
    for step, (loss, kl) in enumerate([(1.0, 0.02), (1.0, 0.02), (1.0, 4.0)], start=1):
        metrics = {"loss": [torch.tensor(loss)], "kl": [torch.tensor(kl), torch.tensor(kl)], "entropy": [torch.tensor(9e9)]}
        guard.step(optimizer, quantities(), metrics, step, layer)
    assert sorted(guard.history) == ["kl", "loss"]
    assert warnings_in(caplog) == ["warning: kl jumped to 4 at step 3, 200x its running median 0.02: training may be "
                                   "diverging (lower model.learning_rate or set model.max_grad_norm)"]


# -- several processes ----------------------------------------------------------------------
def guard_on_rank(rank: int, world: int, port: int, out: Path) -> None:
    """Rank 1 alone sees a NaN reward at steps 2 and 3; every rank must skip, and stop, with it."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        guard, taken = NonFiniteGuard(max_bad_steps=2), []
        taken.append(guard.check(quantities(), step=1))
        taken.append(guard.check(quantities(reward=[1.0, NAN] if rank == 1 else [1.0, 0.0]), step=2))
        try:
            guard.check(quantities(reward=[NAN, 0.0] if rank == 1 else [1.0, 0.0]), step=3)
            error = None
        except NonFiniteError as err:
            error = str(err)
        (out / f"rank{rank}.json").write_text(json.dumps({"taken": taken, "error": error}))
    finally:
        dist.destroy_process_group()


def test_every_process_takes_the_same_decision(tmp_path):
    mp.start_processes(guard_on_rank, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]
    assert results[0]["taken"] == [True, False]
    assert results[0]["error"].startswith("reward is NaN at step 2 (2 consecutive non-finite steps")
