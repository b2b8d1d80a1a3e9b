"""`relayrl export-model`: one version of a run's weights as a Hugging Face checkpoint directory.

The gateway serves a version's weights as safetensors (`GET /v1/runs/{run_id}/weights`); the
architecture, config, tokenizer and chat template come from the run's base `model`, resolved
here the way the trainer resolves it (the project's own models, "tiny" and "tiny:<preset>", are
rebuilt from code; a path must exist on this machine). The weights are loaded into the base
model strictly, so a checkpoint never holds half of one model and half of another, and the
directory is written beside `out` and renamed into place: `out` is either untouched or
complete. Any run can then name it as `model:`, and inference serve it with `--model`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

from services.cli.client import GatewayClient
from shared.models import load_causal_lm, load_tokenizer, resolve_model
from shared.weights import WeightsError, load_state_dict

# Provenance of an exported directory: which run, version and bytes it holds, and on what base.
PROVENANCE_FILE = "relayrl.json"

# Base files the export writes itself (from the loaded model) or must not carry over (the base
# weights, in any of the formats checkpoints ship them in).
_WRITTEN = {"config.json", "generation_config.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


class ExportError(RuntimeError):
    """The export cannot be made; the text says why. Nothing was written to `out`."""


def export_model(
    client: GatewayClient,
    run_id: str,
    out: Path,
    version: int | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Write version `version` (default: the latest) of run `run_id`'s weights, on the run's base
    model, as a checkpoint directory `out`; returns its provenance (also in `out/relayrl.json`)
    with `path`.

    `cache_dir` is where the project's own models are built (default: `RELAYRL_MODEL_DIR` or
    .relayrl/models). A non-empty `out` is refused unless `force`, which replaces it.
    Raises `ExportError` (and `GatewayError` for what the gateway refuses) with the reason.
    """
    out = Path(out).expanduser().absolute()
    _check_target(out, force)  # before any download: a refused export costs nothing
    base = str(client.run(run_id)["config"]["model"])
    try:
        base_path = resolve_model(base, cache_dir)
    except FileNotFoundError as exc:
        raise ExportError(f"run {run_id!r} trained on model {base!r}, which is not on this machine: {exc}") from None

    data, headers = client.weights(run_id, version)
    sha256 = hashlib.sha256(data).hexdigest()
    if sha256 != headers.get("x-policy-sha256"):
        # The gateway checked the bytes before sending them: this is damage on the way here.
        raise ExportError(f"the weights of {run_id} arrived with sha256 {sha256}, the gateway sent "
                          f"{headers.get('x-policy-sha256')!r}; retry")  # fmt: skip
    try:
        state = load_state_dict(data)
    except WeightsError as exc:
        raise ExportError(f"the weights of {run_id}: {exc}") from None
    provenance = {
        "run_id": run_id,
        "version": int(headers["x-policy-version"]),
        "step": int(headers["x-policy-step"]),
        "sha256": sha256,
        "base_model": base,
        "exported_at": time.time(),
    }
    # The checkpoint keeps the dtype the run trained in (float32 unless it published another).
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model = load_causal_lm(base_path, dtype=dtype)
    _load_exactly(model, state, f"the weights of run {run_id!r} (version {provenance['version']})", base)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        _copy_base_files(base_path, tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**provenance, "path": str(out)}


def _check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty: export into a new or empty directory, or pass --force to replace it")


def _load_exactly(model: Any, state: Mapping[str, torch.Tensor], what: str, base: str) -> None:
    """Load `state` into `model` only if it names exactly the model's tensors with their shapes.

    Published weights hold one name per tied group (`serialize_state_dict`), so a tensor
    missing from `state` is fine when a name it is tied to is there: loading that loads both.
    """
    own = model.state_dict()
    tied: dict[int, set[str]] = {}
    for name, tensor in own.items():
        tied.setdefault(tensor.untyped_storage().data_ptr(), set()).add(name)
    missing = sorted(n for group in tied.values() if not (group & state.keys()) for n in group)
    unexpected = sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ExportError(
            f"{what} do not fit base model {base!r}: missing {_names(missing)}; unexpected {_names(unexpected)}"
        )
    shapes = [f"{n} {tuple(t.shape)} (the model's: {tuple(own[n].shape)})" for n, t in state.items()
              if t.shape != own[n].shape]  # fmt: skip
    if shapes:
        raise ExportError(f"{what} do not fit base model {base!r}: shapes differ for {_names(shapes)}")
    # Two names of one tied tensor would overwrite each other: only equal values keep the tie.
    for group in tied.values():
        present = sorted(group & state.keys())
        if any(not torch.equal(state[present[0]], state[n]) for n in present[1:]):
            raise ExportError(f"{what} hold different values for {present}, which base model {base!r} ties")
    model.load_state_dict(state, strict=False)  # strict=False only for the tied names checked above


def _names(names: list[str], shown: int = 10) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _copy_base_files(base: Path, tmp: Path) -> None:
    """Everything of the base checkpoint but its weights and config, byte for byte: tokenizer
    files, chat template, relayrl_model.json of the project's presets, license.

    Copied rather than re-saved: transformers 5's `save_pretrained` rewrites a tokenizer's
    config (`tokenizer_class: TokenizersBackend`, the template moved to a side file), which
    transformers 4 cannot load, and an exported model must load wherever its base did.
    """
    for item in sorted(base.iterdir()):
        name = item.name
        if not item.is_file() or name.startswith(".") or name in _WRITTEN or name.endswith(_WEIGHT_SUFFIXES):
            continue
        shutil.copy2(item, tmp / name)
    try:
        load_tokenizer(tmp)
    except (OSError, ValueError):
        # A tokenizer that needs a file these names do not cover: let transformers write it.
        load_tokenizer(base).save_pretrained(tmp)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished directory to `out`: atomic onto a missing or empty `out`. Replacing
    a non-empty one (`force`) moves it aside first and deletes it once the new one is in."""
    try:
        os.rename(tmp, out)  # POSIX replaces only an empty directory
        return
    except OSError:
        if not force:
            raise ExportError(f"{out} is not empty (it was filled meanwhile): pass --force to replace it") from None
    old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the previous checkpoint back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)
