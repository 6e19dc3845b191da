"""Adapt a frozen, even closed, LLM through its logits: a small plugin LM served inside vLLM.

Light on import: vLLM and transformers load only when their parts are used.
"""
__version__ = "0.1.0"

_LAZY = {
    "PluginConfig": "vllm_plugin.model",
    "build_plugin": "vllm_plugin.model",
    "load_plugin": "vllm_plugin.checkpoint",
    "save_plugin": "vllm_plugin.checkpoint",
    "reference_generate": "vllm_plugin.decode",
    "reference_beam_search": "vllm_plugin.decode",
    "plugin_beam_search": "vllm_plugin.beam",
    "PluginLogitsProcessor": "vllm_plugin.processor",
    "plugin_llm": "vllm_plugin.serving",
    "plugin_params": "vllm_plugin.serving",
    "plugin_args": "vllm_plugin.serving",
    "plugin_prompt": "vllm_plugin.checkpoint",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vllm_plugin' has no attribute {name!r}")


__all__ = list(_LAZY)
