"""Model loading: local folders, clear errors, and the embedded default (slow)."""

import pytest
import torch

from mthlib.models import EMBEDDED, embedded_gguf_path, load_model
from tests.conftest import make_tiny_chat_lm


def test_loads_a_local_folder_with_its_tokenizer(tmp_path):
    model, tokenizer = make_tiny_chat_lm(seed=2)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, loaded_tokenizer = load_model(str(tmp_path / "m"))
    assert not loaded.training and loaded_tokenizer.pad_token is not None
    for p, q in zip(model.parameters(), loaded.parameters()):
        assert torch.equal(p, q)
    half, _ = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("path", ["does/not/exist", "no-such-hub-model"])
def test_missing_model_is_one_clear_error(path):
    with pytest.raises(FileNotFoundError, match=f"cannot load model '{path}'"):
        load_model(path)


def test_broken_folder_is_one_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        load_model(str(tmp_path))


def test_unknown_dtype_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        load_model(EMBEDDED, dtype="int8")


def test_the_embedded_gguf_ships_with_the_package():
    assert embedded_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_embedded_model_loads_and_generates(tmp_path, monkeypatch):
    monkeypatch.setenv("MTH_CACHE", str(tmp_path))
    model, tokenizer = load_model(EMBEDDED)
    assert model.config.tie_word_embeddings and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi"}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    again, _ = load_model(EMBEDDED)  # the second load reads the cached safetensors folder
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
