"""Sparse weight sync against a fake inference engine laid out as vLLM lays out Llama and Qwen2, and the vLLM
rollout engine driving such a fake (``generate`` and ``collective_rpc``): no GPU, no vLLM."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from mthlib.grpo.engines import HFEngine, SamplingConfig, make_engine
from mthlib.grpo.vllm_engine import VLLMEngine
from mthlib.masking import Masks, SparseAdamW
from mthlib.weight_sync import FUSED, SparseUpdateReceiver, SparseWeightSync, Target, fused_layout
from tests.conftest import attached, make_tiny_chat_lm, make_tiny_lm


def random_masks(model: torch.nn.Module, sparsity: float, seed: int) -> Masks:
    """The same fraction of every parameter's entries, chosen at random."""
    generator = torch.Generator().manual_seed(seed)
    indices, shapes = {}, {}
    for name, param in model.named_parameters():
        shapes[name] = tuple(param.shape)
        count = max(1, round(param.numel() * (1 - sparsity)))
        indices[name] = torch.sort(torch.randperm(param.numel(), generator=generator)[:count]).values
    return Masks(indices, shapes)


class FusedWeights:
    """An engine's weights: q/k/v and gate/up stacked by rows into one tensor each, as vLLM stores them."""

    def __init__(self, model: torch.nn.Module) -> None:
        layout = fused_layout(model)
        grouped: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for name, param in model.named_parameters():
            grouped.setdefault(layout[name].name, []).append((layout[name].offset, param.detach().clone()))
        self.params = {name: torch.cat([t.reshape(-1) for _, t in sorted(parts, key=lambda p: p[0])])
                       for name, parts in grouped.items()}

    def named_parameters(self):
        return list(self.params.items())

    def unfused(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The engine's weights under the trainer's names and shapes."""
        layout = fused_layout(model)
        return {name: self.params[layout[name].name][layout[name].offset: layout[name].offset + p.numel()].view_as(p)
                for name, p in model.named_parameters()}


class FakeWorker(SparseUpdateReceiver):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = FusedWeights(model)


class FakeLLM:
    """``vllm.LLM``'s ``collective_rpc`` over workers that each hold the whole model (data parallel)."""

    def __init__(self, model: torch.nn.Module, workers: int = 2) -> None:
        self.workers = [FakeWorker(model) for _ in range(workers)]

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        return [getattr(worker, method)(*args) for worker in self.workers]


def step(model, optimizer, seed):
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def assert_engine_equals_trainer(llm, model):
    for worker in llm.workers:
        for name, value in worker.model.unfused(model).items():
            assert torch.equal(value, dict(model.named_parameters())[name].detach()), name


def test_after_every_sync_the_engine_equals_the_trainer_bitwise_for_about_one_percent_of_the_bytes():
    model = make_tiny_lm(seed=0, tie=False, hidden=64)
    llm = FakeLLM(model)
    state = attached(model, random_masks(model, sparsity=0.99, seed=1))
    optimizer = SparseAdamW(state, lr=1e-2)
    sync = SparseWeightSync(state, layout=fused_layout(model))
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sizes = []
    for seed in range(4):
        step(model, optimizer, seed)
        update = sync.update()
        written = llm.collective_rpc("apply_sparse_update", args=(update,))
        assert written == [state.masks.total] * 2
        assert_engine_equals_trainer(llm, model)
        sizes.append(update.nbytes)
    assert sizes[0] == state.masks.total * (4 + 8)  # fp32 values and int64 indices, once
    assert sizes[1:] == [state.masks.total * 4] * 3  # then the values only
    assert 0.009 < sizes[1] / dense_bytes < 0.012
    assert sync.bytes_sent == sum(sizes)


def test_a_mask_update_resends_the_indices_and_the_engine_follows():
    model = make_tiny_lm(seed=1, tie=False)
    llm = FakeLLM(model, workers=1)
    state = attached(model, random_masks(model, sparsity=0.9, seed=2))
    optimizer = SparseAdamW(state, lr=1e-2)
    sync = SparseWeightSync(state, layout=fused_layout(model))
    step(model, optimizer, 0)
    llm.collective_rpc("apply_sparse_update", args=(sync.update(),))
    old = state.masks
    state.replace_masks(random_masks(model, sparsity=0.9, seed=3), step=1)  # dropped entries return to the base
    optimizer = SparseAdamW(state, lr=1e-2)
    step(model, optimizer, 1)
    update = sync.update()
    assert update.version == 2 and set(update.indices) == set(update.values)
    dropped = old.difference(state.masks)
    assert sum(values.numel() for _, values in update.restore.values()) == dropped.total > 0
    llm.collective_rpc("apply_sparse_update", args=(update,))
    assert_engine_equals_trainer(llm, model)


def test_values_of_a_mask_version_the_engine_never_received_are_refused():
    model = make_tiny_lm(seed=2)
    state = attached(model, random_masks(model, sparsity=0.9, seed=0))
    sync = SparseWeightSync(state, layout=fused_layout(model))
    first = sync.update()
    late_worker = FakeWorker(model)
    values_only = sync.update()
    assert values_only.indices == {} and values_only.version == first.version
    with pytest.raises(ValueError, match="sparse update of mask version 1, but this engine holds the indices of version None"):
        late_worker.apply_sparse_update(values_only)
    late_worker.apply_sparse_update(first)
    late_worker.apply_sparse_update(values_only)


def test_fused_layout_stacks_qkv_and_gate_up_by_rows_with_biases():
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    layout = fused_layout(model)
    q, k = 32 * 32, 16 * 32  # q: 32 rows, k and v: 16 rows (2 of 4 heads), 32 columns each
    prefix = "model.layers.1.self_attn."
    assert layout[prefix + "q_proj.weight"] == Target(prefix + "qkv_proj.weight", 0)
    assert layout[prefix + "k_proj.weight"] == Target(prefix + "qkv_proj.weight", q)
    assert layout[prefix + "v_proj.weight"] == Target(prefix + "qkv_proj.weight", q + k)
    assert layout[prefix + "v_proj.bias"] == Target(prefix + "qkv_proj.bias", 32 + 16)
    assert layout["model.layers.0.mlp.up_proj.weight"] == Target("model.layers.0.mlp.gate_up_proj.weight", 48 * 32)
    assert layout["model.layers.0.mlp.down_proj.weight"] == Target("model.layers.0.mlp.down_proj.weight", 0)
    assert {target.name.rsplit(".", 2)[-2] for target in layout.values()} >= {"qkv_proj", "gate_up_proj"}
    assert set(FUSED) == {"self_attn.qkv_proj", "mlp.gate_up_proj"}
    # a fine-tune of a Qwen2 model (biased q/k/v) syncs into the fused engine bitwise
    llm = FakeLLM(model, workers=1)
    state = attached(model, random_masks(model, sparsity=0.95, seed=4))
    optimizer = SparseAdamW(state, lr=1e-2)
    sync = SparseWeightSync(state, layout=layout)
    step(model, optimizer, 0)
    llm.collective_rpc("apply_sparse_update", args=(sync.update(),))
    assert_engine_equals_trainer(llm, model)


class FusedEngineModel(FusedWeights):
    """The fake engine's model also loads dense weights by trainer name, as vLLM's ``load_weights`` does."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.layout = fused_layout(model)

    def load_weights(self, weights) -> None:
        for name, value in weights:
            target = self.layout[name]
            self.params[target.name][target.offset: target.offset + value.numel()] = value.reshape(-1)


@dataclass
class Params:
    """The fields of ``vllm.SamplingParams`` the engine sets."""

    n: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: list | None
    stop_token_ids: list


class FakeVLLM(FakeLLM):
    """``vllm.LLM``: ``collective_rpc`` to its workers, and greedy ``generate`` from worker 0's weights."""

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.workers = [FakeWorker(model) for _ in range(2)]
        for worker in self.workers:
            worker.model = FusedEngineModel(model)
        self.shadow = copy.deepcopy(model)  # runs the engine's weights, never the trainer's
        self.tokenizer = tokenizer

    def generate(self, prompts, params, use_tqdm=False):
        assert params.temperature == 0.0 and params.n == 1 and params.stop_token_ids == [self.tokenizer.eos_token_id]
        weights = self.workers[0].model.unfused(self.shadow)
        with torch.no_grad():
            for name, param in self.shadow.named_parameters():
                param.copy_(weights[name])
        contexts = [prompt["prompt_token_ids"] for prompt in prompts]
        sampled = HFEngine().sample_turn(self.shadow, self.tokenizer, contexts,
                                         SamplingConfig(max_completion_length=params.max_tokens, greedy=True))
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=tokens, finish_reason="length" if cut else "stop")])
                for tokens, cut in sampled]


class FakeParamsEngine(VLLMEngine):
    def sampling_params_class(self) -> type:
        return Params


@pytest.mark.parametrize("masked", [True, False])
def test_the_vllm_engine_samples_from_weights_synced_after_every_step(masked):
    model, tok = make_tiny_chat_lm(seed=5, hidden=48, layers=2)
    llm = FakeVLLM(model, tok)
    engine = FakeParamsEngine(llm=llm)
    state = attached(model, random_masks(model, sparsity=0.99, seed=1)) if masked else None
    optimizer = SparseAdamW(state, lr=0.05) if masked else torch.optim.AdamW(model.parameters(), lr=0.05)
    contexts = [tok("Sort: b, a", add_special_tokens=False)["input_ids"]] * 2
    greedy = SamplingConfig(max_completion_length=6, greedy=True)
    for seed in range(3):
        step(model, optimizer, seed)
        engine.load_weights(model, state)
        assert engine.sample_turn(model, tok, contexts, greedy) == HFEngine().sample_turn(model, tok, contexts, greedy)
        assert_engine_equals_trainer(llm, model)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert engine.bytes_sent == (engine.sync.bytes_sent if masked else 3 * dense_bytes)


def test_the_vllm_engine_needs_a_started_llm_or_a_model():
    with pytest.raises(ValueError, match="VLLMEngine needs a started vllm.LLM"):
        VLLMEngine()
    assert make_engine("vllm", model="Qwen/Qwen2.5-0.5B-Instruct").model_name == "Qwen/Qwen2.5-0.5B-Instruct"
