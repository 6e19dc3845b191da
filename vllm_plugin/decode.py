"""Reference decoder: plain PyTorch/transformers, one sequence at a time, no tricks.

Each step combines the experts exactly as the paper does,
``log_softmax(base) + weight * log_softmax(plugin)``, renormalised by the softmax that
follows. It is the oracle the vLLM processor must match token for token.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import PluginLM


def base_top_k(base_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The base as a closed API shows it: its top-``k`` log-probs, the remaining probability
    spread evenly over every other token. A plugin trained from top-k log-probs
    (``training.base_logits``, the same approximation) decodes against this, not the full base:
    against the full one, the tail tokens it learned to lift from a flat floor are lifted from
    wherever the full base has them."""
    top, ids = torch.log_softmax(base_logits.float(), -1).topk(k, dim=-1)
    return top_k_with_flat_tail(ids, top, base_logits.shape[-1])


def top_k_with_flat_tail(ids: torch.Tensor, top: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, V] log-probs from [n, k] top log-probs ``top`` at token ids ``ids``: the mass they
    leave spread evenly over the other tokens. Training (cached top-k) and decoding (``base_top_k``)
    both build the base's top-k view here, so they cannot drift apart."""
    tail = (1.0 - top.exp().sum(-1, keepdim=True)).clamp(min=1e-6) / (vocab_size - ids.shape[-1])
    return tail.log().expand(*top.shape[:-1], vocab_size).scatter(-1, ids, top)


def combine(base_logits: torch.Tensor, plugin_logits: torch.Tensor, weight: float | torch.Tensor = 1.0,
            mode: str = "product", top_k: int | None = None) -> torch.Tensor:
    """Scores whose softmax is the combined next-token distribution, exactly as the processor
    leaves vLLM's logits (so penalties applied after it act on the same numbers).

    product: p_base * p_plugin^w (the paper); mixture: w p_plugin + (1 - w) p_base; alone: p_plugin.
    Batched use (the processor): logits [n, V] and a weight column [n, 1]. ``top_k``: see
    ``base_top_k`` (a plugin trained from top-k log-probs).
    """
    if top_k:
        base_logits = base_top_k(base_logits, top_k)
    plugin = torch.log_softmax(plugin_logits.float(), -1)
    if mode == "product":  # raw base logits: the softmax that follows renormalises
        return base_logits.float() + weight * plugin
    base = torch.log_softmax(base_logits.float(), -1)
    if mode == "mixture":
        w = torch.as_tensor(weight, dtype=torch.float32, device=plugin.device)
        return torch.logaddexp(plugin + w.log(), base + (1 - w).log())
    if mode == "alone":
        return plugin
    raise ValueError(f"unknown combination mode {mode!r}")


@torch.no_grad()
def reference_generate(base, prompts: Sequence[Sequence[int]], plugin: PluginLM | None = None,
                       weight: float = 1.0, max_new_tokens: int = 64, temperature: float = 0.0,
                       seed: int | None = None, stop_token_ids: Sequence[int] = (),
                       use_cache: bool = True, mode: str = "product",
                       repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                       top_k: int | None = None) -> list[list[int]]:
    """Generate for each prompt; ``base=None`` decodes with the plugin alone.

    Greedy when ``temperature == 0``, else seeded multinomial sampling. A generated stop token
    ends the sequence and is kept in its output, as vLLM keeps it in ``token_ids``.
    ``repetition_penalty`` is vLLM's: on the combined scores, for tokens of the prompt or the
    output so far, positive scores are divided by it and negative ones multiplied.
    ``frequency_penalty`` is vLLM's (OpenAI's) too, applied after it: each token's score drops
    by the penalty times its count in the output so far (prompt tokens do not count).
    ``top_k``: the base shows only its top-k log-probs (``base_top_k``).
    """
    if base is None and plugin is None:
        raise ValueError("need a base model, a plugin, or both")
    slot = torch.zeros(1, dtype=torch.long)
    results = []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        ids = list(prompt)
        out: list[int] = []
        past = None
        if plugin is not None:
            state = plugin.new_state(1)
            plugin.advance(state, slot, torch.tensor([ids]), [len(ids)], [0])
        for _ in range(max_new_tokens):
            if base is not None:
                if use_cache:
                    feed = ids if past is None else ids[-1:]
                    res = base(input_ids=torch.tensor([feed]), past_key_values=past, use_cache=True)
                    past = res.past_key_values
                else:
                    res = base(input_ids=torch.tensor([ids]), use_cache=False)
                base_logits = res.logits[0, -1]
            if plugin is None:
                scores = base_logits.float()
            elif base is None:
                scores = torch.log_softmax(plugin.logits(state, slot)[0].float(), -1)
            else:
                scores = combine(base_logits, plugin.logits(state, slot)[0], weight, mode, top_k)
            if repetition_penalty != 1.0:
                seen = torch.zeros_like(scores, dtype=torch.bool)
                seen[torch.tensor(ids)] = True
                penalty = torch.where(seen, torch.tensor(repetition_penalty), torch.tensor(1.0))
                scores = scores * torch.where(scores > 0, 1.0 / penalty, penalty)
            if frequency_penalty and out:
                scores = scores - frequency_penalty * torch.bincount(torch.tensor(out), minlength=scores.shape[-1])
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
                plugin.advance(state, slot, torch.tensor([[tok]]), None, [len(ids) - 1])
        results.append(out)
    return results
