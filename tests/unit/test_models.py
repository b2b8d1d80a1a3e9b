"""The tiny model and tokenizer: deterministic, atomic, and loadable like any HF checkpoint."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.models import (
    EOS_TOKEN,
    IM_END,
    IM_START,
    ensure_tiny_model,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
    stop_token_ids,
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


def test_creation_is_deterministic(tiny: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(tmp_path / "again")
    other = ensure_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert sha256(tiny / name) == sha256(again / name), name
    assert sha256(tiny / "model.safetensors") != sha256(other / "model.safetensors")


def test_existing_model_is_reused(tiny: Path) -> None:
    before = (tiny / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tiny, seed=123) == tiny
    assert (tiny / "model.safetensors").stat().st_mtime_ns == before


def test_a_cached_model_gets_the_current_chat_template(tmp_path: Path) -> None:
    model = ensure_tiny_model(tmp_path / "old")
    cfg_path = model / "tokenizer_config.json"
    current = cfg_path.read_text()
    cfg = json.loads(current)
    cfg["chat_template"] = "{{ 'an older template' }}"
    cfg_path.write_text(json.dumps(cfg))
    weights = sha256(model / "model.safetensors")
    ensure_tiny_model(model)
    assert cfg_path.read_text() == current and sha256(model / "model.safetensors") == weights
    # Someone else's checkpoint (not relayrl's tokenizer) is never touched.
    cfg["additional_special_tokens"] = ["<other>"]
    cfg_path.write_text(json.dumps(cfg))
    ensure_tiny_model(model)
    assert json.loads(cfg_path.read_text())["chat_template"] == "{{ 'an older template' }}"


def test_concurrent_creation_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "shared" / "tiny"
    results: list[Any] = []

    def build() -> None:
        try:
            results.append(ensure_tiny_model(target))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target, target]
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temp dirs left behind
    load_causal_lm(target)


def test_tokenizer_and_chat_template(tiny: Path) -> None:
    tok = load_tokenizer(tiny)
    assert len(tok) == 512
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN
    for special in (EOS_TOKEN, IM_START, IM_END):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.decode(ids, skip_special_tokens=True) == ""
    text = "Hello, world! 12 + 30 = 42\n  def f(x):\n\ttabs, ünïcödé 日本"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: every string round-trips
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n<|im_start|>assistant\n"
    cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_model_config_and_stop_tokens(tiny: Path) -> None:
    tok = load_tokenizer(tiny)
    model = load_causal_lm(tiny, "cpu", torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tok) and model.config.max_position_embeddings == 1024
    expected = {tok.convert_tokens_to_ids(IM_END), tok.eos_token_id}
    assert set(model.generation_config.eos_token_id) == expected
    assert stop_token_ids(model, tok) == expected
    out = model.generate(torch.tensor([tok("hi")["input_ids"]]), max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= len(tok("hi")["input_ids"]) + 3


def test_resolve_model(tiny: Path, tmp_path: Path) -> None:
    assert resolve_model("tiny", tmp_path / "cache") == tmp_path / "cache" / "tiny"
    assert (tmp_path / "cache" / "tiny" / "config.json").exists()
    assert resolve_model(str(tiny), tmp_path / "cache") == tiny
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        resolve_model("org/some-hub-model", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path / "cache")


def test_saved_checkpoint_round_trips(tiny: Path, tmp_path: Path) -> None:
    model = load_causal_lm(tiny)
    model.save_pretrained(tmp_path / "ckpt")
    load_tokenizer(tiny).save_pretrained(tmp_path / "ckpt")
    reloaded = load_causal_lm(resolve_model(str(tmp_path / "ckpt")))
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
