"""Beam search with a plugin, through vLLM's own beam search machinery (Python API).

vLLM's beam search (``LLM.beam_search``, ``vllm/entrypoints/generate/beam_search/offline.py``;
the server's ``use_beam_search``, ``online.py``) runs a loop of one-token requests whose
``SamplingParams`` it builds itself, without ``extra_args``, so they never name the plugin; and
it scores beams with the returned log-probs, which in vLLM's default
``logprobs_mode="raw_logprobs"`` are the base's, taken before logits processors.
``plugin_beam_search`` runs the same loop with the plugin's arguments on every step and checks
that the engine returns processed log-probs. Over HTTP the middleware refuses beam search with
a plugin (``middleware.py``).
"""
from __future__ import annotations

from collections.abc import Collection

# Beam search scores beams by the log-probs the engine returns; only this mode returns those of
# the distribution our processor leaves (base and plugin combined).
BEAM_LOGPROBS_MODE = "processed_logprobs"


def token_ids_containing(tokenizer, text: str) -> list[int]:
    """Ids of every token whose text holds ``text``: ``stop_token_ids`` for a stop string
    (``"\\n"``: about 1% of SmolLM2's 49,152 tokens). One decode per vocabulary entry, ~1 s."""
    return [i for i in range(len(tokenizer)) if text in tokenizer.decode([i])]


def plugin_beam_search(llm, prompts, params, plugin: str | None, weight: float = 1.0, mode: str = "product",
                       base_top_k: int | None = None, stop_token_ids: Collection[int] = (),
                       use_tqdm: bool = False) -> list:
    """``LLM.beam_search`` with a plugin: beams scored by the combined distribution.

        llm = plugin_llm(base, {"e2e": ckpt}, logprobs_mode="processed_logprobs")
        out = plugin_beam_search(llm, [prompt], BeamSearchParams(beam_width=4, max_tokens=64), "e2e")
        best = out[0].sequences[0]  # .tokens (prompt + generated), .cum_logprob, .text

    The search is vLLM's: its ``BeamSearchInstance`` / ``BeamSearchSequence``, its one-step
    ``LLM._beam_search_step`` (each beam proposes its ``2 * beam_width`` most likely tokens; an
    EOS candidate is set aside as finished unless ``ignore_eos``; the ``beam_width`` best live
    on) and its ``create_sort_beams_key_function`` (final ranking by
    ``cum_logprob / length ** length_penalty``), as in ``LLM.beam_search``; only the step
    requests differ, carrying the plugin's arguments. ``stop_token_ids`` adds what vLLM's beam
    search lacks, a stop (e.g. every token whose text holds a newline, as greedy decoding's
    ``stop=["\\n"]``): a beam that ends in one after a step is finished. Unlike an EOS candidate,
    which vLLM sets aside before the best live on, it has to be among the ``beam_width`` best
    first, as in Hugging Face's beam search, so stopping early does not flood the finished list
    with short beams; and a prompt's search ends once ``beam_width`` beams have finished (Hugging
    Face's ``early_stopping=True``), where vLLM's would run every prompt to ``max_tokens``.
    ``decode.reference_beam_search`` is the plain-PyTorch oracle the tests hold it to.

    Every step is a fresh request per beam (prompt + the beam's tokens so far): the processor
    rebuilds the plugin state from that whole sequence (vLLM's prefix cache spares the base
    most of the recomputation), so the plugin sees exactly what the beam holds. The request
    says how many of those tokens the beam generated (``plugin_beam_tokens``), so a plugin with
    copy scores marks the user's prompt only, as in greedy decoding.

    Scores: ``cum_logprob`` sums, in nats, ``log_softmax`` of the logits vLLM's sampler holds
    after the processor (``experts.combine``). With ``params.temperature`` 0 (the default) that
    is the combined distribution; with ``T > 0`` it is ``log_softmax(combined / T)``, and vLLM
    also adds the token each step samples as one more candidate, so beams vary between runs.
    No penalties apply (``BeamSearchParams`` has none).

    Args:
        llm: a ``vllm.LLM`` serving the plugin (``plugin_llm``), started with
            ``logprobs_mode="processed_logprobs"`` and ``max_logprobs >= 2 * beam_width``.
        prompts: as for ``LLM.beam_search`` (token-id or text prompts; not embeddings).
        params: ``vllm.sampling_params.BeamSearchParams`` (``beam_width``, ``max_tokens``,
            ``length_penalty``, ``ignore_eos``, ``temperature``, ``skip_special_tokens``); no
            ``structured_outputs``.
        plugin: a configured plugin name; None runs plain beam search (any logprobs mode).
        weight, mode, base_top_k: the request's ``plugin_weight``, ``plugin_mode`` and
            ``plugin_base_top_k`` (None: the plugin's own view of the base).
        stop_token_ids: token ids that finish a beam (after ranking, see above); empty: EOS only.
        use_tqdm: a progress bar over steps.

    Returns:
        One ``BeamSearchOutput`` per prompt: up to ``beam_width`` ``BeamSearchSequence``, best
        first, each with ``tokens`` (prompt + generated), ``cum_logprob`` and ``text``.

    Raises:
        ValueError: with a plugin, an engine whose ``logprobs_mode`` is not
            ``processed_logprobs`` (beams would be scored by the base alone) or
            ``structured_outputs`` (vLLM builds those steps' requests itself, without the
            plugin); an embedding prompt.
        vllm.exceptions.VLLMValidationError: a bad plugin argument or an engine that cannot
            serve the plugin (unknown name, weight out of range, speculative decoding, ...), as
            ``LLM.generate`` raises it, at the first step.
    """
    from tqdm import tqdm
    from vllm import SamplingParams
    from vllm.entrypoints.generate.beam_search.utils import (BeamSearchInstance, BeamSearchOutput,
                                                             create_sort_beams_key_function)

    from .processor import ARG_BEAM_TOKENS, ARG_MODE, ARG_PLUGIN, ARG_TOP_K, ARG_WEIGHT

    extra = None
    if plugin is not None:
        logprobs_mode = llm.llm_engine.vllm_config.model_config.logprobs_mode
        if logprobs_mode != BEAM_LOGPROBS_MODE:
            raise ValueError(
                f"plugin_beam_search: this engine returns logprobs_mode={logprobs_mode!r} log-probs, which vLLM "
                f"takes before logits processors, so beams would be scored by the base alone. Start the engine "
                f"with logprobs_mode={BEAM_LOGPROBS_MODE!r} (plugin_llm(..., logprobs_mode={BEAM_LOGPROBS_MODE!r}), "
                f"or --logprobs-mode {BEAM_LOGPROBS_MODE})")
        if params.structured_outputs is not None:
            raise ValueError("plugin_beam_search: structured_outputs is not supported with a plugin (vLLM builds "
                             "those beam steps' requests itself, without the plugin); drop structured_outputs")
        extra = {ARG_PLUGIN: plugin, ARG_WEIGHT: weight, ARG_MODE: mode}
        if base_top_k is not None:
            extra[ARG_TOP_K] = base_top_k
    llm.llm_engine.input_processor.resolve_watermarking(params)
    tokenizer = llm.get_tokenizer()
    sort_key = create_sort_beams_key_function(tokenizer.eos_token_id, params.length_penalty)
    def step_params(step: int) -> SamplingParams:
        # Every live beam has generated ``step`` tokens, which its request sends as prompt: the
        # processor counts them as output (a copy plugin reads the user's prompt only).
        return SamplingParams(logprobs=2 * params.beam_width, max_tokens=1, temperature=params.temperature,
                              watermarking=False, detokenize=False,
                              extra_args=extra and {**extra, ARG_BEAM_TOKENS: step})
    instances = []
    for prompt in llm._preprocess_cmpl(prompts):
        if prompt["type"] == "embeds":
            raise ValueError("plugin_beam_search: embedding prompts are not supported (the plugin reads token "
                             "ids, and vLLM's beam search refuses them too); pass token ids or text")
        instances.append(BeamSearchInstance(prompt, lora_request=None, logprobs=None))
    stop = frozenset(stop_token_ids)
    steps = range(params.max_tokens)
    for step in tqdm(steps, desc="Beam search", unit="token") if use_tqdm else steps:
        if llm._beam_search_step(instances_batch=instances, base_sampling_params=step_params(step),
                                 eos_token_id=tokenizer.eos_token_id, ignore_eos=params.ignore_eos,
                                 beam_width=params.beam_width, sort_beams_key=sort_key,
                                 structured_output_backend=None, structured_output_key=None,
                                 structured_output_bitmask=None):
            break
        if stop:
            for instance in instances:
                instance.completed += [b for b in instance.beams if b.tokens[-1] in stop]
                # Done once beam_width beams have finished (Hugging Face's early_stopping=True):
                # the live ones would be refilled every step until max_tokens otherwise.
                instance.beams = [] if len(instance.completed) >= params.beam_width else [
                    b for b in instance.beams if b.tokens[-1] not in stop]
    outputs = []
    for instance in instances:
        best = sorted(instance.completed + instance.beams, key=sort_key, reverse=True)[:params.beam_width]
        for beam in best:
            beam.text = tokenizer.decode(beam.tokens, skip_special_tokens=params.skip_special_tokens)
        outputs.append(BeamSearchOutput(sequences=best))
    return outputs
