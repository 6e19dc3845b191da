"""One-line entry points: an `LLM` with plugins, per-request arguments, and `vllm serve` with plugins."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .processor import ARG_PLUGIN, ARG_WEIGHT, ENV_VAR

PROCESSOR = "vllm_plugin.processor:PluginLogitsProcessor"


def set_plugins(plugins: Mapping[str, str | Path]) -> None:
    """Name the checkpoints engines started from now on load (also in their child processes)."""
    os.environ[ENV_VAR] = json.dumps({name: str(Path(path).resolve()) for name, path in plugins.items()})


def plugin_llm(model: str, plugins: Mapping[str, str | Path], **kwargs):
    """``LLM(model, logits_processors=[PluginLogitsProcessor], ...)`` serving ``plugins`` by name.

        llm = plugin_llm(base, {"e2e": "runs/e2e-gru-full/checkpoint"})
        llm.generate(prompt, plugin_params("e2e", max_tokens=64))
    """
    from vllm import LLM

    from .processor import PluginLogitsProcessor

    set_plugins(plugins)
    processors = list(kwargs.pop("logits_processors", None) or [])
    if PluginLogitsProcessor not in processors:
        processors.append(PluginLogitsProcessor)
    return LLM(model=model, logits_processors=processors, **kwargs)


def plugin_args(name: str, weight: float = 1.0) -> dict:
    """Per-request arguments: ``SamplingParams(extra_args=...)``, or ``vllm_xargs`` over HTTP."""
    return {ARG_PLUGIN: name, ARG_WEIGHT: weight}


def plugin_params(name: str | None, weight: float = 1.0, **sampling_kwargs):
    """``SamplingParams`` that decode with plugin ``name`` (``None``: the base alone)."""
    from vllm import SamplingParams

    extra = dict(sampling_kwargs.pop("extra_args", None) or {})
    if name is not None:
        extra.update(plugin_args(name, weight))
    return SamplingParams(extra_args=extra or None, **sampling_kwargs)


def serve_command(model: str, plugins: Mapping[str, str | Path], *vllm_args: str) -> tuple[list[str], dict]:
    """The `vllm serve` command line and environment that serve ``plugins``."""
    env = dict(os.environ)
    env[ENV_VAR] = json.dumps({name: str(Path(path).resolve()) for name, path in plugins.items()})
    return ["vllm", "serve", model, "--logits-processors", PROCESSOR, *vllm_args], env
