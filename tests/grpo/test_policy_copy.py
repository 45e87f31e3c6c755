import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config

from mthlib.grpo.policy_copy import PackedLinear, PolicyCopy, copy_weights, packing_supported
from mthlib.models import load_model
from tests.conftest import make_tiny_chat_lm

CPU = torch.device("cpu")
needs_packing = pytest.mark.skipif(not packing_supported(torch.bfloat16, CPU), reason="no oneDNN bf16 kernels here")


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(16, 576), (3, 7, 48), (1, 1, 96)])
def test_packed_linear_is_bitwise_f_linear_in_bf16(shape, bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, shape[-1], generator=generator)
    b = torch.randn(40, generator=generator) if bias else None
    x = torch.randn(*shape, generator=generator).bfloat16()
    packed = PackedLinear(40, shape[-1])
    packed.load(weight, b)  # an fp32 weight is rounded to bf16
    expected = F.linear(x, weight.bfloat16(), None if b is None else b.bfloat16())
    assert torch.equal(packed(x), expected)
    assert torch.equal(packed.packed.to_dense(), weight.bfloat16())


def test_packed_linear_refuses_a_weight_of_another_shape_and_a_forward_before_loading():
    packed = PackedLinear(4, 8)
    with pytest.raises(ValueError, match=r"weight of shape \(8, 4\) for a PackedLinear of \(4, 8\)"):
        packed.load(torch.zeros(8, 4), None)
    with pytest.raises(RuntimeError, match=r"PackedLinear.load\(weight, bias\) must run before its forward"):
        packed(torch.zeros(2, 8))


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags() context, not ours
def test_packing_is_only_for_bf16_on_a_cpu_with_onednn():
    assert not packing_supported(torch.float32, CPU)
    assert not packing_supported(torch.float16, CPU)
    assert not packing_supported(torch.bfloat16, torch.device("meta"))
    with torch.backends.mkldnn.flags(enabled=False):
        assert not packing_supported(torch.bfloat16, CPU)
    model, _ = make_tiny_chat_lm(seed=1, hidden=16, layers=1)
    copy = PolicyCopy(model, torch.float16)
    assert not any(isinstance(m, PackedLinear) for m in copy.model.modules())
    copy.load()
    assert all(torch.equal(w, model.get_parameter(n).half()) for n, w in copy_weights(copy.model).items())


def tiny_policy(kind: str):
    """A tiny Llama (``llama``), one with tied embeddings (``tied``) or a Qwen2 (``qwen2``: q/k/v biases)."""
    model, tok = make_tiny_chat_lm(seed=3, hidden=48, layers=2)
    if kind == "tied":
        model.config.tie_word_embeddings = True
        model.tie_weights()
    if kind == "qwen2":
        torch.manual_seed(3)
        config = Qwen2Config(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
        model = AutoModelForCausalLM.from_config(config)
    return model, tok


@needs_packing
@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2"])
def test_a_packed_bf16_copy_computes_the_logits_of_the_policy_loaded_in_bf16(kind, tmp_path):
    model, tok = tiny_policy(kind)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)  # every weight away from its bf16 rounding
    copy = PolicyCopy(model, torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert sum(isinstance(m, PackedLinear) for m in copy.model.modules()) == len(linears)
    copy.load()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    in_bf16, _ = load_model(str(tmp_path), "bfloat16")
    ids = torch.randint(0, len(tok), (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy.model(input_ids=ids).logits, in_bf16(input_ids=ids).logits)
    weights = copy_weights(copy.model)
    assert set(weights) == {name for name, _ in model.named_parameters(remove_duplicate=False)}
    copy.release()
    assert not copy.loaded and all(m.packed is None for m in copy.model.modules() if isinstance(m, PackedLinear))
    copy.load()
    with torch.no_grad():
        assert torch.equal(copy.model(input_ids=ids).logits, in_bf16(input_ids=ids).logits)
    assert all(torch.equal(weights[name], in_bf16.get_parameter(name)) for name in weights)
    assert any(name.endswith(".bias") for name in weights) == (kind == "qwen2")
