"""Reference decoder: plain PyTorch/transformers, one sequence at a time, no tricks.

Each step combines the experts with ``experts.combine`` (the paper's
``log_softmax(base) + weight * log_softmax(plugin)``, renormalised by the softmax that
follows). It is the oracle the vLLM processor must match token for token.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from .experts import Mode, base_top_k, combine, penalise_generated
from .model import PluginLM, copy_start, read_start


def constrain(logits: torch.Tensor, out: list[int], grammar=None, allowed_token_ids=None, bad_words=(),
              masked_stop_ids=(), logit_bias=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[V] logits with vLLM's request constraints applied (see ``reference_generate``), and the
    [V] bias they carry (None without ``logit_bias``)."""
    logits = logits.float().clone()
    if grammar is not None:
        logits[~grammar(out)] = float("-inf")
    if allowed_token_ids is not None:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[list(allowed_token_ids)] = True
        logits[~keep] = float("-inf")
    for word in bad_words:
        if len(out) >= len(word) - 1 and list(out[len(out) - len(word) + 1:]) == list(word[:-1]):
            logits[word[-1]] = float("-inf")
    logits[list(masked_stop_ids)] = float("-inf")
    bias = None
    if logit_bias:
        bias = torch.zeros_like(logits)
        bias[list(logit_bias)] = torch.tensor(list(logit_bias.values()), dtype=bias.dtype)
        logits += bias
    return logits, bias


def prompt_mask(prompt: Sequence[int], vocab_size: int) -> torch.Tensor:
    """[1, V] bool: the tokens that occur in ``prompt`` (what a plugin's copy scores read)."""
    mask = torch.zeros(1, vocab_size, dtype=torch.bool)
    mask[0, torch.tensor(list(prompt), dtype=torch.long)] = True
    return mask


def copy_mask(prompt: Sequence[int], plugin: PluginLM) -> torch.Tensor:
    """[1, V] bool: the tokens ``plugin``'s copy scores lift for ``prompt``: those of its part from
    the last ``copy_after`` marker on (``model.copy_start``; the whole prompt without one)."""
    return prompt_mask(list(prompt)[copy_start(prompt, plugin.config.copy_after):], plugin.config.vocab_size)


def example_mask(prompt: Sequence[int], plugin: PluginLM) -> torch.Tensor | None:
    """[1, V] bool: the tokens ``plugin``'s example scores lift for ``prompt`` (``copy_example``):
    those of its part before the last ``copy_after`` marker that the part from it on does not
    hold; None for a plugin without example scores."""
    if plugin.example_score is None:
        return None
    start = copy_start(prompt, plugin.config.copy_after)
    return prompt_mask(list(prompt)[:start], plugin.config.vocab_size) & ~copy_mask(prompt, plugin)


def tail_view(plugin: PluginLM, in_prompt: torch.Tensor) -> tuple[torch.Tensor | None, float, torch.Tensor | None]:
    """``experts.base_top_k``'s ``lifted``, ``lift_offset`` and ``tail_prior`` for ``plugin``:
    the tokens its copy scores lift (``in_prompt`` [1, V], ``copy_mask``) if it lifts them out of
    the flat tail (``PluginConfig.copy_tail_offset``), else (None, 0.0); its tail prior or None."""
    offset = plugin.config.copy_tail_offset
    return (None, 0.0, plugin.tail_log_prior) if offset is None else (in_prompt, offset, None)


def pending_copy(in_prompt: torch.Tensor, generated: Sequence[int]) -> torch.Tensor:
    """[1, V] bool: the tokens of ``in_prompt`` ([1, V], ``copy_mask``) that ``generated`` (the
    output so far) does not hold: what a plugin's pending-copy scores lift (``copy_pending``)."""
    pending = in_prompt.clone()
    pending[0, torch.tensor(list(generated), dtype=torch.long)] = False
    return pending


@torch.no_grad()
def reference_generate(base, prompts: Sequence[Sequence[int]], plugin: PluginLM | None = None,
                       weight: float = 1.0, max_new_tokens: int = 64, temperature: float = 0.0,
                       seed: int | None = None, stop_token_ids: Sequence[int] = (),
                       use_cache: bool = True, mode: str = "product",
                       repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                       presence_penalty: float = 0.0, expert_repetition_penalty: float = 1.0, top_k: int | None = None, allowed_token_ids: Sequence[int] | None = None,
                       bad_words: Sequence[Sequence[int]] = (), min_tokens: int = 0,
                       logit_bias: dict[int, float] | None = None,
                       grammar: Callable[[list[int]], torch.Tensor] | None = None) -> list[list[int]]:
    """Generate for each prompt; ``base=None`` decodes with the plugin alone.

    Greedy when ``temperature == 0``, else seeded multinomial sampling. A generated stop token
    ends the sequence and is kept in its output, as vLLM keeps it in ``token_ids``.
    ``repetition_penalty`` is vLLM's: on the combined scores, for tokens of the prompt or the
    output so far, positive scores are divided by it and negative ones multiplied.
    ``frequency_penalty`` and ``presence_penalty`` are vLLM's (OpenAI's) too, applied after it:
    each token's score drops by the first times its count in the output so far, and by the second
    if it occurs there at all (prompt tokens do not count). A plugin request takes all three as
    ``plugin_*_penalty`` arguments, which the processor applies exactly so on every model runner.
    ``expert_repetition_penalty`` is the paper's (``penalise_generated``): on the base's scores
    (its top-k view if ``top_k``) and on the plugin's logits, separately, before they combine,
    for generated tokens only; the processor's ``plugin_expert_repetition_penalty``.
    ``top_k``: the base shows only its top-k log-probs (``base_top_k``). A plugin with copy
    scores adds them to its logits first, on the tokens of the prompt (``PluginLM.add_copy_score``;
    pending-copy scores on those the output does not hold yet, example scores on the in-context
    examples' tokens that the task lacks), and one with candidate scores on the base's K most
    likely tokens after the constraints, before the top-k view (``PluginLM.add_candidate_score``).
    One with an input bag gets its task's (``PluginLM.set_bag``) once it has read the prompt.
    A plugin that reads the task only
    (``read_task_only``) reads the prompt from its last marker on.

    Constraints act on the base's logits before the plugin, as vLLM applies them before logits
    processors: ``grammar(output so far)`` gives a [V] bool mask of allowed next tokens (a
    structured-output grammar), ``allowed_token_ids``, ``bad_words`` (token-id sequences: the last
    id is masked when the output ends with the others), ``min_tokens`` (``stop_token_ids`` masked
    until that many tokens), then ``logit_bias`` added; ``combine`` keeps them in every mode.
    """
    if base is None and plugin is None:
        raise ValueError("need a base model, a plugin, or both")
    mode = Mode.parse(mode)
    slot = torch.zeros(1, dtype=torch.long)
    results = []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = list(prompt)
        out: list[int] = []
        past = None
        if plugin is not None:  # it reads the prompt from ``start`` on (the task only, or all of it)
            start = read_start(plugin.config, ids)
            state = plugin.new_state(1)
            plugin.advance(state, slot, torch.tensor([ids[start:]]), [len(ids) - start], [0])
            in_prompt, in_example = copy_mask(prompt, plugin), example_mask(prompt, plugin)
            if plugin.bag is not None:
                plugin.set_bag(state, slot, in_prompt)
        for _ in range(max_new_tokens):
            if base is not None:
                if use_cache:
                    feed = ids if past is None else ids[-1:]
                    res = base(input_ids=torch.tensor([feed]), past_key_values=past, use_cache=True)
                    past = res.past_key_values
                else:
                    res = base(input_ids=torch.tensor([ids]), use_cache=False)
                base_logits, bias = constrain(res.logits[0, -1], out, grammar, allowed_token_ids, bad_words,
                                              stop_token_ids if len(out) < min_tokens else (), logit_bias)
            plugin_logits = None
            if plugin is not None:
                plugin_logits = plugin.add_copy_score(state["out"][slot], plugin.logits(state, slot), in_prompt,
                                                      pending_copy(in_prompt, out), in_example)
                if base is not None:  # candidate scores: the base's own top tokens, before any top-k view
                    plugin_logits = plugin.add_candidate_score(state["out"][slot], plugin_logits, base_logits[None])
                plugin_logits = plugin_logits[0].float()
            if plugin is not None and base is not None and top_k:  # the base as the plugin sees it
                base_logits = base_top_k(base_logits[None], top_k, None if bias is None else bias[None],
                                         *tail_view(plugin, in_prompt))[0]
            if expert_repetition_penalty != 1.0 and plugin is not None:
                generated = torch.zeros(plugin_logits.shape[-1], dtype=torch.bool)
                generated[torch.tensor(out, dtype=torch.long)] = True
                plugin_logits = penalise_generated(plugin_logits, generated, expert_repetition_penalty)
                if base is not None:
                    base_logits = penalise_generated(base_logits.float(), generated, expert_repetition_penalty)
            if plugin is None:
                scores = base_logits.float()
            elif base is None:
                scores = torch.log_softmax(plugin_logits, -1)
            else:
                strength = weight
                if mode == Mode.PRODUCT:  # a gated plugin's strength at this position
                    gate = plugin.strength(state["out"][slot], base_logits[None], plugin_logits[None])
                    strength = weight if gate is None else weight * float(gate[0])
                scores = combine(base_logits, plugin_logits, strength, mode, None, bias)
            if repetition_penalty != 1.0:
                seen = torch.zeros_like(scores, dtype=torch.bool)
                seen[torch.tensor(ids)] = True
                penalty = torch.where(seen, torch.tensor(repetition_penalty), torch.tensor(1.0))
                scores = scores * torch.where(scores > 0, 1.0 / penalty, penalty)
            if (frequency_penalty or presence_penalty) and out:
                counts = torch.bincount(torch.tensor(out), minlength=scores.shape[-1])
                scores = scores - frequency_penalty * counts - presence_penalty * (counts > 0)
            if temperature == 0.0:
                tok = int(torch.argmax(scores))
            else:
                probs = torch.softmax(scores / temperature, -1)
                tok = int(torch.multinomial(probs, 1, generator=generator))
            ids.append(tok)
            out.append(tok)
            if tok in stop_token_ids:
                break
            if plugin is not None:
                plugin.advance(state, slot, torch.tensor([[tok]]), None, [len(ids) - 1 - start])
        results.append(out)
    return results


@torch.no_grad()
def reference_beam_search(base, prompt: Sequence[int], plugin: PluginLM | None = None, beam_width: int = 2,
                          max_new_tokens: int = 16, weight: float = 1.0, mode: str = "product",
                          top_k: int | None = None, eos_token_id: int | None = None, ignore_eos: bool = False,
                          length_penalty: float = 1.0, stop_token_ids: Collection[int] = ()
                          ) -> list[tuple[list[int], float]]:
    """Beam search over the combined distribution, one sequence (and one beam) at a time.

    The oracle for ``serving.plugin_beam_search``; it follows vLLM's beam search
    (``vllm/entrypoints/generate/beam_search/offline.py``, after Hugging Face's): every step,
    each live beam proposes its ``2 * beam_width`` most likely next tokens under
    ``log_softmax(combine(base, plugin))`` (the base alone when ``plugin`` is None); a
    candidate ending in ``eos_token_id`` is set aside as finished (unless ``ignore_eos``), the
    others compete and the ``beam_width`` best by cumulative log-prob live on, less those that
    end in one of ``stop_token_ids``, which finish; with stop tokens, the search ends once
    ``beam_width`` beams have finished (``beam.plugin_beam_search``). At the end the
    finished and live beams are ranked by ``cum_logprob / length ** length_penalty``, where
    ``length`` counts the prompt and the generated tokens but not a final EOS.

    Each beam's base logits and plugin state are recomputed from its whole sequence (the plugin's
    from its marker on if it reads the task only), with no
    cache: slow, and as plain as it gets. A gated plugin's strength is its gate's at each step,
    as in ``reference_generate``.

    Args:
        base: an HF causal LM (logits [1, L, V] from ``base(input_ids=[1, L])``).
        prompt: the prompt's token ids.
        plugin, weight, mode, top_k: as in ``combine`` / ``reference_generate``.

    Returns:
        Up to ``beam_width`` (tokens, cumulative log-prob in nats) pairs, best first; ``tokens``
        is the prompt followed by the beam's generated tokens (as vLLM's ``BeamSearchSequence``).

    Raises:
        ValueError: ``beam_width`` or ``max_new_tokens`` below 1.
    """
    if beam_width < 1 or max_new_tokens < 1:
        raise ValueError(f"beam_width and max_new_tokens must be >= 1, got {beam_width}, {max_new_tokens}")
    slot = torch.zeros(1, dtype=torch.long)
    in_prompt = copy_mask(prompt, plugin) if plugin is not None else None
    in_example = example_mask(prompt, plugin) if plugin is not None else None
    start = read_start(plugin.config, prompt) if plugin is not None else 0

    def next_log_probs(tokens: list[int]) -> torch.Tensor:
        base_logits = base(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].float()
        if plugin is None:
            return torch.log_softmax(base_logits, -1)
        state = plugin.new_state(1)
        if plugin.bag is not None:  # the prompt's task, not the beam's tokens
            plugin.set_bag(state, slot, in_prompt)
        plugin.advance(state, slot, torch.tensor([tokens[start:]]), [len(tokens) - start], [0])
        plugin_logits = plugin.add_copy_score(state["out"][slot], plugin.logits(state, slot), in_prompt,
                                              pending_copy(in_prompt, tokens[len(prompt):]), in_example)
        plugin_logits = plugin.add_candidate_score(state["out"][slot], plugin_logits, base_logits[None])[0]
        if top_k:  # the base as the plugin sees it, also for its gate
            base_logits = base_top_k(base_logits[None], top_k, None, *tail_view(plugin, in_prompt))[0]
        strength = weight
        if Mode.parse(mode) == Mode.PRODUCT:  # a gated plugin's strength at this position
            gate = plugin.strength(state["out"][slot], base_logits[None], plugin_logits[None])
            strength = weight if gate is None else weight * float(gate[0])
        return torch.log_softmax(combine(base_logits, plugin_logits, strength, mode), -1)

    def score(tokens: list[int], cum: float) -> float:
        length = len(tokens) - (tokens[-1] == eos_token_id)
        return cum / max(length, 1) ** length_penalty

    beams: list[tuple[list[int], float]] = [(list(prompt), 0.0)]
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_new_tokens):
        candidates = []
        for tokens, cum in beams:
            top, ids = next_log_probs(tokens).topk(2 * beam_width)
            for lp, tok in zip(top.tolist(), ids.tolist()):
                new = (tokens + [tok], cum + lp)
                (finished if tok == eos_token_id and not ignore_eos else candidates).append(new)
        beams = sorted(candidates, key=lambda b: score(*b), reverse=True)[:beam_width]
        if stop_token_ids:
            finished += [b for b in beams if b[0][-1] in stop_token_ids]
            beams = [] if len(finished) >= beam_width else [b for b in beams if b[0][-1] not in stop_token_ids]
        if not beams:
            break
    return sorted(finished + beams, key=lambda b: score(*b), reverse=True)[:beam_width]
