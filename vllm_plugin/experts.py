"""The product of experts (Logits are All We Need to Adapt Closed Models, ICML 2025), in one place.

``p(x) ∝ p_base(x) · p_plugin(x)^w``: the processor, the reference decoder, training (the base's
top-k view) and the benchmarks all import it from here, so the equation cannot drift between
them. Two baselines share the signature: a mixture ``w · p_plugin + (1 - w) · p_base`` and the
plugin alone.
"""
from __future__ import annotations

from enum import IntEnum

import torch


class Mode(IntEnum):
    """How the experts combine (request argument ``plugin_mode``, by name)."""

    PRODUCT = 0  # p_base · p_plugin^w, the paper
    MIXTURE = 1  # w · p_plugin + (1 - w) · p_base, a baseline
    ALONE = 2  # p_plugin, a baseline

    @classmethod
    def parse(cls, mode: str | Mode) -> Mode:
        """``"product"``, ``"mixture"``, ``"alone"`` (or a ``Mode``) -> ``Mode``.

        Raises:
            ValueError: any other value, naming the allowed ones.
        """
        if isinstance(mode, cls):
            return mode
        by_label = {m.label: m for m in cls}
        if isinstance(mode, str) and mode in by_label:
            return by_label[mode]
        raise ValueError(f"combination mode must be one of {', '.join(by_label)}, got {mode!r}")

    @property
    def label(self) -> str:
        return self.name.lower()


def base_top_k(base_logits: torch.Tensor, k: int, bias: torch.Tensor | None = None,
               lifted: torch.Tensor | None = None, lift_offset: float = 0.0,
               tail_prior: torch.Tensor | None = None) -> torch.Tensor:
    """The base as a closed API shows it: its top-``k`` log-probs, the remaining probability
    spread over every other token (evenly, or by ``tail_prior``). A plugin trained from top-k
    log-probs (``training.base_logits``, the same approximation) decodes against this, not the
    full base: against the full one, the tail tokens it learned to lift from a flat floor are
    lifted from wherever the full base has them.

    ``base_logits`` [n, V] are the logits as vLLM hands them to logits processors, after its
    constraints. Every token a constraint touched keeps its exact constrained log-prob instead
    of the tail's: those at -inf (``allowed_token_ids``, ``bad_words``, ``min_tokens``, a
    structured-output grammar) and those with a nonzero ``bias`` ([n, V], the request's
    ``logit_bias``); with ``tail_prior`` shifted by the row's renormalisation, as the top k are.
    So the view never lifts a token above what vLLM gave it relative to the top k, and a request
    keeps its constraints. Unconstrained logits give exactly the plain top-k view. ``lifted`` [n, V]
    bool and ``lift_offset``: the prompt's tokens lifted out of the flat tail; ``tail_prior`` [V]:
    log-probs the tail follows instead of spreading evenly (``top_k_with_flat_tail``).
    """
    log_probs = torch.log_softmax(base_logits.float(), -1)
    top, ids = log_probs.topk(k, dim=-1)
    view = top_k_with_flat_tail(ids, top, base_logits.shape[-1], lifted, lift_offset, tail_prior)
    touched = torch.isneginf(base_logits)
    if bias is not None:
        touched |= bias != 0
    if tail_prior is not None:  # the prior view is renormalised: a touched token moves with the top k
        log_probs = log_probs + (view.gather(-1, ids[..., :1]) - top[..., :1])
    return torch.where(touched, log_probs, view)


def top_k_with_flat_tail(ids: torch.Tensor, top: torch.Tensor, vocab_size: int, lifted: torch.Tensor | None = None,
                         lift_offset: float = 0.0, tail_prior: torch.Tensor | None = None) -> torch.Tensor:
    """[n, V] log-probs from [n, k] top log-probs ``top`` at token ids ``ids``: the mass they
    leave spread over the other tokens (evenly, unless lifted or by a prior, below). Training (cached top-k) and decoding (``base_top_k``)
    both build the base's top-k view here, so they cannot drift apart.

    ``lifted`` [n, V] bool: tokens placed apart from the rest of the tail (the task's input
    tokens, which a reference copies: ``PluginConfig.copy_tail_offset``). Those outside the top k
    sit at ``lifted_tail``'s value instead, and the others share what mass is left.
    ``tail_prior`` [V] (log-probs summing to 1; ``PluginConfig.tail_prior``): the mass left is
    shared in proportion to it instead of evenly (``prior_tail``), no tail token above the k-th
    listed log-prob (the API says it is not more likely), and the row renormalised for what that
    cap takes away (the top k keep their ratios); a uniform prior is the flat tail. Not with
    ``lifted``.
    """
    if tail_prior is not None:
        if lifted is not None:
            raise ValueError("a top-k view's tail follows a prior or lifts the prompt's tokens, not both")
        view = _capped_prior_view(ids, top, tail_prior)
        return view - view.logsumexp(-1, keepdim=True)
    if lifted is None:
        return flat_tail(top, vocab_size).expand(*top.shape[:-1], vocab_size).scatter(-1, ids, top)
    lifted = lifted.scatter(-1, ids, False)
    lift, tail = lifted_tail(top, lifted.sum(-1, keepdim=True), vocab_size, lift_offset)
    return torch.where(lifted, lift, tail).scatter(-1, ids, top)


def _left_mass(top: torch.Tensor) -> torch.Tensor:
    """[..., 1] the probability the top-k log-probs ``top`` [..., k] leave to the other tokens
    (kept above 0, so its log stays finite when the top k hold all of it)."""
    return (1.0 - top.exp().sum(-1, keepdim=True)).clamp(min=1e-6)


def flat_tail(top: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., 1] log-prob of each token outside the top-k: the mass the top-k log-probs ``top``
    [..., k] leave, spread evenly over the other ``vocab_size - k`` tokens."""
    return (_left_mass(top) / (vocab_size - top.shape[-1])).log()


def lifted_tail(top: torch.Tensor, n_lifted: torch.Tensor, vocab_size: int, offset: float):
    """([..., 1], [..., 1]) log-probs of a lifted token outside the top k and of every other tail
    token, given the top-k log-probs ``top`` [..., k] and how many tokens are lifted ``n_lifted``
    [..., 1]: a lifted token sits ``offset`` nats (<= 0) from the k-th log-prob, at most half
    the mass left over shared among the lifted ones, and the other tail tokens share the rest
    evenly, so the view stays a distribution. ``n_lifted`` = 0 gives ``flat_tail``."""
    left = _left_mass(top)
    n = n_lifted.to(top.dtype)
    lift = torch.minimum(top.amin(-1, keepdim=True) + offset, (0.5 * left / n.clamp(min=1)).log())
    tail = ((left - n * lift.exp()) / (vocab_size - top.shape[-1] - n).clamp(min=1)).log()
    return lift, tail


def prior_tail(top: torch.Tensor, ids: torch.Tensor, tail_prior: torch.Tensor) -> torch.Tensor:
    """[..., 1]: what to add to ``tail_prior`` [V] (log-probs) for each token outside the top k
    (``top``, ``ids`` [..., k]) so that those tokens share the mass the top k leave in
    proportion to the prior, before ``top_k_with_flat_tail`` caps them at the k-th log-prob:
    log(1 - sum exp(top)) - log(1 - sum of the prior over ``ids``)."""
    return _left_mass(top).log() - _left_mass(tail_prior[ids]).log()


def capped_prior_tail(tail: torch.Tensor, prior_at: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Tail tokens' log-probs in the prior view: ``tail`` [n, 1] (``prior_tail``, less any row
    shift) plus their prior ``prior_at`` ([m] or [n, m]), capped at the k-th of ``top`` [n, k]
    (shifted alike): the one rule training's sparse reads (``BaseLogits``) and the dense view share."""
    return torch.minimum(tail + prior_at, top.amin(-1, keepdim=True))


def _capped_prior_view(ids: torch.Tensor, top: torch.Tensor, tail_prior: torch.Tensor) -> torch.Tensor:
    """[n, V] the prior-tail view before it is renormalised (``top_k_with_flat_tail``)."""
    return capped_prior_tail(prior_tail(top, ids, tail_prior), tail_prior, top).scatter(-1, ids, top)


def prior_tail_log_norm(ids: torch.Tensor, top: torch.Tensor, tail_prior: torch.Tensor) -> torch.Tensor:
    """[n, 1] what ``top_k_with_flat_tail`` subtracts from the prior-tail view of each row to
    renormalise it after the cap (0 where no tail token reached the k-th log-prob)."""
    return _capped_prior_view(ids, top, tail_prior).logsumexp(-1, keepdim=True)


_LOG_P_FLOOR = -80.0


def entropy(scores: torch.Tensor) -> torch.Tensor:
    """[...] entropy (nats) of ``softmax(scores)`` over the last dimension, in float32: what a
    gated plugin reads of each expert (``PluginLM.strength``). A score of -inf (a token masked
    before the processor: a grammar, bad words) counts as probability 0."""
    # -sum p log p from the log-probs: no log of tiny probabilities (torch.special.entr took over
    # 40 % of the processor's time per decode step, see the throughput profile). The floor keeps
    # a masked token's share finite, in value and in gradient (0 * -inf would be NaN), and keeps
    # exp out of float32's subnormal range (below e^-87.3), which this CPU computes many times
    # slower: a plugin's log-probs reach -100 on most of the vocabulary. What the floor adds, at
    # most V * 80 e^-80 (< 1e-28 nats), float32 cannot hold beside an entropy.
    log_p = torch.log_softmax(scores.float(), -1).clamp_min(_LOG_P_FLOOR)
    return -(log_p.exp() * log_p).sum(-1)


def entropy_with_flat(scores: torch.Tensor, flat: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """[n] entropy (nats) of the softmax over ``scores`` [n, m] and, for each g, ``counts[:, g]``
    more columns that all hold ``flat[:, g]`` ([n, G] each; a count may be 0): ``log Z - E_p[z]``
    without building those columns. A shortlisted plugin's logits over the vocabulary are its
    shortlist's scores and a few such flat groups (the rest row, lifted on copied tokens), so
    its entropy costs its shortlist, not the vocabulary (training's loss and the processor)."""
    scores, flat = scores.float(), flat.float()
    # Each group's log of summed exp; an empty group's -inf floored so no gradient is NaN.
    log_mass = (flat + counts.float().log()).clamp_min(torch.finfo(torch.float32).min)
    log_z = torch.logaddexp(scores.logsumexp(-1), log_mass.logsumexp(-1))
    p, p_flat = (scores - log_z[:, None]).exp(), (log_mass - log_z[:, None]).exp()
    return log_z - (p * scores).sum(-1) - (p_flat * flat).sum(-1)


def penalise_generated(scores: torch.Tensor, generated: torch.Tensor, penalty: float) -> torch.Tensor:
    """The paper's repetition penalty on one expert's scores [..., V]: where ``generated`` (bool,
    same shape: tokens this sequence has generated so far, the prompt not counted), positive
    scores are divided by ``penalty`` and negative ones multiplied (the CTRL / Hugging Face
    formula). Its code applies 1.1 to the base's logits and, separately, to the plugin's, before
    the product; vLLM's ``repetition_penalty`` instead covers prompt tokens too and acts on the
    combined scores."""
    factor = torch.where(generated, torch.tensor(float(penalty), dtype=scores.dtype), torch.tensor(1.0, dtype=scores.dtype))
    return scores * torch.where(scores > 0, 1.0 / factor, factor)


def combine(base_logits: torch.Tensor, plugin_logits: torch.Tensor, weight: float | torch.Tensor = 1.0,
            mode: str | Mode = Mode.PRODUCT, top_k: int | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scores whose softmax is the combined next-token distribution, exactly as the processor
    leaves vLLM's logits (so penalties applied after it act on the same numbers).

    product: p_base * p_plugin^w (the paper); mixture: w p_plugin + (1 - w) p_base; alone: p_plugin.
    Batched use (the processor): logits [n, V] and a weight column [n, 1]. ``top_k``: see
    ``base_top_k`` (a plugin trained from top-k log-probs).

    ``base_logits`` come after vLLM's constraints (-inf where masked, ``logit_bias`` added;
    ``bias`` [n, V] is that bias, or None). The combination keeps them in every mode: in the
    product the base carries them (a masked token stays -inf, a bias counts once); in the
    mixture and alone, the plugin gets the same masks and bias before its softmax.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if top_k:
        base_logits = base_top_k(base_logits, top_k, bias)
    mode = Mode.parse(mode)
    if mode == Mode.PRODUCT:  # raw base logits: the softmax that follows renormalises
        return base_logits.float() + weight * torch.log_softmax(plugin_logits.float(), -1)
    plugin_logits = plugin_logits.float() if bias is None else plugin_logits.float() + bias
    plugin = torch.log_softmax(plugin_logits.masked_fill(torch.isneginf(base_logits), float("-inf")), -1)
    base = torch.log_softmax(base_logits.float(), -1)
    if mode == Mode.MIXTURE:
        w = torch.as_tensor(weight, dtype=torch.float32, device=plugin.device)
        return torch.logaddexp(plugin + w.log(), base + (1 - w).log())
    return plugin  # Mode.ALONE
