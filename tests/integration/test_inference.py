"""The inference service through its real FastAPI app (and once as a real process)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from services.inference.api import create_app
from services.inference.engine import TorchEngine
from services.inference.settings import Settings
from shared.config import ConfigError
from shared.models import ensure_tiny_model, load_causal_lm, load_tokenizer, resolve_model
from tests.support.inference_app import running, settings as inference_settings
from tests.support.secrets import AUTH, INFERENCE_TOKEN

ROOT = Path(__file__).resolve().parents[2]


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture, different seed: stands in for weights the trainer produced."""
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-seed1", seed=1)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Any:
    return load_tokenizer(model_path)


def _settings(model_path: Path, **overrides: Any) -> Settings:
    return inference_settings(model_path, **{"batch_wait_ms": 20.0, **overrides})


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, TorchEngine]]:
    async with running(settings) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inference", timeout=60, headers=AUTH) as client:
            engine = app.state.runtime.engine
            assert engine is not None
            yield client, engine


@pytest.fixture(scope="module")
async def served(model_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, TorchEngine]]:
    async with serve(_settings(model_path)) as pair:
        yield pair


@pytest.fixture
def client(served: tuple[httpx.AsyncClient, TorchEngine]) -> httpx.AsyncClient:
    return served[0]


@pytest.fixture
def engine(served: tuple[httpx.AsyncClient, TorchEngine]) -> TorchEngine:
    return served[1]


async def complete(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


async def chat(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/v1/chat/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def reference_logprobs(model: Any, prompt: list[int], tokens: list[int], temperature: float) -> list[float]:
    """What a trainer computes: one unpadded forward, log-softmax of temperature-scaled logits."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    scale = temperature if temperature > 0 else 1.0
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1] / scale, dim=-1)
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def reference_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


# --- health and metadata ---------------------------------------------------------------------


async def test_health_models_stats(client: httpx.AsyncClient, engine: TorchEngine) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = (await client.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["policy_version"] == engine.version
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and models["data"][0]["max_model_len"] == 1024
    stats = (await client.get("/v1/stats")).json()
    assert {"requests_finished", "generated_tokens", "batch_sizes", "policy_version"} <= stats.keys()


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("GET", "/v1/stats"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")],
)
async def test_v1_routes_need_the_workers_token(
    served: tuple[httpx.AsyncClient, TorchEngine], method: str, path: str
) -> None:
    client, _ = served
    body = {"prompt": "hi", "max_tokens": 2} if path == "/v1/completions" else {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}  # fmt: skip
    refusals = {
        "no header": {},
        "wrong token": {"Authorization": f"Bearer {INFERENCE_TOKEN}x"},
        "not bearer": {"Authorization": f"Basic {INFERENCE_TOKEN}"},
        "empty bearer": {"Authorization": "Bearer "},
    }
    async with httpx.AsyncClient(transport=client._transport, base_url="http://inference", timeout=60) as bare:
        for why, headers in refusals.items():
            r = await bare.request(method, path, json=body if method == "POST" else None, headers=headers)
            assert r.status_code == 401, (why, r.status_code, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            error = r.json()["error"]
            assert error["type"] == "authentication_error" and "RELAYRL_INFERENCE_TOKEN" in error["message"], why
            assert INFERENCE_TOKEN not in r.text  # a refusal never echoes the secret
        # An invalid body without a token is still 401: nothing about the request is looked at first.
        assert (await bare.post("/v1/completions", json={"prompt": []})).status_code == 401
        # Probes stay open.
        assert (await bare.get("/healthz")).status_code == 200
        assert (await bare.get("/readyz")).status_code == 200
    r = await client.request(method, path, json=body if method == "POST" else None)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_max_tokens_past_the_context_is_400_with_the_reason(client: httpx.AsyncClient, path: str) -> None:
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    for field in ("max_tokens", "max_completion_tokens") if path == "/v1/chat/completions" else ("max_tokens",):
        r = await client.post(path, json={**body, field: 1024})  # the tiny model's whole context, plus the prompt
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "maximum context length is 1024 tokens" in error["message"] and "asks for 1024 more" in error["message"]
    r = await client.post(path, json={**body, "max_tokens": 10**30})  # absurd, still a clear 400 and no 500
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


def test_app_refuses_to_start_without_its_secrets(model_path: Path) -> None:
    with pytest.raises(ConfigError, match="RELAYRL_INFERENCE_TOKEN"):
        create_app(_settings(model_path, inference_token=None))
    with pytest.raises(ConfigError, match="too short"):
        create_app(_settings(model_path, inference_token="short"))
    # A replica that follows the trainer must be able to verify its weights.
    with pytest.raises(ConfigError, match="RELAYRL_WEIGHTS_KEY"):
        create_app(_settings(model_path, watch_policy=True, weights_key=None))
    create_app(_settings(model_path, weights_key=None))  # fixed weights (--no-watch-policy): no key needed


def test_process_without_a_token_exits_with_the_reason() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RELAYRL_INFERENCE_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.inference", "--port", "0", "--no-watch-policy"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "inference_token is not set" in proc.stderr and "RELAYRL_INFERENCE_TOKEN" in proc.stderr


async def test_readyz_is_503_while_loading(model_path: Path) -> None:
    app = create_app(_settings(model_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inference", headers=AUTH) as c:
            first = await c.get("/readyz")  # the model loads in a thread; we asked at once
            assert (await c.get("/healthz")).status_code == 200
            if first.status_code == 503:
                assert first.json()["status"] == "loading"
                r = await c.post("/v1/completions", json={"prompt": "hi"})
                assert r.status_code in (200, 503)


async def test_missing_model_fails_health(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path / "nope"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inference", headers=AUTH) as c:
            for _ in range(200):
                r = await c.get("/readyz")
                if r.json()["status"] == "failed":
                    break
                await asyncio.sleep(0.01)
            assert r.status_code == 503 and "nope" in r.json()["error"]
            assert (await c.get("/healthz")).status_code == 503


# --- completions -------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.7])
async def test_completion_tokens_logprobs_versions(
    client: httpx.AsyncClient, engine: TorchEngine, tokenizer: Any, temperature: float
) -> None:
    out = await complete(
        client, prompt="hello world", max_tokens=12, temperature=temperature, seed=3, logprobs=2,
        return_token_ids=True, ignore_eos=True,
    )  # fmt: skip
    choice = out["choices"][0]
    ids = choice["token_ids"]
    assert choice["prompt_token_ids"] == tokenizer("hello world")["input_ids"]
    lp = choice["logprobs"]
    assert len(ids) == len(lp["token_logprobs"]) == len(lp["tokens"]) == len(lp["top_logprobs"]) == 12
    assert len(lp["text_offset"]) == len(choice["token_versions"]) == 12
    assert choice["token_versions"] == [engine.version] * 12 and out["policy_version"] == engine.version
    assert out["usage"] == {"prompt_tokens": len(choice["prompt_token_ids"]), "completion_tokens": 12, "total_tokens": 12 + len(choice["prompt_token_ids"])}
    assert choice["finish_reason"] == "length"
    assert choice["text"] == tokenizer.decode(ids, skip_special_tokens=True)
    ref = reference_logprobs(engine.model, choice["prompt_token_ids"], ids, temperature)
    assert lp["token_logprobs"] == pytest.approx(ref, abs=1e-4)
    assert all(len(alts) >= 2 for alts in lp["top_logprobs"])


async def test_completion_prompt_as_token_ids(client: httpx.AsyncClient, tokenizer: Any) -> None:
    ids = tokenizer("the policy")["input_ids"]
    by_ids = await complete(client, prompt=ids, max_tokens=6, temperature=0, return_token_ids=True)
    by_text = await complete(client, prompt="the policy", max_tokens=6, temperature=0, return_token_ids=True)
    assert by_ids["choices"][0]["prompt_token_ids"] == ids
    assert by_ids["choices"][0]["token_ids"] == by_text["choices"][0]["token_ids"]


async def test_greedy_and_seeded_sampling_are_deterministic(client: httpx.AsyncClient) -> None:
    greedy = [await complete(client, prompt="add two", max_tokens=16, temperature=0, return_token_ids=True) for _ in range(2)]
    assert greedy[0]["choices"][0]["token_ids"] == greedy[1]["choices"][0]["token_ids"]

    body = dict(prompt="add two", max_tokens=16, temperature=1.0, return_token_ids=True, ignore_eos=True)
    a, b, c = [await complete(client, seed=s, **body) for s in (123, 123, 124)]
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert a["choices"][0]["logprobs"] is None
    assert a["choices"][0]["token_ids"] != c["choices"][0]["token_ids"]


async def test_n_choices_with_seed(client: httpx.AsyncClient) -> None:
    body = dict(prompt="x", max_tokens=8, temperature=1.0, return_token_ids=True, ignore_eos=True)
    many = await complete(client, n=3, seed=5, **body)
    one = await complete(client, n=1, seed=5, **body)
    ids = [c["token_ids"] for c in many["choices"]]
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    assert ids[0] == one["choices"][0]["token_ids"] and len({tuple(i) for i in ids}) == 3


async def test_max_tokens_gives_length(client: httpx.AsyncClient) -> None:
    out = await complete(client, prompt="count", max_tokens=3, temperature=0, ignore_eos=True, return_token_ids=True)
    assert out["choices"][0]["finish_reason"] == "length" and len(out["choices"][0]["token_ids"]) == 3


async def test_eos_token_is_returned_and_stops(client: httpx.AsyncClient, tokenizer: Any) -> None:
    """A near-uniform random model hits <|im_end|> or <|endoftext|> in some of 16 seeded samples."""
    eos = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    out = await complete(client, prompt="hi", n=16, seed=0, max_tokens=64, temperature=1.0, return_token_ids=True)
    stopped = [c for c in out["choices"] if c["finish_reason"] == "stop"]
    assert stopped, "no sample ended on eos; pick another seed"
    for c in out["choices"]:
        ids = c["token_ids"]
        if c["finish_reason"] == "stop":
            assert ids[-1] in eos and not eos & set(ids[:-1])
            assert c["text"] == tokenizer.decode(ids[:-1])
        else:
            assert len(ids) == 64 and not eos & set(ids)


async def test_stop_token_ids(client: httpx.AsyncClient, tokenizer: Any) -> None:
    full = (await complete(client, prompt="hello", max_tokens=10, temperature=0, ignore_eos=True, return_token_ids=True))["choices"][0]
    target = full["token_ids"][4]
    cut = full["token_ids"].index(target) + 1
    out = (await complete(client, prompt="hello", max_tokens=10, temperature=0, ignore_eos=True, return_token_ids=True, stop_token_ids=[target]))["choices"][0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == full["token_ids"][:cut]
    assert out["text"] == tokenizer.decode(full["token_ids"][: cut - 1])


async def test_stop_string(client: httpx.AsyncClient, tokenizer: Any) -> None:
    body = dict(prompt="the answer is", max_tokens=20, temperature=0, ignore_eos=True, return_token_ids=True)
    full = (await complete(client, **body))["choices"][0]
    text = full["text"]
    stop = tokenizer.decode(full["token_ids"][:8])[-3:]
    assert stop.strip(), f"pick another prompt: {text!r}"
    out = (await complete(client, stop=[stop, "never-appears"], **body))["choices"][0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[: text.index(stop)]
    # every sampled token is kept, up to the first one whose text completes the stop string
    ids = out["token_ids"]
    assert ids == full["token_ids"][: len(ids)]
    assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])
    assert len(out["token_versions"]) == len(ids)


# --- chat ----------------------------------------------------------------------------------------


async def test_chat_prompt_ids_match_chat_template(client: httpx.AsyncClient, engine: TorchEngine, tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 3?"}]
    out = await chat(
        client, messages=messages, max_tokens=10, temperature=0.8, seed=1, logprobs=True, top_logprobs=3,
        return_token_ids=True, ignore_eos=True, frequency_penalty=0.0, some_unknown_field={"x": 1},
    )  # fmt: skip
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert out["prompt_token_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert out["prompt_token_ids"] == list(templated["input_ids"])
    choice = out["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["message"]["role"] == "assistant"
    assert len(content) == len(choice["token_ids"]) == len(choice["token_versions"]) == 10
    assert all(len(c["top_logprobs"]) == 3 and isinstance(c["bytes"], list) for c in content)
    assert choice["message"]["content"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)
    ref = reference_logprobs(engine.model, out["prompt_token_ids"], choice["token_ids"], 0.8)
    assert [c["logprob"] for c in content] == pytest.approx(ref, abs=1e-4)
    assert out["usage"]["completion_tokens"] == 10 and out["policy_version"] == engine.version


async def test_chat_content_parts_and_max_completion_tokens(client: httpx.AsyncClient) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "hello there"}]
    a = await chat(client, messages=parts, max_completion_tokens=5, temperature=0, return_token_ids=True)
    b = await chat(client, messages=plain, max_tokens=5, temperature=0, return_token_ids=True)
    assert a["prompt_token_ids"] == b["prompt_token_ids"]
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert a["choices"][0]["logprobs"] is None and "prompt_token_ids" not in (await chat(client, messages=plain, max_tokens=2))


# --- batching --------------------------------------------------------------------------------------


async def test_concurrent_requests_are_batched_and_match_solo(client: httpx.AsyncClient, engine: TorchEngine) -> None:
    prompts = [f"task {i}: " + "think " * i for i in range(8)]
    body = dict(max_tokens=24, temperature=0, ignore_eos=True, return_token_ids=True)
    solo = [(await complete(client, prompt=p, **body))["choices"][0]["token_ids"] for p in prompts]
    before = dict(engine.stats.batch_sizes)
    together = await asyncio.gather(*[complete(client, prompt=p, **body) for p in prompts])
    assert [r["choices"][0]["token_ids"] for r in together] == solo
    grown = {size: n - before.get(size, 0) for size, n in engine.stats.batch_sizes.items()}
    assert max(size for size, n in grown.items() if n > 0) > 1
    assert (await client.get("/v1/stats")).json()["max_batch_size_seen"] > 1


async def test_requests_join_a_running_batch(client: httpx.AsyncClient, engine: TorchEngine) -> None:
    """A request that arrives mid-decode joins at a step boundary instead of waiting."""
    body = dict(temperature=0, ignore_eos=True, return_token_ids=True)
    solo_short = (await complete(client, prompt="late one", max_tokens=8, **body))["choices"][0]["token_ids"]
    long_task = asyncio.create_task(complete(client, prompt="early one", max_tokens=300, **body))
    while engine.active_rows == 0:
        await asyncio.sleep(0.001)
    short = await complete(client, prompt="late one", max_tokens=8, **body)
    assert not long_task.done(), "the short request waited for the long one"
    assert short["choices"][0]["token_ids"] == solo_short
    assert len((await long_task)["choices"][0]["token_ids"]) == 300


async def test_arrivals_during_a_batch_share_one_prefill(client: httpx.AsyncClient, engine: TorchEngine) -> None:
    """Requests that arrive a few ms apart while a batch decodes are prefilled together
    (batch_wait_ms is 20 here), not one forward pass each."""
    body = dict(temperature=0, ignore_eos=True, return_token_ids=True)
    long_task = asyncio.create_task(complete(client, prompt="keeps decoding", max_tokens=300, **body))
    while engine.active_rows == 0:
        await asyncio.sleep(0.001)
    before = dict(engine.stats.prefill_sizes)

    async def late(i: int) -> dict[str, Any]:
        await asyncio.sleep(0.002 * i)
        return await complete(client, prompt=f"late {i}", max_tokens=4, **body)

    await asyncio.gather(*[late(i) for i in range(3)])
    grown = {size: n - before.get(size, 0) for size, n in engine.stats.prefill_sizes.items() if n > before.get(size, 0)}
    assert grown == {3: 1}, grown
    assert not long_task.done()
    await long_task


# --- weight swaps -------------------------------------------------------------------------------------


async def test_swap_weights_mid_request(model_path: Path, other_weights: Path) -> None:
    new_model = load_causal_lm(other_weights)
    new_state = {k: v.clone() for k, v in new_model.state_dict().items() if k != "lm_head.weight"}
    async with serve(_settings(model_path)) as (client, engine):
        with pytest.raises(ValueError, match="shape"):
            engine.swap_weights({"model.norm.weight": torch.zeros(3)}, version=9)
        prompt = "swap me"
        body = dict(prompt=prompt, temperature=0, ignore_eos=True, return_token_ids=True)
        old = (await complete(client, max_tokens=8, logprobs=0, **body))["choices"][0]

        long_task = asyncio.create_task(complete(client, max_tokens=600, logprobs=0, **body))
        while engine.stats.generated_tokens < 8 + 20:
            await asyncio.sleep(0.001)
        assert await asyncio.wrap_future(engine.swap_weights(new_state, version=1)) == 1
        long = (await long_task)["choices"][0]

        versions = long["token_versions"]
        assert len(versions) == len(long["token_ids"]) == len(long["logprobs"]["token_logprobs"]) == 600
        assert versions[0] == 0 and versions[-1] == 1 and versions == sorted(versions)
        assert long["token_ids"][:8] == old["token_ids"]

        new = await complete(client, max_tokens=8, logprobs=0, **body)
        choice = new["choices"][0]
        assert choice["token_versions"] == [1] * 8 and new["policy_version"] == 1
        # the new weights, not the old ones, produced these tokens and logprobs
        assert choice["token_ids"] == reference_greedy(new_model, old["prompt_token_ids"], 8)
        new_lp = choice["logprobs"]["token_logprobs"]
        assert new_lp == pytest.approx(reference_logprobs(new_model, old["prompt_token_ids"], choice["token_ids"], 0), abs=1e-4)
        assert new_lp != pytest.approx(old["logprobs"]["token_logprobs"], abs=1e-3)
        assert (await client.get("/readyz")).json()["policy_version"] == 1
        assert (await client.get("/v1/stats")).json()["weight_swaps"] == 1


async def test_min_policy_version_waits_for_the_swap_then_gives_up(model_path: Path, other_weights: Path) -> None:
    new_state = {k: v.clone() for k, v in load_causal_lm(other_weights).state_dict().items() if k != "lm_head.weight"}
    async with serve(_settings(model_path, version_wait_s=0.5)) as (client, engine):
        body = dict(prompt="wait", max_tokens=2, temperature=0, return_token_ids=True, logprobs=0)
        # Nobody swaps: after version_wait_s the request runs on what is live, and says so.
        started = time.monotonic()
        gave_up = (await complete(client, min_policy_version=1, **body))["choices"][0]
        assert time.monotonic() - started >= 0.5 and gave_up["token_versions"] == [0, 0]
        # A swap lands while the request waits: it is served by the version it asked for.
        waiting = asyncio.create_task(complete(client, min_policy_version=1, **body))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await asyncio.wrap_future(engine.swap_weights(new_state, version=1))
        assert (await waiting)["choices"][0]["token_versions"] == [1, 1]


# --- bad requests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "hi", "temperature": "abc"}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}),
        ("/v1/completions", {"prompt": "hi", "n": 0}),
        ("/v1/completions", {"prompt": "hi", "logprobs": 99}),
        ("/v1/completions", {"prompt": "hi", "stream": True}),
        ("/v1/completions", {"prompt": [1, 2, 99999]}),
        ("/v1/completions", {"prompt": []}),
        ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": "hi", "stop": [""]}),
        ("/v1/completions", {}),
        ("/v1/completions", {"prompt": [True]}),
        ("/v1/completions", {"prompt": "hi", "seed": 10**30, "temperature": 1}),
        ("/v1/completions", {"prompt": ["a"] * 20, "n": 16}),
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": "hello"}),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": 1}}),
    ],
)
async def test_bad_requests_are_4xx(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    r = await client.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"]["message"]


async def test_malformed_json_is_4xx(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400


# --- checkpoints and the real process ---------------------------------------------------------------------


async def test_saved_checkpoint_loads_via_resolve_model(tmp_path: Path, model_path: Path) -> None:
    """A checkpoint saved with save_pretrained serves exactly like the tiny model it came from."""
    saved = tmp_path / "ckpt"
    load_causal_lm(model_path).save_pretrained(saved)
    load_tokenizer(model_path).save_pretrained(saved)
    assert resolve_model(str(saved), tmp_path / "cache") == saved
    body = dict(prompt="same weights", max_tokens=6, temperature=0, return_token_ids=True)
    async with serve(_settings(saved)) as (client, _):
        from_ckpt = await complete(client, **body)
        assert (await client.get("/v1/models")).json()["data"][0]["root"] == str(saved)
    async with serve(_settings(model_path)) as (client, _):
        original = await complete(client, **body)
    assert from_ckpt["choices"][0]["token_ids"] == original["choices"][0]["token_ids"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_process_serves_and_drains_on_sigterm(model_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.inference", "--port", str(port), "--model", str(model_path), "--device", "cpu",
         "--no-watch-policy"],
        cwd=ROOT,
        env={**os.environ, "RELAYRL_LOG_FORMAT": "console"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.1)
        else:
            raise AssertionError("server never became ready")

        async def long_then_term() -> httpx.Response:
            async with httpx.AsyncClient(base_url=base, timeout=60, headers=AUTH) as c:
                body = {"prompt": "drain", "max_tokens": 800, "temperature": 0, "ignore_eos": True}
                task = asyncio.create_task(c.post("/v1/completions", json=body))
                while (await c.get("/v1/stats")).json()["active_rows"] == 0:
                    await asyncio.sleep(0.005)
                proc.send_signal(signal.SIGTERM)
                return await task

        r = asyncio.run(long_then_term())
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 800
        # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert proc.stdout is not None and "engine worker stopped" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_vllm_engine_fails_clearly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "services.inference", "--engine", "vllm", "--port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "gpu" in proc.stderr and "vllm" in proc.stderr
