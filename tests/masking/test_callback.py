"""Tests of MaskCallback in real Lightning fits: frozen entries bitwise, verification, resume, dynamic masks."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from mthlib.deltas import apply_delta, save_delta
from mthlib.fingerprint import model_fingerprint
from mthlib.masking import MaskCallback, Masks, MaskStrategy, SparseAdamW, gather_values, swapped_to_base
from mthlib.masking.reinit import reinit_generator, reinitialised_values
from tests.conftest import make_tiny_lm

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")


class GradMagnitude(MaskStrategy):
    """Test strategy: keep the entries with the largest summed |gradient|; counts its computations."""

    needs_calibration = True
    computed: list[int] = []

    def __init__(self, sparsity: float = 0.9, num_samples: int = 6, seed: int = 0) -> None:
        super().__init__(sparsity, seed=seed)
        self.num_samples = num_samples

    def compute(self, model, batches):
        GradMagnitude.computed.append(self.seed)
        return self.top_k(self.accumulate(model, batches, lambda w, g: g.abs()))


class Reshuffle(MaskStrategy):
    """Dynamic test strategy: every 2 steps move half of each tensor's active entries elsewhere (seeded)."""

    dynamic = True

    def __init__(self, sparsity: float = 0.9, seed: int = 0) -> None:
        super().__init__(sparsity, seed=seed)
        self.update_every = 2
        self.grads_seen: list[bool] = []

    def compute(self, model, batches):
        return self.top_k({n: p.detach().abs() for n, p in self.eligible(model).items()})

    def update(self, masks, model, step, grads, base_values, batches):
        self.grads_seen.append(grads is not None and set(grads) == {n for n in masks if masks.count(n)})
        gen = torch.Generator().manual_seed(self.seed + step)
        indices = {}
        for name, idx in masks.items():
            numel = masks.to_dense(name).numel()
            keep = idx[: idx.numel() // 2]
            free = torch.ones(numel, dtype=torch.bool)
            free[idx] = False
            candidates = torch.nonzero(free).view(-1)
            grown = candidates[torch.randperm(candidates.numel(), generator=gen)[: idx.numel() - keep.numel()]]
            indices[name] = torch.sort(torch.cat([keep, grown])).values
        return Masks(indices, masks.shapes)


def step_batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, 64, (4, 8), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class TinyModule(pl.LightningModule):
    """Minimal module following the GRPOModule contract (manual optimization, SparseAdamW on its callback's state)."""

    def __init__(self, mask_callback: MaskCallback, corrupt_at: int | None = None, dense: bool = False) -> None:
        super().__init__()
        self.model = make_tiny_lm(seed=0)
        self.tokenizer = None
        self.mask_callback = mask_callback
        self.automatic_optimization = False
        self.corrupt_at = corrupt_at
        self.dense = dense
        self.losses: list[float] = []

    def configure_optimizers(self):
        if self.dense:
            return torch.optim.AdamW(self.model.parameters())
        optimizer = SparseAdamW(self.mask_callback.prepare(self.trainer, self), lr=1e-2, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        data = step_batch(self.global_step)
        optimizer = self.optimizers()
        for rows in (slice(0, 2), slice(2, 4)):  # two micro-batches: gradient accumulation
            loss = self.model(**{k: v[rows] for k, v in data.items()}).loss
            self.manual_backward(0.5 * loss)
        optimizer.optimizer.clip_grad_norm_(0.5)
        optimizer.step()
        optimizer.zero_grad()
        self.lr_schedulers().step()
        self.losses.append(float(loss.detach()))
        if self.corrupt_at == self.global_step:
            with torch.no_grad():
                frozen = ~self.mask_callback.state.masks.to_dense("model.layers.1.mlp.down_proj.weight")
                self.model.model.layers[1].mlp.down_proj.weight[frozen] += 1e-3


class TinyData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict] = []

    def train_dataloader(self):
        return DataLoader(list(range(64)), batch_size=1)

    def calibration_batches(self, tokenizer, num_samples, batch_size, seed):
        self.requests.append({"num_samples": num_samples, "batch_size": batch_size, "seed": seed})
        for first in range(0, num_samples, batch_size):
            yield step_batch(-1 - first)


def trainer(tmp_path, max_steps: int, callback: MaskCallback) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[callback], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, num_sanity_val_steps=0,
    )


@pytest.fixture(autouse=True)
def _reset_counter():
    GradMagnitude.computed.clear()


def frozen_and_active(model, masks):
    base = dict(make_tiny_lm(seed=0).named_parameters())
    for name, param in model.named_parameters():
        keep = masks.to_dense(name) if name in masks else torch.zeros_like(param, dtype=torch.bool)
        yield name, param.detach(), base[name].detach(), keep


def fit(tmp_path, steps: int, callback: MaskCallback, data=None, ckpt_path=None, **module_args) -> TinyModule:
    """Fit a TinyModule that asks ``callback`` for its state; returns the module."""
    module = TinyModule(callback, **module_args)
    trainer(tmp_path, steps, callback).fit(module, datamodule=data or TinyData(), ckpt_path=ckpt_path)
    return module


def test_frozen_entries_stay_bitwise_with_decay_clipping_and_accumulation(tmp_path):
    data = TinyData()
    callback = MaskCallback(GradMagnitude(num_samples=6), verify_every=1, calibration_batch_size=4)
    module = fit(tmp_path, 4, callback, data)
    assert GradMagnitude.computed == [0]
    assert data.requests == [{"num_samples": 6, "batch_size": 4, "seed": 0}]
    state = callback.state
    masks = state.masks
    eligible = sum(p.numel() for p in module.model.parameters() if p.dim() >= 2)
    assert masks.total == int(eligible * 0.1)
    trained = 0
    for name, param, base, keep in frozen_and_active(module.model, masks):
        assert torch.equal(param[~keep], base[~keep]), f"frozen entries of {name} moved"
        trained += int((param[keep] != base[keep]).sum())
    assert trained > 0.9 * masks.total
    for name, values in state.base_values.items():
        assert torch.equal(values, dict(make_tiny_lm(seed=0).named_parameters())[name].detach().view(-1)[masks[name]])
    assert state.base_fingerprint == model_fingerprint(make_tiny_lm(seed=0))
    metrics = module.trainer.callback_metrics
    total = sum(p.numel() for p in module.model.parameters())
    assert float(metrics["mask/trainable_count"]) == masks.total
    assert float(metrics["mask/trainable_fraction"]) == pytest.approx(masks.total / total)
    assert not state.attached  # detached when the fit ended: no hooks, original layers
    assert not any(type(m).__name__ == "ActiveEntryLinear" for m in module.model.modules())
    assert all(p.requires_grad for p in module.model.parameters())
    assert not vars(module.model).get("_forward_hooks") and "configure_optimizers" not in vars(module)


def test_verification_names_the_corrupted_tensor(tmp_path):
    callback = MaskCallback(GradMagnitude(), verify_every=2)
    with pytest.raises(RuntimeError, match=r"frozen entries of model\.layers\.1\.mlp\.down_proj\.weight differ .* at step 2"):
        fit(tmp_path, 4, callback, corrupt_at=1)
    at_end = MaskCallback(GradMagnitude(), verify_every=0)
    with pytest.raises(RuntimeError, match=r"down_proj\.weight differ .* at step 3"):
        fit(tmp_path, 3, at_end, corrupt_at=1)
    assert not at_end.state.attached  # detached on the exception too


def test_resume_restores_masks_without_recomputing(tmp_path):
    straight = fit(tmp_path, 4, MaskCallback(GradMagnitude()))

    callback = MaskCallback(GradMagnitude())
    first = TinyModule(callback)
    run = trainer(tmp_path, 2, callback)
    run.fit(first, datamodule=TinyData())
    path = tmp_path / "two.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["callbacks"]["MaskCallback{'strategy': 'GradMagnitude', 'sparsity': 0.9}"]
    assert state["indices"]["model.embed_tokens.weight"].dtype == torch.int32
    assert state["base_fingerprint"] == model_fingerprint(make_tiny_lm(seed=0))
    assert GradMagnitude.computed == [0, 0]

    data, again = TinyData(), MaskCallback(GradMagnitude())
    resumed = fit(tmp_path, 4, again, data, ckpt_path=path)
    assert GradMagnitude.computed == [0, 0] and data.requests == []  # restored, not recomputed
    assert again.state.masks == straight.mask_callback.state.masks
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-6)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_resume_refuses_another_strategy(tmp_path):
    callback = MaskCallback(GradMagnitude())
    run = trainer(tmp_path, 1, callback)
    run.fit(TinyModule(callback), datamodule=TinyData())
    path = tmp_path / "one.ckpt"
    run.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"^resume: model\.mask\.init_args\.seed is 5 here but 0 in the checkpoint$"):
        fit(tmp_path, 2, MaskCallback(GradMagnitude(seed=5)), ckpt_path=path)
    with pytest.raises(ValueError, match=r"^resume: model\.mask\.init_args\.sparsity is 0\.8 here but 0\.9 in the checkpoint$"):
        fit(tmp_path, 2, MaskCallback(GradMagnitude(sparsity=0.8)), ckpt_path=path)


def test_dynamic_strategy_keeps_count_and_frozen_part(tmp_path):
    strategy = Reshuffle()
    callback = MaskCallback(strategy, verify_every=1)
    module = fit(tmp_path, 5, callback)
    state = callback.state
    assert state.last_update_step == 4 and len(strategy.grads_seen) == 2 and all(strategy.grads_seen)
    initial = strategy.compute(make_tiny_lm(seed=0), None)
    assert state.masks.total == initial.total and state.masks != initial
    optimizer = module.trainer.optimizers[0]
    assert optimizer.masks is state.masks
    for name, param, base, keep in frozen_and_active(module.model, state.masks):
        assert torch.equal(param[~keep], base[~keep]), f"frozen (or dropped) entries of {name} are not the base"
        if name in state.masks:
            assert torch.equal(state.base_values[name], base.view(-1)[state.masks[name]])


def test_the_module_must_build_sparse_adamw(tmp_path):
    with pytest.raises(RuntimeError, match="needs the LightningModule to build mthlib.masking.SparseAdamW.*AdamW"):
        fit(tmp_path, 1, MaskCallback(GradMagnitude()), dense=True)


def test_calibration_needs_a_data_module_method(tmp_path):
    callback = MaskCallback(GradMagnitude())
    loader = DataLoader(list(range(8)), batch_size=1)
    with pytest.raises(ValueError, match="calibration_batches"):
        trainer(tmp_path, 1, callback).fit(TinyModule(callback), train_dataloaders=loader)


class StartValues(pl.Callback):
    """Keeps the active entries' values when training starts (the mask callback prepared its state by then)."""

    def __init__(self, mask_callback: MaskCallback) -> None:
        self.mask_callback = mask_callback
        self.values: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module):
        values = gather_values(pl_module.model, self.mask_callback.state.masks)
        self.values = {name: v for name, v in values.items() if v.numel()}


def fit_recording_start(tmp_path, steps: int, callback: MaskCallback) -> tuple[TinyModule, dict[str, torch.Tensor]]:
    module, start = TinyModule(callback), StartValues(callback)
    run = trainer(tmp_path, steps, callback)
    run.callbacks.append(start)
    run.fit(module, datamodule=TinyData())
    return module, start.values


def test_reinitialised_values_follow_each_tensors_normal_and_are_seeded():
    model = torch.nn.Linear(300, 200)
    with torch.no_grad():
        model.weight.copy_(3.0 + 2.0 * torch.randn(200, 300, generator=torch.Generator().manual_seed(1)))
    masks = Masks({"weight": torch.arange(0, 60_000, 2), "bias": torch.tensor([4])}, {"weight": (200, 300), "bias": (200,)})
    values = reinitialised_values(model, masks, seed=4)
    std, mean = torch.std_mean(model.weight.detach().double(), correction=0)
    drawn = values["weight"].double()
    assert values["weight"].dtype == torch.float32 and drawn.numel() == 30_000
    assert float(drawn.mean()) == pytest.approx(float(mean), abs=0.05)  # sd of the sample mean: 2 / sqrt(30000) = 0.012
    assert float(drawn.std()) == pytest.approx(float(std), rel=0.02)  # relative sd of the sample std: 0.004
    generator = reinit_generator(4)  # the rule, in closed form: mean + std * N(0, 1), parameters in mask order
    expected = (mean + std * torch.randn(30_000, generator=generator, dtype=torch.float64)).float()
    bias_std, bias_mean = torch.std_mean(model.bias.detach().double(), correction=0)
    expected_bias = (bias_mean + bias_std * torch.randn(1, generator=generator, dtype=torch.float64)).float()
    assert torch.equal(values["weight"], expected) and torch.equal(values["bias"], expected_bias)
    assert all(torch.equal(values[n], v) for n, v in reinitialised_values(model, masks, seed=4).items())
    assert not torch.equal(reinitialised_values(model, masks, seed=5)["weight"], values["weight"])
    assert not torch.equal(expected, (mean + std * torch.randn(30_000, generator=torch.Generator().manual_seed(4),
                                                                 dtype=torch.float64)).float())  # not the strategy's stream
    half = reinitialised_values(model.to(torch.bfloat16), masks, seed=4)
    assert half["weight"].dtype == torch.bfloat16


def test_reinit_trains_the_mask_from_new_values_against_the_untouched_base(tmp_path):
    base = make_tiny_lm(seed=0)
    callback = MaskCallback(GradMagnitude(seed=3), verify_every=1, reinit=True)
    module, start = fit_recording_start(tmp_path, 3, callback)  # verify() after every step passes
    state, masks = callback.state, callback.state.masks
    expected = reinitialised_values(base, masks, seed=3)
    assert sorted(start) == sorted(expected)
    for name, values in start.items():
        assert torch.equal(values, expected[name]), name  # training started from the drawn values
        base_values = base.get_parameter(name).detach().view(-1)[masks[name]]
        assert int((values != base_values).sum()) == masks.count(name)
        assert torch.equal(state.base_values[name], base_values)  # the recorded base is the base, not the draw
    for name, param, base_param, keep in frozen_and_active(module.model, masks):
        assert torch.equal(param[~keep], base_param[~keep]), f"frozen entries of {name} moved"
    with swapped_to_base(module.model, masks, state.base_values) as reference:  # the KL reference is the base itself
        assert model_fingerprint(reference) == model_fingerprint(base)
    delta = save_delta(tmp_path / "delta.safetensors", module.model, dict(masks.items()), base_model="tiny",
                       base_fingerprint=state.base_fingerprint, strategy=None, sparsity=0.9, step=3)
    exported = apply_delta(make_tiny_lm(seed=0), delta)  # base with the trained values at the active entries
    assert all(torch.equal(p, q) for p, q in zip(exported.parameters(), module.model.parameters()))
    assert callback.state_dict()["reinit"] is True


def test_without_reinit_training_starts_from_the_base_values(tmp_path):
    base = make_tiny_lm(seed=0)
    callback = MaskCallback(GradMagnitude(seed=3))
    _, start = fit_recording_start(tmp_path, 1, callback)
    assert start and all(torch.equal(v, base.get_parameter(n).detach().view(-1)[callback.state.masks[n]])
                         for n, v in start.items())
    assert callback.state_dict()["reinit"] is False


def test_resume_restores_trained_values_without_reinitialising_again(tmp_path):
    straight = fit(tmp_path, 4, MaskCallback(GradMagnitude(), reinit=True))

    callback = MaskCallback(GradMagnitude(), reinit=True)
    run = trainer(tmp_path, 2, callback)
    run.fit(TinyModule(callback), datamodule=TinyData())
    path = tmp_path / "two.ckpt"
    run.save_checkpoint(path)
    again = MaskCallback(GradMagnitude(), reinit=True)
    resumed = fit(tmp_path, 4, again, ckpt_path=path)
    assert resumed.losses == pytest.approx(straight.losses[2:], rel=1e-6)
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name  # a second draw at resume would have overwritten the trained values
    with pytest.raises(ValueError, match=r"^resume: model\.reinit is false here but true in the checkpoint$"):
        fit(tmp_path, 4, MaskCallback(GradMagnitude()), ckpt_path=path)
