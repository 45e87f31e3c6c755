"""The decode step computed from a Llama-family model's modules gives bitwise the logits of its forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from mthlib.grpo.decode_step import decode_logits, supports_decode_step
from mthlib.grpo.kv_cache import prefill
from tests.conftest import make_tiny_lm


def tiny(kind: str, qwen2_heads: int = 4) -> torch.nn.Module:
    """A tiny Llama (4 query heads on 2 key heads, 3 layers), one with untied embeddings, or a Qwen2
    (q/k/v biases, ``qwen2_heads`` query heads of 8 dimensions on 2 key heads)."""
    if kind == "qwen2":
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=64, hidden_size=8 * qwen2_heads, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=qwen2_heads, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, eos_token_id=2)
        return AutoModelForCausalLM.from_config(config).eval()
    return make_tiny_lm(tie=kind != "untied", layers=3)


PADDED = [[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # shared and left-padded rows
UNPADDED = [[5, 6, 7], [5, 6, 7], [10, 11, 12], [12, 13, 14]]  # the forward then attends without a mask


@pytest.mark.parametrize("contexts", [PADDED, UNPADDED], ids=["padded", "unpadded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama", "untied", "qwen2"])
def test_decode_logits_are_bitwise_the_forwards_over_several_steps(kind, dtype, contexts):
    model = tiny(kind).to(dtype)
    assert supports_decode_step(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, ours_cache, mask, last = prefill(model, contexts, pad_id=0, max_new_tokens=6)
        _, their_cache, _, _ = prefill(model, contexts, pad_id=0, max_new_tokens=6)
        for _ in range(6):
            tokens = torch.randint(3, 64, (len(contexts),), generator=gen)
            mask = torch.cat([mask, mask.new_ones(len(contexts), 1)], dim=1)
            last = last + 1
            ours = decode_logits(model, tokens, last, mask, ours_cache)
            theirs = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                           cache=their_cache, use_cache=True).logits[:, -1]
            assert ours.shape == (len(contexts), 64)
            assert torch.equal(ours, theirs)
            for ours_layer, their_layer in zip(ours_cache.layers, their_cache.layers):
                assert torch.equal(ours_layer.keys, their_layer.keys) and torch.equal(ours_layer.values, their_layer.values)


def test_models_not_written_as_llama_or_qwen2_with_full_sdpa_attention_are_not_supported():
    eager = make_tiny_lm()
    eager.config._attn_implementation = "eager"
    assert not supports_decode_step(eager)
    torch.manual_seed(0)
    sliding = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1))
    assert "sliding_attention" in sliding.config.layer_types and not supports_decode_step(sliding)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4))
    assert not supports_decode_step(gpt2)
