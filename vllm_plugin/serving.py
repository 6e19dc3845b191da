"""One-line entry points: an `LLM` with plugins, per-request arguments, and `vllm serve` with plugins."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from .processor import ARG_PLUGIN, ARG_WEIGHT, ENV_VAR

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
    kwargs.setdefault("dtype", fast_dtype())
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
    """The `vllm serve` command line and environment that serve ``plugins``, with the processor
    and the middleware that refuses boolean plugin arguments (``MIDDLEWARE``)."""
    env = dict(os.environ)
    env[ENV_VAR] = json.dumps({name: str(Path(path).resolve()) for name, path in plugins.items()})
    dtype = fast_dtype()
    if dtype != "auto" and not any(a == "--dtype" or a.startswith("--dtype=") for a in vllm_args):
        vllm_args = ("--dtype", dtype, *vllm_args)
    if MIDDLEWARE not in vllm_args:
        vllm_args = ("--middleware", MIDDLEWARE, *vllm_args)
    return ["vllm", "serve", model, "--logits-processors", PROCESSOR, *vllm_args], env
