"""One-line entry points: an `LLM` with plugins, per-request arguments, and `vllm serve` with plugins."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from .processor import (ARG_EXPERT_PENALTY, ARG_PLUGIN, ARG_WEIGHT, CONFIG_KEY, CONFIG_PLUGINS, ENV_VAR,
                        VLLM_PENALTIES, penalty_args)

PROCESSOR = "vllm_plugin.processor:PluginLogitsProcessor"
# Refuses JSON booleans as plugin arguments, which vLLM's schema would read as 1/0 (middleware.py).
MIDDLEWARE = "vllm_plugin.middleware.PluginArgsMiddleware"


def fast_dtype() -> str:
    """The model dtype to ask vLLM for on this machine.

    On a CPU without native bfloat16 (x86 with AVX2 but no AVX512-BF16/AMX), vLLM's default for
    float32 checkpoints, bfloat16, runs emulated and decodes several times slower than float32
    (benchmarks/throughput.py measures both); elsewhere vLLM's own choice ("auto") stands.
    """
    import torch

    if torch.cuda.is_available():
        return "auto"
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "auto"
    return dtype_for_cpu_flags(flags)


def dtype_for_cpu_flags(flags: set[str]) -> str:
    return "auto" if {"avx512_bf16", "amx_bf16"} & flags or "avx2" not in flags else "float32"


def _resolved(plugins: Mapping[str, str | Path]) -> dict[str, str]:
    return {name: str(Path(path).resolve()) for name, path in plugins.items()}


def plugin_config(plugins: Mapping[str, str | Path], additional_config: Mapping | None = None) -> dict:
    """An engine's ``additional_config`` that serves ``plugins`` (folders made absolute), merged
    into ``additional_config`` (the caller's other keys are kept):
    ``{"vllm_plugin": {"plugins": {"e2e": "/abs/ckpt"}}}``.

    Raises:
        ValueError: ``additional_config`` already names plugins (two tables: say which one).
    """
    merged = dict(additional_config or {})
    if CONFIG_KEY in merged:
        raise ValueError(f"additional_config already has a '{CONFIG_KEY}' entry ({merged[CONFIG_KEY]!r}); "
                         "give the plugins in one place")
    merged[CONFIG_KEY] = {CONFIG_PLUGINS: _resolved(plugins)}
    return merged


def set_plugins(plugins: Mapping[str, str | Path]) -> None:
    """Name the checkpoints engines started from now on load, through ``$PLUGIN_LM_TABLE`` (also
    in their child processes). An engine whose ``additional_config`` names plugins ignores it."""
    os.environ[ENV_VAR] = json.dumps(_resolved(plugins))


def check_plugins(model: str, plugins: Mapping[str, str | Path], source: str, trust_remote_code: bool = False,
                  tokenizer: str | None = None) -> list[str]:
    """Check ``plugins`` against base ``model`` before an engine starts (folders exist, configs and
    weights readable and finite, vocabulary and tokenizer those of the base) and describe each
    (one line per plugin: name, architecture, size, base view). A base whose config or tokenizer
    cannot be read here (not an HF folder or hub id) skips that part; the engine checks it.

    Raises:
        PluginConfigError: a plugin cannot be served; the message names it, ``source``, the
            file and the problem.
    """
    from .processor import describe, load_table

    vocab, fingerprint = None, None
    try:
        from transformers import AutoConfig, AutoTokenizer

        from .base_model import tokenizer_fingerprint

        vocab = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code).get_text_config().vocab_size
        fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tokenizer or model,
                                                                          trust_remote_code=trust_remote_code))
    except Exception:  # noqa: BLE001 - only a pre-check; the engine's own load checks this base
        pass
    table = {name: str(path) for name, path in plugins.items()}
    loaded = load_table(table, source, vocab, fingerprint)
    return [describe(name, m, table[name]) for name, m in loaded.items()]


def plugin_llm(model: str, plugins: Mapping[str, str | Path], **kwargs):
    """``LLM(model, logits_processors=[PluginLogitsProcessor], additional_config=...)`` serving
    ``plugins`` by name (``plugin_config``; other ``additional_config`` keys are kept).

        llm = plugin_llm(base, {"e2e": "runs/e2e-gru-full/checkpoint"})
        llm.generate(prompt, plugin_params("e2e", max_tokens=64))

    Raises:
        PluginConfigError: a plugin cannot be served (checked before the engine starts, see
            ``check_plugins``), naming it, the file and the problem.
        ValueError: ``additional_config`` already names plugins.
    """
    from vllm import LLM

    from .processor import CONFIG_SOURCE, PluginLogitsProcessor

    kwargs["additional_config"] = plugin_config(plugins, kwargs.get("additional_config"))
    check_plugins(model, plugins, f"plugin_llm(..., plugins) ({CONFIG_SOURCE})",
                  trust_remote_code=kwargs.get("trust_remote_code", False), tokenizer=kwargs.get("tokenizer"))
    processors = list(kwargs.pop("logits_processors", None) or [])
    if PluginLogitsProcessor not in processors:
        processors.append(PluginLogitsProcessor)
    kwargs.setdefault("dtype", fast_dtype())
    return LLM(model=model, logits_processors=processors, **kwargs)


def plugin_args(name: str, weight: float = 1.0) -> dict:
    """Per-request arguments: ``SamplingParams(extra_args=...)``, or ``vllm_xargs`` over HTTP."""
    return {ARG_PLUGIN: name, ARG_WEIGHT: weight}


def plugin_params(name: str | None, weight: float = 1.0, expert_repetition_penalty: float = 1.0,
                  **sampling_kwargs):
    """``SamplingParams`` that decode with plugin ``name`` (``None``: the base alone).

    With a plugin, vLLM's ``repetition_penalty``, ``frequency_penalty`` and ``presence_penalty``
    become the processor's ``plugin_*_penalty`` arguments (same formulas, on the combined logits,
    identical on every model runner; vLLM's own are refused on plugin requests).
    ``expert_repetition_penalty``: the paper's penalty (``plugin_expert_repetition_penalty``: each
    expert's logits, generated tokens only, before the product); ignored without a plugin."""
    from vllm import SamplingParams

    extra = dict(sampling_kwargs.pop("extra_args", None) or {})
    if name is not None:
        extra.update(plugin_args(name, weight))
        extra.update(penalty_args(**{p: sampling_kwargs.pop(p) for p in VLLM_PENALTIES if p in sampling_kwargs}))
        if expert_repetition_penalty != 1.0:
            extra[ARG_EXPERT_PENALTY] = expert_repetition_penalty
    return SamplingParams(extra_args=extra or None, **sampling_kwargs)


def _take_additional_config(vllm_args: tuple[str, ...]) -> tuple[dict | None, list[str]]:
    """The ``--additional-config`` JSON among ``vllm_args`` (None: absent) and the other args.

    Raises:
        ValueError: it is not a JSON object.
    """
    rest, found = [], None
    args = list(vllm_args)
    while args:
        a = args.pop(0)
        if a == "--additional-config" and args:
            found = args.pop(0)
        elif a.startswith("--additional-config="):
            found = a.split("=", 1)[1]
        else:
            rest.append(a)
    if found is None:
        return None, rest
    try:
        value = json.loads(found)
    except json.JSONDecodeError as e:
        raise ValueError(f"--additional-config is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ValueError(f"--additional-config must be a JSON object, got {found!r}")
    return value, rest


def serve_command(model: str, plugins: Mapping[str, str | Path], *vllm_args: str) -> tuple[list[str], dict]:
    """The `vllm serve` command line and environment that serve ``plugins``: the processor, the
    table in ``--additional-config`` (merged with one given in ``vllm_args``), and the middleware
    that refuses boolean plugin arguments (``MIDDLEWARE``).

    Raises:
        ValueError: a given ``--additional-config`` is not a JSON object or already names plugins.
    """
    env = dict(os.environ)
    given, vllm_args = _take_additional_config(vllm_args)
    additional = plugin_config(plugins, given)
    dtype = fast_dtype()
    if dtype != "auto" and not any(a == "--dtype" or a.startswith("--dtype=") for a in vllm_args):
        vllm_args = ["--dtype", dtype, *vllm_args]
    if MIDDLEWARE not in vllm_args:
        vllm_args = ["--middleware", MIDDLEWARE, *vllm_args]
    return [vllm_executable(), "serve", model, "--logits-processors", PROCESSOR,
            "--additional-config", json.dumps(additional), *vllm_args], env


def vllm_executable() -> str:
    """The `vllm` command of this Python's environment (beside ``sys.executable``, so a venv
    need not be activated: ``.venv/bin/vllm-plugin serve`` runs ``.venv/bin/vllm``); plain
    ``vllm``, found on PATH, where there is none."""
    beside = Path(sys.executable).with_name("vllm")
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else "vllm"
