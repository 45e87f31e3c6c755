"""Model loading: local folders, Hub ids through a local fake cache (offline), clear errors, and the embedded default (slow)."""

import json
import os
import subprocess
import sys

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


HUB_PROBE = """
import json, sys
from mthlib.models import load_model
model, tokenizer = load_model("fake-org/tiny-chat")
out = {"params": [p.detach().flatten()[:5].tolist() for p in model.parameters()], "vocab": len(tokenizer)}
try:
    load_model("fake-org/not-cached")
except FileNotFoundError as err:
    out["error"] = str(err)
print(json.dumps(out))
"""


def test_a_hub_id_loads_from_the_hugging_face_cache_offline(tmp_path):
    """A Hub id resolves through ``HF_HUB_CACHE`` with ``HF_HUB_OFFLINE=1``: the fake cache's model, never the network."""
    model, tokenizer = make_tiny_chat_lm(seed=4)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fake-org--tiny-chat"
    model.save_pretrained(repo / "snapshots" / commit)
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", HUB_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["params"] == [p.detach().flatten()[:5].tolist() for p in model.parameters()]
    assert out["vocab"] == len(tokenizer)
    assert out["error"].startswith("cannot load model 'fake-org/not-cached': no such folder; as a Hub id: not in the "
                                   "Hugging Face cache, and HF_HUB_OFFLINE is set")
    assert "\n" not in out["error"]
