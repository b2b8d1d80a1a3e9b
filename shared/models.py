"""Model and tokenizer creation and loading, shared by inference and the trainer.

`ensure_tiny_model()` builds the project's own small Llama-style model and byte-level BPE
tokenizer from code (no downloads), deterministically from a seed, as an ordinary Hugging
Face checkpoint directory. `load_tokenizer()` / `load_causal_lm()` load that directory and
any real local checkpoint through the same `Auto*` code path, so nothing downstream knows
which one it got.

Presets (`resolve_model("tiny")`, `resolve_model("tiny:<preset>")`) differ in size, tokenizer
and chat template, the way real model families do:

- `tiny`, `small`: the 512-token generic BPE and ChatML + Hermes tool calling (`CHAT_TEMPLATE`).
  Fixed: tests and trained checkpoints rely on their tokenizer, prompts and seed-0 weights.
- `agent`: a BPE trained on chat, tool-call, arithmetic and SQL text with one token per digit,
  and a compact template (`COMPACT_CHAT_TEMPLATE`) that lists tools in one line each instead
  of their JSON schemas, so an agent's prompt costs a small CPU model ~4x fewer tokens. Tool
  calls are the same `<tool_call>{json}</tool_call>` text, so inference parses them unchanged.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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

# The compact rendering of the same conversations, for presets trained on it (`agent`). Hermes
# spends ~300 tokens of fixed instructions and the tools' JSON schemas on every prompt; a small
# model that learns the format from SFT data needs neither. What changes, and why:
# - `tools` given: one system turn, the caller's first system message (if any), then
#   `<tools>` + one line per tool + `</tools>`. A line is a signature and the first sentence of
#   the description: `calculator(expression: string): Evaluate an arithmetic expression and
#   return its value.` (parameter names with their JSON type, `?` after optional ones). With
#   the agent tokenizer that line is 18 tokens for the calculator tool: 12 more than
#   `calculator(expression)` alone, 21 fewer than adding its parameter's description. Kept:
#   with several tools the sentence is what tells them apart, and a type says how to quote.
# - no `# Tools` preamble and no instruction on how to call: SFT data shows the call format.
# - assistant `tool_calls`: `<|im_start|>assistant\n`, content and a newline if any, then the
#   calls, newline-separated, each `<tool_call>{"name": ..., "arguments": ...}</tool_call>` with
#   no inner newlines; `arguments` renders as given (a string verbatim, an object as `tojson`,
#   which services/inference/tools.py matches), so a reply whose JSON is spaced as `tojson`
#   spaces it (`", "`, `": "`; SFT data teaches that) re-renders as written and the next
#   prompt extends the previous prompt + response token for token.
# - `role: "tool"`: one user turn per run of tool messages, newline-separated
#   `<tool_response>...</tool_response>` blocks without inner newlines.
# Everything else (plain turns, the generation prompt) renders exactly as ChatML does above.
COMPACT_CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
    {%- if content is string -%}{{- content -}}
    {%- elif content -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- macro signature(tool) -%}
    {%- set fn = tool['function'] if tool['function'] is defined else tool -%}
    {%- set params = fn['parameters'] if fn['parameters'] is defined and fn['parameters'] else {} -%}
    {%- set props = params['properties'] if params['properties'] is defined and params['properties'] else {} -%}
    {%- set required = params['required'] if params['required'] is defined and params['required'] else [] -%}
    {{- fn['name'] + '(' -}}
    {%- for name, schema in props.items() -%}
        {%- if not loop.first -%}{{- ', ' -}}{%- endif -%}
        {{- name -}}{%- if name not in required -%}{{- '?' -}}{%- endif -%}
        {%- if schema is mapping and schema['type'] is defined and schema['type'] is string -%}
            {{- ': ' + schema['type'] -}}
        {%- endif -%}
    {%- endfor -%}
    {{- ')' -}}
    {%- set description = (fn['description'] if fn['description'] is defined and fn['description'] else '') -%}
    {%- set first = (description | replace('\n', ' ') | trim).split('. ')[0] | trim -%}
    {%- if first -%}{{- ': ' + first -}}{%- if not first.endswith('.') -%}{{- '.' -}}{%- endif -%}{%- endif -%}
{%- endmacro -%}
{%- set merge_system = tools and messages and messages[0]['role'] == 'system' -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if merge_system -%}{{- render_content(messages[0]['content']) + '\n' -}}{%- endif -%}
    {{- '<tools>' -}}
    {%- for tool in tools -%}{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}{{- signature(tool) -}}{%- endfor -%}
    {{- '</tools><|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- if loop.first and merge_system -%}
    {%- elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- set text = render_content(message['content']) -%}
        {%- if text -%}{{- text + '\n' -}}{%- endif -%}
        {%- for call in message['tool_calls'] -%}
            {%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
            {%- set fn = call['function'] if call['function'] is defined else call -%}
            {%- set args = fn['arguments'] if fn['arguments'] is defined else {} -%}
            {{- '<tool_call>{"name": ' + (fn['name'] | tojson) + ', "arguments": ' -}}
            {%- if args is string -%}{{- args -}}{%- else -%}{{- args | tojson -}}{%- endif -%}
            {{- '}</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message['role'] == 'tool' -%}
        {%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user\n' -}}
        {%- else -%}{{- '\n' -}}{%- endif -%}
        {{- '<tool_response>' + render_content(message['content']) + '</tool_response>' -}}
        {%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message['role'] + '\n' + render_content(message['content']) + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()

CHAT_TEMPLATES: dict[str, str] = {"hermes": CHAT_TEMPLATE, "compact": COMPACT_CHAT_TEMPLATE}

# The tool-calling tags as single tokens of the agent tokenizer. Not special: a reply decoded
# with `skip_special_tokens=True` must still hold `<tool_call>` for the tool-call parser.
TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]

TINY_VOCAB_SIZE = 512
TINY_MAX_POSITIONS = 1024


@dataclass(frozen=True)
class TokenizerSpec:
    """How one of the project's tokenizers is trained: a corpus generator (seed -> lines), the
    total vocabulary (added tags included), whether digits stay single tokens, and the
    non-special added tokens."""

    corpus: Callable[[int], list[str]]
    vocab_size: int
    split_digits: bool = False
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Preset:
    """A tiny-model preset: Llama size fields, its tokenizer (a `TOKENIZERS` key), its chat
    rendering (a `CHAT_TEMPLATES` key) and its context length."""

    model: Mapping[str, int | float]
    tokenizer: str = "generic"
    chat: str = "hermes"
    max_positions: int = TINY_MAX_POSITIONS


# Chosen by learning per wall-clock second, not by step time alone (bench/sft_sizes.py; figures
# in docs/benchmarks.md): SFT on perfect calculator demonstrations, 2 threads, greedy end-to-end
# held-out accuracy after 120 s of training: this size (0.26M parameters, ~7 steps/s) 82%; 128
# wide x 4 layers (1.25M, ~2.6 steps/s) 7%. bench/model_presets.py times the step of each size.
AGENT_SIZE: dict[str, int | float] = {
    "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
}  # fmt: skip
# Tokens of the calculator first prompt / the text-to-SQL write prompt by vocabulary size
# (measured): 1024: 124/196, 1536: 111/172, 2048: 104/171, 3072: 103/170. Past 1536 the prompts
# barely shrink while the embedding grows and each extra token is rarer for a small model to learn.
AGENT_VOCAB_SIZE = 1536

# "tiny" starts from a wider init (0.05 instead of Llama's 0.02): a from-scratch policy then
# learns the demo's echo-digit task with GRPO in ~50 steps instead of ~65+ (measured).
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "initializer_range": 0.05}
    ),  # fmt: skip
    "small": Preset({"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}),
    # Text-to-SQL prompts with a real (Spider) schema outgrow 1024 tokens; RoPE has no weights,
    # so the longer context costs nothing until a prompt uses it.
    "agent": Preset(AGENT_SIZE, tokenizer="agent", chat="compact", max_positions=2048),
}

# What a model directory built here was built as, so an upgrade refreshes it with its own
# preset's template (directories from before this file existed are tiny/small: hermes).
MODEL_INFO_FILE = "relayrl_model.json"


def default_model_dir() -> Path:
    return Path(os.environ.get("RELAYRL_MODEL_DIR") or ".relayrl/models")


# --- creation ----------------------------------------------------------------------------


def ensure_tiny_model(path: Path, *, seed: int = 0, preset: str = "tiny") -> Path:
    """Return `path`, first creating the tiny model there if it holds no `config.json`.

    Built in a temporary directory beside `path` and renamed into place, so a concurrent
    caller sees either nothing or a complete checkpoint, never half of one. An existing
    directory is kept whatever `preset` says (only its chat template is brought up to date).
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

    spec = PRESETS[preset]
    tokenizer = build_tokenizer(seed=seed, preset=preset)
    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out, CHAT_TEMPLATES[spec.chat])
    info = {"preset": preset, "seed": seed, "tokenizer": spec.tokenizer, "chat": spec.chat}
    (out / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=spec.max_positions,
        num_key_value_heads=spec.model["num_attention_heads"],
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=[im_end_id, eos_id],
        pad_token_id=eos_id,
        **spec.model,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end_id, eos_id], pad_token_id=eos_id, bos_token_id=None
    )
    model.save_pretrained(out, safe_serialization=True)


def build_tokenizer(*, seed: int = 0, preset: str = "tiny", vocab_size: int | None = None) -> Any:
    """Train `preset`'s byte-level BPE on a corpus generated in code, with its chat template.

    `vocab_size` overrides the preset tokenizer's total size (for measuring, see
    bench/model_presets.py). The defaults build exactly the tiny model's tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny-model preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = TOKENIZERS[PRESETS[preset].tokenizer]
    total = vocab_size if vocab_size is not None else spec.vocab_size
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Digits split first: BPE then never merges a digit run, so "1234" is four tokens and a
    # number copied from a tool result is copied digit by digit, as arithmetic needs.
    if spec.split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=total - len(spec.tags),  # the tags come on top, so len(tokenizer) == total
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(spec.corpus(seed), trainer=trainer)
    if spec.tags:
        tok.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in spec.tags])
    max_positions = PRESETS[preset].max_positions
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_positions,
        clean_up_tokenization_spaces=False,
    )
    fast.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    fast.chat_template = CHAT_TEMPLATES[PRESETS[preset].chat]
    return fast


def model_chat(path: Path) -> str:
    """The chat rendering (a `CHAT_TEMPLATES` key) a model directory built here was built
    with; "hermes" for one built before presets recorded it (tiny and small were hermes)."""
    try:
        info = json.loads((Path(path) / MODEL_INFO_FILE).read_text())
    except (OSError, ValueError):
        return "hermes"
    chat = info.get("chat") if isinstance(info, dict) else None
    return chat if chat in CHAT_TEMPLATES else "hermes"


def _refresh_chat_template(path: Path) -> None:
    """A tiny model saved by an older relayrl keeps its weights but gets this version's chat
    template for its preset (e.g. one that renders tools), so a cached model behaves like a
    fresh one. Each directory gets its own preset's template, never another preset's."""
    cfg_path = path / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return
    ours = cfg.get("tokenizer_class") == "PreTrainedTokenizerFast" and cfg.get("additional_special_tokens") == [
        IM_START,
        IM_END,
    ]
    template = CHAT_TEMPLATES[model_chat(path)]
    if not ours or cfg.get("chat_template") == template:
        return
    cfg["chat_template"] = template
    tmp = cfg_path.with_name(f".{cfg_path.name}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cfg_path)  # atomic: a concurrent reader sees the old or the new file


def _portable_tokenizer_config(out: Path, template: str) -> None:
    """Name the generic fast-tokenizer class so transformers 4.x and 5.x both load it."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = template
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


# --- the agent tokenizer's corpus -----------------------------------------------------------
# Generic word lists for the domains the agent preset is meant for (word problems solved with
# a calculator tool, text-to-SQL over small relational schemas, chat and tool-call markup).
# Nothing here is read from an example's dataset: the tokenizer must not depend on one.

_AGENT_WORDS = (
    "solve solves solved math word problem problems use using calculator every arithmetic step steps "
    "instead computing compute head know known results reply line answers number numbers expression "
    "expressions evaluate value values supports parentheses round abs min max sqrt floor ceil variables "
    "units commas town city residents population grew grows percent year years last next printer prints "
    "page pages per minute minutes hour hours days week weeks month takes take book books reads read left "
    "remaining buys buy bought spend spends spent cost costs price prices dollar dollars cent cents shares "
    "share equally among between plate plates cookie cookies sticker stickers friend friends marble marbles "
    "child children shelf shelves egg eggs carton cartons muffin muffins box boxes pencil pencils pack packs "
    "photo photos album albums notebook notebooks pen pens apple apples sandwich sandwiches comic candle "
    "candles card cards scarf scarves mug mugs juice bottle bottles discount sale off change bill pays paid "
    "much does have after before needed need store earns saves save rate speed miles drives school tickets "
    "ticket sells sold fewer full empty cups liters meters kilometers grams each equal left over whole "
    "expert SQLite SQL developer given database schema question write writes one query queries that answers "
    "code block review reviews reviewer returned returns decide decides whether wrong sentences correct "
    "corrected running ran gave columns column rows row table tables show list find names average highest "
    "lowest most least count largest smallest placed status cancelled delivered shipped returned category"
).split()
_NAMES = (
    "Maya Liam Ava Noah Zoe Omar Priya Lucas Mei Diego Sara Ken Anna Ben Carla David Elena Felix Grace Hugo "
    "Iris Jonas Kara Leo Mia Nina Oscar Paul Rosa Sam Tara Victor Austin Berlin Cairo Dublin Lima Madrid Osaka "
    "Toronto Paris London Tokyo Rome Oslo Brazil Canada France India Japan Kenya Norway Peru Spain Chile"
).split()
_ITEMS = (
    "notebook pen apple sandwich candle mug scarf book ticket cookie muffin pencil sticker marble egg photo "
    "shirt lamp chair bag card plant cup bottle toy ball"
).split()
# (singular, plural) entity names: tables are plurals, foreign keys `<singular>_id`.
_ENTITIES = [
    tuple(pair.split("/"))
    for pair in (
        "customer/customers product/products order/orders employee/employees department/departments "
        "student/students course/courses enrollment/enrollments teacher/teachers author/authors book/books "
        "loan/loans member/members movie/movies actor/actors rating/ratings city/cities country/countries "
        "store/stores sale/sales supplier/suppliers item/items invoice/invoices payment/payments "
        "flight/flights airport/airports passenger/passengers player/players team/teams match/matches "
        "song/songs artist/artists album/albums patient/patients doctor/doctors visit/visits"
    ).split()
]
_TEXT_COLUMNS = "name title city country category status major department genre term email type level member".split()
_NUMBER_COLUMNS = "price quantity amount age salary grade credits pages rating score total returned".split()
_YEAR_PREFIXES = "signup order published birth enrollment loan release hire start".split()
_TOOL_NAMES = "calculator search lookup get_weather run_sql send_email translate convert read_file".split()
_TOOL_PARAMS = "expression query text city location sql path to subject body amount unit language".split()
_MARKERS = re.compile("(" + "|".join(re.escape(t) for t in [*SPECIAL_TOKENS, *TOOL_TAGS]) + ")")


def _agent_corpus(seed: int, items: int = 6000) -> list[str]:
    """Prose, word problems, tool-calling conversations in the compact chat format, SQL schemas,
    questions and queries, arithmetic and code, deterministic for `seed`.

    Conversations are cut at the special tokens and tool tags: those are whole tokens of the
    tokenizer and never reach BPE, so merges are spent on the text between them."""
    rng = random.Random(seed)
    words = _WORDS + _AGENT_WORDS
    out: list[str] = []
    for _ in range(items):
        kind = rng.random()
        if kind < 0.2:
            out.append(_prose(rng, words))
        elif kind < 0.45:
            out += _pieces(_tool_conversation(rng, words))
        elif kind < 0.7:
            out += _pieces(_sql_conversation(rng, words))
        elif kind < 0.8:
            out.append(_word_problem(rng))
        elif kind < 0.88:
            out.append(f"{_expression(rng)} = {_decimal(rng)}")
        elif kind < 0.94:
            name = rng.choice(words)
            out.append(f"def {name}(x, y):\n    return x {rng.choice('+-*/')} y\n")
        else:
            out.append("".join(rng.choice(_PUNCT + list("abcxyz0123456789 \n\t")) for _ in range(rng.randint(5, 30))))
    return out


def _pieces(text: str) -> list[str]:
    return [piece for piece in _MARKERS.split(text) if piece and not _MARKERS.fullmatch(piece)]


def _prose(rng: random.Random, words: list[str], low: int = 3, high: int = 14) -> str:
    # Any word may open a sentence or name something, so capitalized forms are common too.
    chosen = []
    for _ in range(rng.randint(low, high)):
        word = rng.choice(words)
        chosen.append(word.capitalize() if rng.random() < 0.1 else word)
    if rng.random() < 0.5:
        chosen[0] = chosen[0].capitalize()
    if rng.random() < 0.2:
        chosen.insert(rng.randrange(len(chosen)), str(rng.randint(0, 999)))
    return " ".join(chosen) + rng.choice([".", ".", "?", "!", ",", ":", ""])


def _decimal(rng: random.Random) -> str:
    whole = rng.choice([rng.randint(0, 9), rng.randint(10, 99), rng.randint(100, 9999)])
    return str(whole) if rng.random() < 0.6 else f"{whole}.{rng.randint(0, 99):02d}".rstrip("0").rstrip(".")


def _expression(rng: random.Random, depth: int = 0) -> str:
    if depth > 1 or rng.random() < 0.45:
        return _decimal(rng)
    left, right = _expression(rng, depth + 1), _expression(rng, depth + 1)
    text = f"{left} {rng.choice(['+', '-', '*', '/', '*', '//', '%'])} {right}"
    if rng.random() < 0.15:
        return f"{rng.choice(['round', 'abs', 'sqrt', 'min', 'max', 'floor', 'ceil'])}({text})"
    return f"({text})" if depth and rng.random() < 0.6 else text


def _word_problem(rng: random.Random) -> str:
    name, other = rng.choice(_NAMES), rng.choice(_NAMES)
    item, thing = rng.choice(_ITEMS), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 99), rng.randint(2, 40), rng.randint(2, 12)
    price = f"${rng.randint(1, 20)}" + rng.choice(["", "", ".25", ".50", ".75"])
    return rng.choice([
        f"{name} buys {a} {item}s for {price} each and {c} {thing}s for {price} each. "
        f"How much does {name} spend in total, in dollars?",
        f"A {item} costs {price}. {name} pays with a ${rng.choice([20, 50, 100])} bill. "
        f"How much change does {name} get?",
        f"A town had {a * 10} residents. Its population grew by {b}% this year. How many residents does it have now?",
        f"{name} reads {b} pages a day for {c} days. The book has {a * 5} pages. How many pages are left to read?",
        f"{other} has {a * c} {item}s and shares them equally among {c} friends. How many does each friend get?",
        f"A {item} was {price} and is now {b}% off. What is the sale price?",
        f"A printer prints {b} pages per minute. How many minutes does it take to print {a * b} pages?",
    ])  # fmt: skip


def _tool_line(rng: random.Random, words: list[str]) -> str:
    name = rng.choice(_TOOL_NAMES)
    params = rng.sample(_TOOL_PARAMS, rng.randint(1, 2))
    types = ["string", "string", "number", "integer"]
    sig = ", ".join(f"{p}{rng.choice(['', '', '?'])}: {rng.choice(types)}" for p in params)
    return f"{name}({sig}): {_prose(rng, words, 4, 10).rstrip('.,:?!')}."


def _tool_call(name: str, arguments: dict[str, Any]) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def _tool_conversation(rng: random.Random, words: list[str]) -> str:
    """A calculator-style exchange in the compact template's layout (markers included)."""
    tools = "\n".join(_tool_line(rng, words) for _ in range(rng.randint(1, 2)))
    system = _prose(rng, words, 6, 20) + " " + rng.choice([
        "Use the calculator tool for every arithmetic step.", "When you know the result, reply with one line: "
        "'Answer: <number>'.", "Reply with one line.", "Call a tool when you need one.",
    ])  # fmt: skip
    text = f"{IM_START}system\n{system}\n<tools>{tools}</tools>{IM_END}\n"
    text += f"{IM_START}user\n{_word_problem(rng) if rng.random() < 0.7 else _prose(rng, words)}{IM_END}\n"
    for _ in range(rng.randint(1, 3)):
        calls = [_tool_call("calculator", {"expression": _expression(rng)}) for _ in range(rng.choice([1, 1, 1, 2]))]
        if rng.random() < 0.2:
            calls = [_tool_call(rng.choice(_TOOL_NAMES), {rng.choice(_TOOL_PARAMS): _prose(rng, words, 1, 4)})]
        text += f"{IM_START}assistant\n" + "\n".join(calls) + f"{IM_END}\n{IM_START}user\n"
        results = [_decimal(rng) if rng.random() < 0.85 else "error: " + _prose(rng, words, 2, 6) for _ in calls]
        text += "\n".join(f"<tool_response>{r}</tool_response>" for r in results) + f"{IM_END}\n"
    return text + f"{IM_START}assistant\nAnswer: {_decimal(rng)}{IM_END}\n{EOS_TOKEN}"


def _create_table(rng: random.Random, entity: tuple[str, ...], other: tuple[str, ...]) -> str:
    columns = ["id INTEGER PRIMARY KEY"]
    for col in rng.sample(_TEXT_COLUMNS, rng.randint(1, 3)):
        columns.append(f"{col} TEXT NOT NULL")
    for col in rng.sample(_NUMBER_COLUMNS, rng.randint(0, 2)):
        columns.append(f"{col} {rng.choice(['INTEGER', 'REAL'])} NOT NULL")
    if rng.random() < 0.7:
        columns.append(f"{rng.choice(_YEAR_PREFIXES)}_year INTEGER NOT NULL")
    if rng.random() < 0.6:
        columns.append(f"{other[0]}_id INTEGER NOT NULL REFERENCES {other[1]}(id)")
    rest = columns[1:]  # the key first, the others in any order
    rng.shuffle(rest)
    return f"CREATE TABLE {entity[1]} ({', '.join(columns[:1] + rest)});"


def _condition(rng: random.Random, alias: str = "") -> str:
    if rng.random() < 0.5:
        return f"{alias}{rng.choice(_TEXT_COLUMNS)} = '{rng.choice(_NAMES + _AGENT_WORDS)}'"
    op = rng.choice(["=", ">", "<", ">=", "<=", "!="])
    return f"{alias}{rng.choice(_NUMBER_COLUMNS + [p + '_year' for p in _YEAR_PREFIXES])} {op} {_decimal(rng)}"


def _select(rng: random.Random, entity: tuple[str, ...], other: tuple[str, ...]) -> str:
    table, col = entity[1], rng.choice(_TEXT_COLUMNS)
    number = rng.choice(_NUMBER_COLUMNS)
    shape = rng.randrange(5)
    if shape == 0:
        query = f"SELECT COUNT(*) FROM {table} WHERE {_condition(rng)}"
        if rng.random() < 0.4:
            query += f" {rng.choice(['AND', 'OR'])} {_condition(rng)}"
    elif shape == 1:
        query = f"SELECT {col}, COUNT(*) FROM {table} GROUP BY {col} ORDER BY COUNT(*) DESC LIMIT {rng.randint(1, 10)}"
    elif shape == 2:
        query = f"SELECT {rng.choice(['AVG', 'SUM', 'MAX', 'MIN'])}({number}) FROM {table} WHERE {_condition(rng)}"
    elif shape == 3:
        a, b = entity[0][0], other[0][0] if other[0][0] != entity[0][0] else other[0][:2]
        query = (
            f"SELECT {a}.{col} FROM {table} {a} JOIN {other[1]} {b} ON {a}.{other[0]}_id = {b}.id "
            f"WHERE {_condition(rng, b + '.')}"
        )
    else:
        query = f"SELECT DISTINCT {col} FROM {table} ORDER BY {col} {rng.choice(['ASC', 'DESC'])}"
    return query


def _sql_question(rng: random.Random, entity: tuple[str, ...]) -> str:
    return rng.choice([
        f"How many {entity[1]} have the {rng.choice(_TEXT_COLUMNS)} {rng.choice(_NAMES + _AGENT_WORDS)}?",
        f"What is the average {rng.choice(_NUMBER_COLUMNS)} of {entity[1]} in {rng.choice(_NAMES)}?",
        f"List the names of all {entity[1]} placed in {rng.randint(1990, 2024)}.",
        f"Which {entity[0]} has the highest {rng.choice(_NUMBER_COLUMNS)}?",
        f"Show each {rng.choice(_TEXT_COLUMNS)} and the number of {entity[1]}, most first.",
    ])  # fmt: skip


def _sql_conversation(rng: random.Random, words: list[str]) -> str:
    """A write / check / rewrite exchange like the text-to-SQL agent's, markers included."""
    entities = rng.sample(_ENTITIES, rng.randint(2, 4))
    schema = "\n".join(_create_table(rng, e, entities[i - 1]) for i, e in enumerate(entities))
    entity, other = entities[-1], entities[-2]
    system = _prose(rng, words, 8, 24)
    question = _sql_question(rng, entity)
    query = _select(rng, entity, other)
    text = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\nSchema:\n{schema}\n\nQuestion: {question}{IM_END}\n"
    text += f"{IM_START}assistant\n```sql\n{query}\n```{IM_END}\n"
    if rng.random() < 0.5:
        rows = [" | ".join(rng.choice([_decimal(rng), rng.choice(_NAMES)]) for _ in range(2)) for _ in range(3)]
        result = f"Columns: {rng.choice(_TEXT_COLUMNS)}, {rng.choice(_NUMBER_COLUMNS)}\nRows: 3\n" + "\n".join(rows)
        if rng.random() < 0.3:
            result = f"Error: no such column: {rng.choice(_NUMBER_COLUMNS)}"
        text += (
            f"{IM_START}user\nRunning that query gave:\n{result}\n\nA reviewer said: {_prose(rng, words)}\n\n"
            f"Write a corrected query in a ```sql code block.{IM_END}\n{IM_START}assistant\n"
            f"```sql\n{_select(rng, entity, other)}\n```{IM_END}\n"
        )
    return text


TOKENIZERS: dict[str, TokenizerSpec] = {
    "generic": TokenizerSpec(corpus=_corpus, vocab_size=TINY_VOCAB_SIZE),
    "agent": TokenizerSpec(corpus=_agent_corpus, vocab_size=AGENT_VOCAB_SIZE, split_digits=True, tags=tuple(TOOL_TAGS)),
}


# --- loading -----------------------------------------------------------------------------


def resolve_model(spec: str, cache_dir: Path | None = None) -> Path:
    """"tiny" or "tiny:<preset>" (a `PRESETS` key) -> that tiny model, created on first use in
    `cache_dir` ("tiny", "tiny-<preset>"); anything else -> an existing local checkpoint."""
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
