"""Model and tokenizer creation and loading, shared by inference and the trainer.

`ensure_tiny_model()` builds the project's own small Llama-style model and byte-level BPE
tokenizer from code (no downloads), deterministically from a seed, as an ordinary Hugging
Face checkpoint directory. `load_tokenizer()` / `load_causal_lm()` load that directory and
any real local checkpoint through the same `Auto*` code path, so nothing downstream knows
which one it got.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]

# ChatML, extended with Hermes/Qwen2.5-style tool calling (the format vLLM's `hermes` parser
# reads), so a tiny-model run exercises the same prompt shapes as a real tool-calling model.
# Conversations without tools, `tool_calls` or tool messages render byte-for-byte as plain
# ChatML did before; trained checkpoints and tests rely on those prompts not moving.
# - `tools` given: a system turn lists their JSON schemas in <tools></tools> (merged after the
#   caller's own first system message, as Qwen2.5 does) and asks for <tool_call> JSON answers.
# - assistant `tool_calls`: content (if any), then one <tool_call> block per call; OpenAI sends
#   `arguments` as a JSON string, which renders as given, so a parsed call re-renders as the
#   model wrote it and the next turn's prompt extends the previous one token for token.
# - `role: "tool"`: <tool_response> blocks; consecutive ones share one user turn (Qwen2.5).
# Content may be a string, a list of text parts, or absent (assistant turns that only call tools).
# Every tag strips the whitespace around it, so the layout below adds nothing to the output.
CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
    {%- if content is string -%}{{- content -}}
    {%- elif content -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set merge_system = tools and messages and messages[0]['role'] == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if merge_system -%}{{- render_content(messages[0]['content']) + '\n\n' -}}{%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments ' -}}
    {{- 'within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
    {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if loop.first and merge_system -%}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}
        {{- '<|im_start|>assistant' -}}
        {%- set text = render_content(message['content']) -%}
        {%- if text -%}{{- '\n' + text -}}{%- endif -%}
        {%- for call in message['tool_calls'] -%}
            {%- set fn = call['function'] if call['function'] is defined else call -%}
            {%- set args = fn['arguments'] if fn['arguments'] is defined else {} -%}
            {{- '\n<tool_call>\n{"name": ' + (fn['name'] | tojson) + ', "arguments": ' -}}
            {%- if args is string -%}{{- args -}}{%- else -%}{{- args | tojson -}}{%- endif -%}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\n<tool_response>\n' + render_content(message['content']) + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '\n' + render_content(message['content']) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

# "tiny" starts from a wider init (0.05 instead of Llama's 0.02): a from-scratch policy then
# learns the demo's echo-digit task with GRPO in ~50 steps instead of ~65+ (measured).
PRESETS: dict[str, dict[str, int | float]] = {
    "tiny": {
        "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "initializer_range": 0.05,
    },  # fmt: skip
    "small": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
}
TINY_VOCAB_SIZE = 512
TINY_MAX_POSITIONS = 1024


def default_model_dir() -> Path:
    return Path(os.environ.get("RELAYRL_MODEL_DIR") or ".relayrl/models")


# --- creation ----------------------------------------------------------------------------


def ensure_tiny_model(path: Path, *, seed: int = 0, preset: str = "tiny") -> Path:
    """Return `path`, first creating the tiny model there if it holds no `config.json`.

    Built in a temporary directory beside `path` and renamed into place, so a concurrent
    caller sees either nothing or a complete checkpoint, never half of one.
    """
    path = Path(path)
    if (path / "config.json").exists():
        _refresh_chat_template(path)
        return path
    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose one of {sorted(PRESETS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        _build_tiny_model(tmp, seed=seed, preset=preset)
        try:
            os.rename(tmp, path)  # atomic; replaces `path` only if it is an empty directory
        except OSError:
            if not (path / "config.json").exists():
                raise RuntimeError(f"{path} exists and is not a model directory (no config.json)") from None
            # Someone else finished first; their copy is byte-identical for the same seed.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _build_tiny_model(out: Path, *, seed: int, preset: str) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()

    tokenizer = build_tokenizer(seed=seed)
    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=TINY_MAX_POSITIONS,
        num_key_value_heads=PRESETS[preset]["num_attention_heads"],
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=[im_end_id, eos_id],
        pad_token_id=eos_id,
        **PRESETS[preset],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end_id, eos_id], pad_token_id=eos_id, bos_token_id=None
    )
    model.save_pretrained(out, safe_serialization=True)


def build_tokenizer(*, seed: int = 0, vocab_size: int = TINY_VOCAB_SIZE) -> Any:
    """Train the project's byte-level BPE on a corpus generated in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _refresh_chat_template(path: Path) -> None:
    """A tiny model saved by an older relayrl keeps its weights but gets this version's chat
    template (e.g. one that renders tools), so a cached model behaves like a fresh one."""
    cfg_path = path / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return
    ours = cfg.get("tokenizer_class") == "PreTrainedTokenizerFast" and cfg.get("additional_special_tokens") == [
        IM_START,
        IM_END,
    ]
    if not ours or cfg.get("chat_template") == CHAT_TEMPLATE:
        return
    cfg["chat_template"] = CHAT_TEMPLATE
    tmp = cfg_path.with_name(f".{cfg_path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg_path)  # atomic: a concurrent reader sees the old or the new file


def _portable_tokenizer_config(out: Path) -> None:
    """Name the generic fast-tokenizer class so transformers 4.x and 5.x both load it."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["additional_special_tokens"] = [IM_START, IM_END]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # transformers may also write the template to a side file; one source of truth is enough.
    (out / "chat_template.jinja").unlink(missing_ok=True)


_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one "
    "had by word but not what all were we when your can said there use an each which she do how their "
    "if will up other about out many then them these so some her would make like him into time has look "
    "two more write go see number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part answer question agent tool reward task step think result "
    "python function return value list error file print true false none self def class import data model "
    "train policy token sample group batch version math add sum total yes ok done hello world please thanks "
    "user assistant system"
).split()
_PUNCT = list(".,;:!?'\"()[]{}<>-+*/=%#@&_|~^$`\\")


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    """A deterministic mix of prose, numbers, code-ish text and punctuation."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.5:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
            if rng.random() < 0.3:
                words[0] = words[0].capitalize()
            out.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", ""]))
        elif kind < 0.7:
            a, b = rng.randint(0, 9999), rng.randint(0, 999)
            op = rng.choice(["+", "-", "*", "/", "="])
            out.append(f"{a} {op} {b} = {rng.randint(0, 99999)}")
        elif kind < 0.78:
            role = rng.choice(["system", "user", "assistant", "tool"])
            out.append(f"{role}\n" + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8))))
        elif kind < 0.88:
            name = rng.choice(_WORDS)
            out.append(f"def {name}(x, y):\n    return x {rng.choice('+-*/')} y\n")
        else:
            out.append("".join(rng.choice(_PUNCT + list("abcxyz0123456789 \n\t")) for _ in range(rng.randint(5, 30))))
    return out


# --- loading -----------------------------------------------------------------------------


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """"tiny" -> the tiny model (created on first use); anything else -> an existing local checkpoint."""
    if spec == "tiny" or spec.startswith("tiny:"):
        preset = spec.partition(":")[2] or "tiny"
        cache = Path(cache_dir) if cache_dir is not None else default_model_dir()
        name = "tiny" if preset == "tiny" else f"tiny-{preset}"
        return ensure_tiny_model(cache / name, preset=preset)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {spec!r} is neither 'tiny' nor an existing local checkpoint directory "
            "(models are never downloaded; pass --model /path/to/checkpoint)"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model directory {path} has no config.json; is it a Hugging Face checkpoint?")
    return path


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(dtypes)}")
    return dtypes[name]


def load_tokenizer(path: Path | str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_causal_lm(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=dtype)
    return model.to(device).eval()


def _quiet_transformers() -> None:
    """Progress bars on stderr would interleave with the services' JSON log lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends generation: generation config eos ids plus the tokenizer's eos."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
