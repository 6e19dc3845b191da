"""Admission checks that need the engine's configuration: never serve a plugin request without it.

vLLM's frontend calls a logits processor's ``validate_params(sampling_params)`` (from
``InputProcessor._validate_params``, inside ``InputProcessor.process_inputs``; both model
runners' validators run there) with the request's ``SamplingParams`` only. Some engine
configurations would still decode a request that passes those checks without its plugin, in
whole or in part:

- speculative decoding (``speculative_config``): the V1 runner loads no entry-point processor
  at all (``build_logitsprocs``; with ``logits_processors=`` it refuses to start), and Model
  Runner V2 runs processors on draft-verification rows our processor does not handle;
- prompt embeddings: the plugin reads token ids, and such a prompt has none;
- the V1 runner under async scheduling with the processor loaded only from its entry point:
  vLLM then does not fill in the newest token before processors run (vLLM #52461);
- a transformer plugin reads at most ``max_len`` positions: a request that can grow past them
  would continue without the plugin.

The facts are read from the admitting ``InputProcessor`` (its ``vllm_config``) and the engine
input it is processing, found on the call stack by their code objects. If they cannot be found
(``validate_params`` called from elsewhere, or a vLLM whose call path differs), nothing is
refused here and the engine-side fallbacks remain (a warning, then the base alone for the rows
concerned).
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable

# Frames between our validate_params and InputProcessor.process_inputs: a handful in vLLM 0.32
# (validator partial/closure, the classmethod, validate_request); generous, still cheap.
_MAX_DEPTH = 16


@functools.lru_cache(maxsize=1)
def _admission_code():
    from vllm.v1.engine.input_processor import InputProcessor

    return InputProcessor._validate_params.__code__, InputProcessor.process_inputs.__code__


def admitting_engine() -> tuple[object | None, object | None]:
    """(the ``InputProcessor`` admitting a request on this thread, the engine input it holds), or
    None for what is not found on the call stack. Costs a walk of a few frames."""
    validate_code, process_code = _admission_code()
    processor = prompt = None
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            break
        if frame.f_code is validate_code:
            processor = frame.f_locals.get("self")
        elif frame.f_code is process_code:
            prompt = frame.f_locals.get("prompt")
            if processor is None:
                processor = frame.f_locals.get("self")
            break
        frame = frame.f_back
    return processor, prompt


def engine_refusal(vllm_config, prompt, params, plugin: str, max_len: int | None) -> str | None:
    """Why this engine cannot serve ``params`` with plugin ``plugin``, or None if it can.

    Args:
        vllm_config: the engine's ``VllmConfig`` (None: unknown, nothing refused for it).
        prompt: the engine input being admitted (a dict with ``type`` and, for token prompts,
            ``prompt_token_ids``; None: unknown).
        params: the request's ``SamplingParams``.
        plugin: the plugin's name, for the message.
        max_len: the positions the plugin reads at most (a transformer's ``max_len``; None: any).
    """
    if vllm_config is not None:
        spec = getattr(vllm_config, "speculative_config", None)
        if spec is not None:
            what = f"method={getattr(spec, 'method', None)!r}, " \
                   f"num_speculative_tokens={getattr(spec, 'num_speculative_tokens', None)}"
            return (f"plugin '{plugin}': this engine runs speculative decoding ({what}), and vLLM applies no "
                    f"custom logits processor to the tokens it verifies, so the request would be decoded by the "
                    f"base alone. Serve plugin requests from an engine without --speculative-config / "
                    f"speculative_config")
        model_config = vllm_config.model_config
        scheduler = getattr(vllm_config, "scheduler_config", None)
        if (not getattr(vllm_config, "use_v2_model_runner", False) and getattr(scheduler, "async_scheduling", False)
                and not model_config.logits_processors):
            return (f"plugin '{plugin}': this engine loads the plugin processor only from its entry point and "
                    f"runs async scheduling, where vLLM does not give such a processor the newest token, so "
                    f"tokens would be decoded without the plugin. Start it with --logits-processors "
                    f"vllm_plugin.processor:PluginLogitsProcessor (or plugin_llm / vllm-plugin serve)")
    if isinstance(prompt, dict):
        inner = prompt.get("decoder_prompt", prompt) if prompt.get("type") == "enc_dec" else prompt
        if inner.get("type") == "embeds":
            return (f"plugin '{plugin}': prompt embeddings carry no token ids for the plugin to read; send the "
                    f"prompt as token ids or text, or drop 'plugin'")
        ids = inner.get("prompt_token_ids")
        if max_len is not None and ids is not None:
            max_tokens = params.max_tokens
            if max_tokens is None and vllm_config is not None:
                max_tokens = vllm_config.model_config.max_model_len - len(ids)
            if max_tokens is not None and len(ids) + max_tokens - 1 > max_len:
                room = max_len - len(ids) + 1
                fix = f"set max_tokens to at most {room}" if room > 0 else "shorten the prompt"
                return (f"plugin '{plugin}' reads at most {max_len} positions (its max_len), but this request "
                        f"can reach {len(ids)} prompt + {max_tokens} new tokens; the rest would be decoded "
                        f"without the plugin. {fix}")
    return None


def check_admission(params, plugin: str, max_len: Callable[[], int | None], processor, prompt) -> None:
    """Refuse, at admission, a plugin request this engine would decode without its plugin.

    ``max_len()``: the positions plugin ``plugin`` reads at most (None: unbounded), called only
    when the admitting engine is found; ``processor``, ``prompt``: ``admitting_engine()``'s.

    Raises:
        ValueError: the reason (see ``engine_refusal``), naming the plugin and the fix.
    """
    if processor is None and prompt is None:
        return
    reason = engine_refusal(getattr(processor, "vllm_config", None), prompt, params, plugin, max_len())
    if reason:
        raise ValueError(reason)
