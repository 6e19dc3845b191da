"""Plugin checkpoints: an HF-style folder with ``config.json`` and ``model.safetensors``.

Written to a temporary folder and renamed into place, so a crash never leaves half a
checkpoint. Loading never unpickles anything and refuses, by name, whatever does not fit.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import PluginConfig, PluginLM, build_plugin
from .paths import atomic_folder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vllm_plugin/1"


class CheckpointError(ValueError):
    """A plugin checkpoint that cannot be used, with the reason."""


def save_plugin(model: PluginLM, folder: str | Path) -> Path:
    with atomic_folder(folder) as tmp:
        config = {"format": FORMAT, **model.config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        # Tied weights are stored once; load_state_dict re-ties them.
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    return Path(folder)


def read_config(folder: str | Path) -> PluginConfig:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"plugin checkpoint {folder} does not exist or is not a folder")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"plugin checkpoint {folder} has no {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT:
        raise CheckpointError(f"{path} is not a vllm_plugin checkpoint config (format {FORMAT!r})")
    known = set(PluginConfig.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise CheckpointError(f"{path} has unknown fields {sorted(unknown)}")
    try:
        return PluginConfig(**raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def load_plugin(folder: str | Path, vocab_size: int | None = None,
                tokenizer_fingerprint: str | None = None, device="cpu") -> PluginLM:
    """Load a plugin, refusing one built for another vocabulary or tokenizer."""
    folder = Path(folder)
    config = read_config(folder)
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise CheckpointError(
            f"plugin {folder} scores a vocabulary of {config.vocab_size} tokens, "
            f"but the base model's vocabulary has {vocab_size}"
        )
    if (tokenizer_fingerprint and config.tokenizer_fingerprint
            and config.tokenizer_fingerprint != tokenizer_fingerprint):
        raise CheckpointError(
            f"plugin {folder} was trained with tokenizer {config.tokenizer_fingerprint}, "
            f"but the base model's tokenizer is {tokenizer_fingerprint}"
        )
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"plugin checkpoint {folder} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is corrupt or unreadable: {e}") from e
    model = build_plugin(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not match its config.json: {e}") from e
    return model.to(device).eval()
