"""Plugin checkpoints: an HF-style folder with ``config.json`` and ``model.safetensors``.

Written to a temporary folder and renamed into place, so a crash never leaves half a
checkpoint. Loading never unpickles anything and refuses, by name, whatever does not fit.
Neither direction lets a non-finite value (NaN, +-inf) through: one NaN in the output bias
would make every plugin request decode token 0, one +inf would force its token every step.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .model import PluginConfig, PluginLM, build_plugin
from .paths import atomic_folder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vllm_plugin/1"


class CheckpointError(ValueError):
    """A plugin checkpoint that cannot be used, with the reason."""


def non_finite(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Tensor name -> (number of NaN/+-inf values, number of values), for each floating-point
    tensor that holds any; empty when all are finite."""
    bad = {}
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            count = int((~torch.isfinite(t)).sum())
            if count:
                bad[name] = (count, t.numel())
    return bad


def _describe(bad: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"'{name}' ({n} of {total} values)" for name, (n, total) in bad.items())


def save_plugin(model: PluginLM, folder: str | Path) -> Path:
    """Write ``model`` as a checkpoint folder (``config.json`` + ``model.safetensors``), atomically.

    Raises:
        CheckpointError: a parameter holds NaN or +-inf (nothing is written; an existing
            checkpoint at ``folder`` is left as it was).
    """
    # Tied weights are stored once; load_state_dict re-ties them.
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(
            f"refusing to save plugin to {folder}: non-finite values (NaN/inf) in tensor(s) {_describe(bad)}. "
            f"Training diverged: lower the learning rate, or keep the last good checkpoint")
    with atomic_folder(folder) as tmp:
        config = {"format": FORMAT, **model.config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    return Path(folder)


def read_config(folder: str | Path) -> PluginConfig:
    """The ``PluginConfig`` in a checkpoint folder's ``config.json`` (no weights read).

    Raises:
        CheckpointError: the folder or its config is missing, not JSON, not ours, or has
            unknown or invalid fields; the message names the file.
    """
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
    """Load a plugin, refusing one built for another vocabulary or tokenizer, or a broken one.

    Raises:
        CheckpointError: the folder, its config or its weights are missing or unreadable, the
            weights do not match the config, any tensor holds NaN or +-inf, a shortlist's
            ``index_of`` is not one, or the vocabulary
            size / tokenizer fingerprint differ from the ones given.
    """
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
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(
            f"{weights} holds non-finite values (NaN/inf) in tensor(s) {_describe(bad)}: served, "
            f"they would force or break tokens. Retrain the plugin (lower the learning rate if "
            f"training diverged) or restore this checkpoint from a good copy")
    model = build_plugin(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not match its config.json: {e}") from e
    k = config.shortlist_size
    if k:  # out-of-range rows would fail inside the engine's decode step; a row used twice, silently
        rows = model.index_of
        if int(rows.min()) < 0 or int(rows.max()) > k or not torch.equal(
                torch.bincount(rows, minlength=k + 1)[:k], torch.ones(k, dtype=torch.long)):
            raise CheckpointError(
                f"{weights}: 'index_of' is not a shortlist of {k} tokens (each of rows 0..{k - 1} once, row {k} "
                f"for the rest): the file is corrupt; retrain the plugin or restore this checkpoint from a good copy")
    prior = model.tail_log_prior
    if prior is not None and abs(prior.double().logsumexp(0).item()) > 1e-4:  # the view would not be a distribution
        raise CheckpointError(
            f"{weights}: 'tail_log_prior' does not sum to 1 (log-sum {prior.double().logsumexp(0).item():.4g}): the "
            f"file is corrupt; retrain the plugin or restore this checkpoint from a good copy")
    return model.to(device).eval()


def plugin_prompt(checkpoint: str | Path, task_input: str) -> str:
    """The prompt the plugin at ``checkpoint`` was trained on, for one task input: its
    ``prompt_template`` (the in-context examples it was trained behind, if any, then its
    dataset's template) around ``task_input``, formatted as its training data was (E2E: an MR
    ``name[Aromi], area[riverside]`` becomes one ``name -- Aromi`` line per attribute; WebNLG and
    your own data: the input as given, e.g. one triple per line).

    A plugin trained behind an example (``--shots``, the default recipe) expects it before every
    input; a prompt without it is still served with the plugin, at the cost of a mismatch.

    Raises:
        CheckpointError: the checkpoint's config cannot be read (names the file).
        ValueError: an E2E input that is not a meaning representation; a plugin trained behind
            a per-input example (``--nearest-shot``), whose example this cannot know.
    """
    from vllm_plugin.training.data import PROMPT_TEMPLATES, format_prompt

    config = read_config(checkpoint)
    dataset = config.training.get("dataset")
    if config.training.get("nearest_shot"):
        raise ValueError(f"plugin {checkpoint} was trained behind, per input, the fit example most like it "
                         "(--nearest-shot): put that example before this prompt yourself "
                         "(training.data.NearestShot over the fit split finds it)")
    try:
        return format_prompt(dataset if dataset in PROMPT_TEMPLATES else "jsonl", task_input,
                             config.prompt_template or None)
    except ValueError as e:
        raise ValueError(f"{e}: plugin {checkpoint} is an E2E plugin; give an MR such as "
                         "'name[Aromi], eatType[coffee shop], area[riverside]'") from None
