"""Rollout engines: the native decode loop against Hugging Face ``generate`` on a tiny model."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from mthlib.envs.base import Episode
from mthlib.grpo.engines import (
    HFEngine, NativeEngine, SamplingConfig, draw, make_engine, next_token_scores, top_k_candidates,
)
from mthlib.grpo.kv_cache import PreallocatedLayer, prefill
from mthlib.grpo.policy_copy import PackedLinear, copy_weights, packing_supported
from mthlib.grpo.rollout import generate_rollout
from mthlib.masking import SparseState, build_mask
from mthlib.models import load_model
from tests.conftest import make_tiny_chat_lm


def contexts_of(tok, texts, repeat):
    """Each text tokenized, repeated ``repeat`` times in a row (a GRPO group per prompt)."""
    return [tok(text, add_special_tokens=False)["input_ids"] for text in texts for _ in range(repeat)]


def varied_lm(seed, hidden=48, layers=3):
    """The tiny chat model with larger random weights: its greedy text varies instead of repeating one token."""
    model, tok = make_tiny_chat_lm(seed=seed, hidden=hidden, layers=layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15)
    return model, tok


def stop_early(model, tok, context):
    """Make a token the greedy text after ``context`` first reaches at step >= 2 the end token; return that step."""
    greedy = HFEngine().sample_turn(model, tok, [context], SamplingConfig(max_completion_length=12, greedy=True))[0][0]
    step = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i] and greedy[i] != tok.pad_token_id)
    tok.eos_token = tok.convert_ids_to_tokens(greedy[step])
    return step


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_native_equals_generate_token_for_token(seed):
    model, tok = varied_lm(seed)
    contexts = contexts_of(tok, ["Sort: b, a", "x", "a much longer prompt, left padded", "x"], repeat=3)
    step = stop_early(model, tok, contexts[0])  # rows of the first prompt end early
    greedy = SamplingConfig(max_completion_length=12, greedy=True)
    native = NativeEngine().sample_turn(model, tok, contexts, greedy)
    reference = HFEngine().sample_turn(model, tok, contexts, greedy)
    assert native == reference
    assert native[0][1] is False and len(native[0][0]) == step + 1 and native[0][0][-1] == tok.eos_token_id
    assert len({tuple(tokens) for tokens, _ in native}) == 3  # three distinct prompts, three distinct texts


def test_shared_prefix_kv_gives_the_logits_of_a_separate_prefill_per_completion():
    model, tok = varied_lm(3)
    contexts = contexts_of(tok, ["first prompt", "2nd", "a third, longer prompt"], repeat=4)
    shared = prefill(model, contexts, tok.pad_token_id, share=True)
    separate = prefill(model, contexts, tok.pad_token_id, share=False)
    assert torch.allclose(shared[0], separate[0], atol=1e-5)
    # decode the same next tokens through both caches: the logits stay equal step after step
    tokens = shared[0].argmax(dim=-1)
    states = [list(shared), list(separate)]
    for _ in range(3):
        outs = []
        for state in states:
            logits, cache, mask, last = state
            mask = torch.cat([mask, mask.new_ones(len(contexts), 1)], dim=1)
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=(last + 1)[:, None],
                        cache=cache, use_cache=True)
            state[:] = [out.logits[:, -1], cache, mask, last + 1]
            outs.append(out.logits[:, -1])
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
        tokens = outs[0].argmax(dim=-1)
    assert shared[1].get_seq_length() == separate[1].get_seq_length()


def test_the_preallocated_cache_holds_what_a_dynamic_cache_holds():
    """Prefill, decode steps past the planned capacity (the buffer grows), rows leaving: same keys and values."""
    generator = torch.Generator().manual_seed(0)
    ours, reference = PreallocatedLayer(capacity=5), DynamicLayer()
    chunks = [3, 1, 1, 1, 1, 1]  # a 3-token prefill, then single tokens up to 8 > capacity 5
    batch = 4
    for step, length in enumerate(chunks):
        if step == 3:  # rows 1 and 3 finish
            index = torch.tensor([0, 2])
            ours.batch_select_indices(index)
            reference.batch_select_indices(index)
            batch = 2
        keys, values = (torch.randn(batch, 2, length, 8, generator=generator) for _ in range(2))
        got, expected = ours.update(keys, values), reference.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert ours.get_seq_length() == reference.get_seq_length()
    assert ours.get_seq_length() == 8


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.7, 0, 1.0), (1.0, 5, 1.0), (0.7, 50, 0.9), (1.3, 0, 0.5)])
def test_sampling_filters_match_generates_warpers(temperature, top_k, top_p):
    logits = torch.randn(6, 97, generator=torch.Generator().manual_seed(0)) * 3
    expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = next_token_scores(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])


def test_draw_samples_each_row_from_its_distribution_and_never_a_removed_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.9, 0.0, 0.1, 0.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([draw(probs, generator) for _ in range(4000)])
    assert draws.shape == (4000, 3)
    frequencies = torch.stack([torch.bincount(draws[:, row], minlength=6).float() / len(draws) for row in range(3)])
    assert frequencies[probs == 0].sum() == 0  # removed tokens, first and last included, are never drawn
    assert (frequencies - probs).abs().max() < 0.03
    assert torch.equal(draw(probs, torch.Generator().manual_seed(7)), draw(probs, torch.Generator().manual_seed(7)))


@pytest.mark.parametrize("grid", [None, 1 / 16, 8.0])  # exact logits; bf16-like ties; ties past 2k (whole-row path)
@pytest.mark.parametrize(("top_k", "top_p"), [(50, 1.0), (50, 0.9), (3, 0.5)])
def test_top_k_sampling_draws_the_tokens_filtering_the_whole_row_draws(grid, top_k, top_p):
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(0)) * 3
    if grid is not None:
        logits = torch.round(logits / grid) * grid
    sampling = SamplingConfig(temperature=0.7, top_k=top_k, top_p=top_p)
    candidates = top_k_candidates(logits, top_k)
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    if grid == 8.0:
        assert candidates is None  # ties at the k-th value run past 2k candidates
    else:
        values, ids = candidates
        assert torch.equal(torch.isfinite(values).sum(-1), (logits >= kth).sum(-1))  # every tie kept
        assert torch.equal(values[torch.isfinite(values)], logits.gather(1, ids)[torch.isfinite(values)])
        assert bool((ids.diff(dim=-1) > 0).all())  # vocabulary order
    engine = NativeEngine(seed=3)
    whole_row = torch.Generator().manual_seed(3)
    for _ in range(5):
        expected = draw(next_token_scores(logits, sampling).softmax(dim=-1), whole_row)
        assert torch.equal(engine._pick(logits, sampling), expected)


def test_native_sampling_is_reproducible_by_seed():
    model, tok = varied_lm(4)
    contexts = contexts_of(tok, ["abc", "de"], repeat=4)
    sampling = SamplingConfig(max_completion_length=8, temperature=0.9, top_k=20)
    first = NativeEngine(seed=5).sample_turn(model, tok, contexts, sampling)
    assert NativeEngine(seed=5).sample_turn(model, tok, contexts, sampling) == first
    assert NativeEngine(seed=6).sample_turn(model, tok, contexts, sampling) != first
    assert len({tuple(tokens) for tokens, _ in first[:4]}) > 1  # a group's completions differ


def test_native_token_distribution_matches_generate():
    """Two-token continuations of one prompt, 3,000 draws from each engine: same distribution."""
    model, tok = make_tiny_chat_lm(seed=5, hidden=16, layers=1)
    with torch.no_grad():  # flatten the tiny model's logits so many tokens are drawn
        model.lm_head.weight.mul_(0.05)
    sampling = SamplingConfig(max_completion_length=2, temperature=0.8, top_k=12, top_p=0.95)
    contexts = contexts_of(tok, ["Sort: b, a"], repeat=3000)
    torch.manual_seed(0)
    hf = HFEngine().sample_turn(model, tok, contexts, sampling)
    native = NativeEngine(seed=0).sample_turn(model, tok, contexts, sampling)
    for position in (0, 1):
        counts = [torch.bincount(torch.tensor([row[0][position] for row in draws]), minlength=len(tok)).float()
                  for draws in (hf, native)]
        assert (counts[0] > 0).sum() >= 5  # a real spread of tokens, not a near-greedy case
        # chi-square two-sample test over tokens seen at least 5 times in total
        seen = (counts[0] + counts[1]) >= 5
        a, b = counts[0][seen], counts[1][seen]
        chi2 = float((((a - b) ** 2) / (a + b)).sum())
        dof = int(seen.sum()) - 1
        assert chi2 < dof + 4 * (2 * dof) ** 0.5 + 10, (position, chi2, dof)
    # the first token's frequencies match the exact filtered distribution
    logits = prefill(model, contexts[:1], tok.pad_token_id)[0]
    probs = next_token_scores(logits, sampling).softmax(dim=-1)[0]
    first = torch.bincount(torch.tensor([row[0][0] for row in native]), minlength=len(tok)).float() / 3000
    assert (first - probs).abs().sum() / 2 < 0.06
    assert first[probs == 0].sum() == 0


def test_stop_strings_end_rows_in_both_engines():
    model, tok = varied_lm(0)
    contexts = contexts_of(tok, ["hello", "xyz"], repeat=2)
    free = HFEngine().sample_turn(model, tok, contexts, SamplingConfig(max_completion_length=10, greedy=True))
    stop = tok.decode(free[0][0][2:4])  # two characters the first rows produce at steps 2-3
    assert stop not in tok.decode(free[0][0][:3])
    greedy = SamplingConfig(max_completion_length=10, greedy=True, stop_strings=(stop,))
    native = NativeEngine().sample_turn(model, tok, contexts, greedy)
    assert native == HFEngine().sample_turn(model, tok, contexts, greedy)
    assert native[0] == (free[0][0][:4], False)


def test_a_bf16_copy_samples_what_the_policy_loaded_in_bf16_samples(tmp_path):
    model, tok = varied_lm(5)
    contexts = contexts_of(tok, ["Sort: b, a", "a much longer prompt"], repeat=2)
    greedy = SamplingConfig(max_completion_length=10, greedy=True)
    engine = NativeEngine(dtype="bfloat16")
    batches = []
    for change in range(2):  # the copy follows the policy's weights from one batch to the next
        if change:
            with torch.no_grad():
                model.model.layers[0].mlp.down_proj.weight.mul_(-3)
        model.save_pretrained(tmp_path / str(change))
        tok.save_pretrained(tmp_path / str(change))
        in_bf16, _ = load_model(str(tmp_path / str(change)), "bfloat16")
        engine.load_weights(model, None)
        batches.append(engine.sample_turn(model, tok, contexts, greedy))
        assert batches[-1] == NativeEngine().sample_turn(in_bf16, tok, contexts, greedy)
        for name, weight in copy_weights(engine.policy_copy(model)).items():
            assert weight.dtype == torch.bfloat16 and torch.equal(weight, in_bf16.get_parameter(name)), name
    assert batches[0] != batches[1]  # the change shows in the samples: a stale copy would fail above
    engine.release_weights()  # between batches the copy holds no packed weights, and sampling needs a load
    with pytest.raises(RuntimeError, match=r"load_weights\(model, state\) must run before sampling from a copy"):
        engine.sample_turn(model, tok, contexts, greedy)
    engine.load_weights(model, None)
    assert engine.sample_turn(model, tok, contexts, greedy) == batches[1]
    assert model.dtype == torch.float32  # the policy itself is untouched


def test_a_bf16_policy_samples_from_its_own_weights_packed_where_the_cpu_packs_them(tmp_path):
    fp32, tok = varied_lm(7)
    fp32.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), "bfloat16")
    contexts = contexts_of(tok, ["Sort: b, a", "a much longer prompt"], repeat=2)
    greedy = SamplingConfig(max_completion_length=10, greedy=True)
    engine = NativeEngine(dtype="bfloat16")
    engine.load_weights(model, None)
    sampler = engine.policy_copy(model)
    packs = packing_supported(torch.bfloat16, model.device)
    assert (sampler is not model) == packs  # a copy only to hold the packed layout
    assert any(isinstance(module, PackedLinear) for module in sampler.modules()) == packs
    for name, weight in copy_weights(sampler).items():
        assert torch.equal(weight, model.get_parameter(name)), name  # the policy's bf16 weights, bitwise
    assert engine.sample_turn(model, tok, contexts, greedy) == NativeEngine().sample_turn(model, tok, contexts, greedy)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(-2)
    engine.load_weights(model, None)  # the next batch samples from the changed weights
    assert torch.equal(copy_weights(engine.policy_copy(model))["model.layers.1.mlp.up_proj.weight"],
                       model.model.layers[1].mlp.up_proj.weight)
    assert NativeEngine().policy_copy(model) is model  # without a rollout dtype nothing is copied


def test_a_masked_runs_bf16_copy_follows_its_trained_entries():
    model, _ = varied_lm(6)
    state = SparseState.capture(model, build_mask("random", sparsity=0.9, seed=0).compute(model, None)).attach(model)
    engine = NativeEngine(dtype="bfloat16")
    for step in range(3):
        if step:
            with torch.no_grad():
                state.load_trained_values({name: values + 0.5 for name, values in state.trained_values().items()})
        engine.load_weights(model, state)
        weights = copy_weights(engine.policy_copy(model))
        assert set(weights) == {name for name, _ in model.named_parameters(remove_duplicate=False)}
        for name, weight in weights.items():
            assert torch.equal(weight, model.get_parameter(name).to(torch.bfloat16)), (step, name)


def test_weights_of_loads_for_the_block_and_releases_after_it_even_on_an_error():
    model, tok = varied_lm(3)
    contexts = contexts_of(tok, ["ab"], 1)
    engine = NativeEngine(dtype="bfloat16")
    with engine.weights_of(model, None):
        assert engine.sample_turn(model, tok, contexts, SamplingConfig(max_completion_length=3, greedy=True))
    with pytest.raises(ValueError, match="inside the block"):
        with engine.weights_of(model, None):
            raise ValueError("inside the block")
    with pytest.raises(RuntimeError, match="must run before sampling from a copy"):
        engine.policy_copy(model)


def test_rollout_dtype_is_checked():
    with pytest.raises(ValueError, match="rollout_dtype 'bfloat16' needs rollout_engine native"):
        make_engine("hf", rollout_dtype="bfloat16")
    with pytest.raises(ValueError, match="unknown rollout dtype 'int8'; allowed: float32, bfloat16, float16"):
        NativeEngine(dtype="int8")
    model, tok = varied_lm(2)
    with pytest.raises(RuntimeError, match=r"load_weights\(model, state\) must run before sampling from a copy"):
        NativeEngine(dtype="bfloat16").sample_turn(model, tok, contexts_of(tok, ["ab"], 1), SamplingConfig(greedy=True))


def test_rollouts_through_either_engine_agree_when_greedy():
    model, tok = varied_lm(1)
    episodes = [Episode(user_turns=("ab", "cd"), answer=None)] * 2 + [Episode(user_turns=("e",), answer=None)]
    greedy = SamplingConfig(max_completion_length=6, greedy=True)
    hf = generate_rollout(model, tok, episodes, greedy, make_engine("hf"))
    native = generate_rollout(model, tok, episodes, greedy, make_engine("native"))
    assert torch.equal(hf.input_ids, native.input_ids) and torch.equal(hf.loss_mask, native.loss_mask)
    assert hf.replies == native.replies


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown rollout engine 'vllm2'; allowed: hf, native, vllm"):
        make_engine("vllm2")


@pytest.mark.slow
def test_greedy_native_equals_generate_on_the_embedded_model():
    from mthlib.envs import AlphabetSort
    from mthlib.grpo.rollout import prompt_tokens

    model, tok = load_model("embedded")
    episodes = AlphabetSort(min_turns=1, max_turns=1, max_names_per_turn=3).evaluation_episodes(2001, 8)
    contexts = [prompt_tokens(tok, episode) for episode in episodes for _ in range(2)]
    greedy = SamplingConfig(max_completion_length=32, greedy=True)
    assert NativeEngine().sample_turn(model, tok, contexts, greedy) == HFEngine().sample_turn(model, tok, contexts, greedy)


@pytest.mark.slow
def test_a_compiled_decode_step_gives_the_same_greedy_tokens():
    model, tok = varied_lm(2, hidden=32, layers=2)
    contexts = contexts_of(tok, ["Sort: b, a", "xy"], repeat=2)
    greedy = SamplingConfig(max_completion_length=6, greedy=True)
    engine = NativeEngine(compile=True)
    assert engine.sample_turn(model, tok, contexts, greedy) == HFEngine().sample_turn(model, tok, contexts, greedy)
