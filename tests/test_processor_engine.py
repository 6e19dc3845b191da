"""The processor on a real vLLM engine (V1 runner, CPU, fp32) equals the reference decoder."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from importlib.metadata import entry_points

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt

from vllm_plugin.decode import reference_generate
from vllm_plugin.experts import combine
from vllm_plugin.processor import penalty_args

PROMPTS = [
    "Aromi is a",
    "the coffee shop near the riverside serves",
    "name -- Zizzi\narea -- riverside\nfood -- Italian\n\nSentence:\n",
    "Cotto",
    "Strada is a family friendly pub in the city centre with a high customer rating and",
]


def xargs(plugin=None, weight=None, mode=None):
    args = {}
    if plugin:
        args["plugin"] = plugin
    if weight is not None:
        args["plugin_weight"] = weight
    if mode is not None:
        args["plugin_mode"] = mode
    return args or None


def greedy(max_tokens, plugin=None, weight=None, mode=None, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args=xargs(plugin, weight, mode), **kw)


def reference(tiny, ids, plugin, weight, max_tokens, mode=None):
    model = tiny.plugins[plugin] if plugin else None
    return reference_generate(tiny.base, [ids], model, weight=1.0 if weight is None else weight,
                              max_new_tokens=max_tokens, mode=mode or "product")[0]


CASES = [(None, None, None), ("a", None, None), ("b", None, None), ("t", None, None), ("a", 0.5, None),
         ("b", 2.0, None), ("a", 0.0, None), ("b", 0.4, "mixture"), ("t", None, "alone"),
         ("g", None, None), ("g", 1.5, None), ("g", 0.6, "mixture"),  # g: a gated plugin
         ("c", None, None), ("c", 0.7, "mixture"),  # c: a plugin with copy scores
         ("s", None, None), ("s", 0.8, "mixture")]  # s: copy scores and a shortlist


def test_entry_point_is_installed_and_registered_twice(engine):
    """The engine loads the processor from the entry point AND from logits_processors."""
    names = [ep.name for ep in entry_points(group="vllm.logits_processors")]
    assert "plugin" in names  # so every equality below also proves the plugin is applied once


def test_mixed_batch_equals_reference(tiny, engine):
    """Plugins a, b, t, several strengths and no plugin, prompts of different lengths, one batch.

    Different max_tokens make rows finish at different steps, so the batch is condensed
    (requests removed and moved) while others keep decoding.
    """
    prompts, params, expected = [], [], []
    for i, (plugin, weight, mode) in enumerate(CASES * 2):
        ids = tiny.encode(PROMPTS[i % len(PROMPTS)])
        max_tokens = 6 + 3 * (i % 5)
        prompts.append(TokensPrompt(prompt_token_ids=ids))
        params.append(greedy(max_tokens, plugin, weight, mode))
        expected.append(reference(tiny, ids, plugin, weight, max_tokens, mode))
    outputs = engine.generate(prompts, params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outputs]
    for case, g, e in zip(CASES * 2, got, expected):
        assert g == e, case
    # Not vacuous: the plugins change what the base alone would say.
    alone = [reference(tiny, p["prompt_token_ids"], None, None, len(e)) for p, e in zip(prompts, expected)]
    changed = sum(a != e for a, e, (plugin, w, _) in zip(alone, expected, CASES * 2) if plugin and w != 0.0)
    assert changed >= 10
    zero_weight = [e == a for e, a, c in zip(expected, alone, CASES * 2) if c == ("a", 0.0, None)]
    assert all(zero_weight)


def assert_served_as_reference_and_feature_matters(tiny, engine, plugin: str, feature: str):
    """The engine decodes every prompt with ``plugin`` exactly as the reference does, and the same
    plugin without its ``feature`` module (set to None) decodes at least one differently."""
    import copy

    without = copy.deepcopy(tiny.plugins[plugin])
    setattr(without, feature, None)
    assert_served_as_reference_unlike(tiny, engine, plugin, without, [tiny.encode(p) for p in PROMPTS])


def assert_served_as_reference_unlike(tiny, engine, plugin: str, other, prompts: list[list[int]]):
    """The engine decodes every prompt (token ids) with ``plugin`` exactly as the reference does,
    and the reference with ``other`` (that plugin altered) decodes at least one differently."""
    outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], [greedy(12, plugin)] * len(prompts),
                           use_tqdm=False)
    differs = 0
    for ids, out in zip(prompts, outs):
        want = reference_generate(tiny.base, [ids], tiny.plugins[plugin], max_new_tokens=12)[0]
        assert list(out.outputs[0].token_ids) == want
        differs += want != reference_generate(tiny.base, [ids], other, max_new_tokens=12)[0]
    assert differs >= 1


def test_gated_plugin_strength_varies_by_position(tiny, engine):
    """Plugin g has a gate: its strength is the request's weight times 2 sigmoid(gate(hidden,
    entropies)) at each position, in the processor as in the reference; without the gate the same
    weights would decode differently."""
    assert_served_as_reference_and_feature_matters(tiny, engine, "g", "gate")
    with torch.no_grad():
        hidden = torch.randn(3, 32)
        strength = tiny.plugins["g"].strength(hidden, torch.randn(3, tiny.vocab_size), torch.randn(3, tiny.vocab_size))
    assert strength.shape == (3,) and ((strength > 0) & (strength < 2)).all() and strength.std() > 1e-3


def test_copy_scores_lift_the_prompt_tokens(tiny, engine):
    """Plugin c has copy scores: a learned per-position bonus on the tokens of the request's
    prompt, in the processor as in the reference (one prompt's tokens never leak into another
    row's); without them the same plugin decodes differently, and the bonus lands exactly on
    the prompt's tokens."""
    from vllm_plugin.decode import prompt_mask

    assert_served_as_reference_and_feature_matters(tiny, engine, "c", "copy_score")
    prompts = [tiny.encode(p) for p in PROMPTS]
    with torch.no_grad():
        hidden, logits = torch.randn(2, 32), torch.randn(2, tiny.vocab_size)
        mask = torch.cat([prompt_mask(prompts[0], tiny.vocab_size), prompt_mask(prompts[3], tiny.vocab_size)])
        lifted = tiny.plugins["c"].add_copy_score(hidden, logits, mask) - logits
    bonus = tiny.plugins["c"].copy_score(hidden)
    assert torch.equal(lifted != 0, mask) and torch.allclose(lifted, bonus * mask)


def test_copy_scores_read_the_task_after_the_last_marker(tiny, engine):
    """Plugin m's copy scores lift only the tokens of the prompt from the last ``COPY_MARKER`` on
    (the task after in-context examples), the whole prompt when it has none: served exactly as
    the reference decodes it, and the same plugin copying from the whole prompt decodes a
    prompt with an example before the task differently."""
    import copy

    from vllm_plugin.decode import copy_mask, prompt_mask

    from .conftest import COPY_MARKER

    example = f"name -- Zizzi\narea -- riverside\n\n{COPY_MARKER}\nZizzi is a pub by the riverside.\n\n"
    texts = [example + PROMPTS[2], example + example + "name -- Cotto\n\n" + COPY_MARKER + "\n", PROMPTS[0]]
    prompts = [tiny.encode(t) for t in texts]
    plugin = tiny.plugins["m"]
    whole = copy.deepcopy(plugin)
    whole.config.copy_after = []
    assert_served_as_reference_unlike(tiny, engine, "m", whole, prompts)
    task = tiny.encode(PROMPTS[2])  # the task's segment starts at its marker
    marker = tiny.tokenizer(COPY_MARKER, add_special_tokens=False).input_ids
    at = next(i for i in range(len(task)) if task[i:i + len(marker)] == marker)
    assert torch.equal(copy_mask(prompts[0], plugin), prompt_mask(task[at:], tiny.vocab_size))
    assert torch.equal(copy_mask(prompts[2], plugin), prompt_mask(prompts[2], tiny.vocab_size))


def test_plugin_reads_the_task_after_the_last_marker(tiny, engine):
    """Plugin r reads the prompt from its last ``COPY_MARKER`` on (``read_task_only``), the whole
    prompt when it has none, while the base reads all of it: served exactly as the reference
    decodes it; after an in-context example its state is the one the task alone gives, and the
    same plugin reading the whole prompt decodes such prompts differently."""
    import copy

    from vllm_plugin.model import read_start

    from .conftest import COPY_MARKER

    example = f"name -- Zizzi\narea -- riverside\n\n{COPY_MARKER}\nZizzi is a pub by the riverside.\n\n"
    texts = [example + p for p in PROMPTS[:3]] + [PROMPTS[0]]
    prompts = [tiny.encode(t) for t in texts]
    plugin = tiny.plugins["r"]
    whole = copy.deepcopy(plugin)
    whole.config.read_task_only = False
    assert_served_as_reference_unlike(tiny, engine, "r", whole, prompts)
    alone = tiny.encode(PROMPTS[2])  # its own marker: the plugin reads from there, after the example too
    assert prompts[2][read_start(plugin.config, prompts[2]):] == alone[read_start(plugin.config, alone):]
    assert 0 < read_start(plugin.config, alone) and read_start(plugin.config, prompts[3]) == 0
    assert read_start(whole.config, prompts[2]) == 0


def test_example_scores_lift_the_examples_tokens_the_task_lacks(tiny, engine):
    """Plugin e adds example scores: a bonus on the tokens of the prompt before its
    last ``COPY_MARKER`` that the task's segment lacks, read by the processor as by the reference:
    served exactly as the reference decodes it after an in-context example, differently without
    them; the mask is empty without an example and never holds a task token."""
    import copy

    from vllm_plugin.decode import copy_mask, example_mask

    from .conftest import COPY_MARKER

    example = f"name -- Zizzi\narea -- riverside\n\n{COPY_MARKER}\nZizzi is a pub by the riverside.\n\n"
    prompts = [tiny.encode(example + p) for p in PROMPTS] + [tiny.encode(PROMPTS[0])]  # the last: no marker
    plugin = tiny.plugins["e"]
    without = copy.deepcopy(plugin)
    without.example_score = None
    assert_served_as_reference_unlike(tiny, engine, "e", without, prompts)
    lifted = example_mask(prompts[2], plugin)
    assert lifted.any() and not (lifted & copy_mask(prompts[2], plugin)).any()
    assert not example_mask(prompts[-1], plugin).any()


def test_candidate_scores_lift_the_bases_top_tokens(tiny, engine):
    """Plugin q (shortlisted, copy scores, gate) adds candidate scores: a learned bonus per rank
    bucket on the base's top ``TINY_CANDIDATES`` tokens as the plugin sees the base. Served exactly
    as the reference decodes it, on the full base and on a top-k view, and without them the same
    plugin decodes differently; a view narrower than its candidates is refused at admission; a
    token the constraints masked gets no bonus, and tied tokens share the best bucket."""
    from vllm_plugin.model import candidate_buckets

    from .conftest import TINY_CANDIDATES, TINY_TOP_K

    assert_served_as_reference_and_feature_matters(tiny, engine, "q", "candidate_score")
    plugin, ids = tiny.plugins["q"], tiny.encode(PROMPTS[1])

    def params(top_k):
        return SamplingParams(max_tokens=12, temperature=0.0, extra_args={"plugin": "q", "plugin_base_top_k": top_k})

    out = engine.generate([TokensPrompt(prompt_token_ids=ids)], params(TINY_TOP_K), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == reference_generate(tiny.base, [ids], plugin, max_new_tokens=12,
                                                                top_k=TINY_TOP_K)[0]
    with pytest.raises((ValueError, VLLMValidationError), match="needs 0 \\(the full base\\) or at least 4"):
        engine.generate([TokensPrompt(prompt_token_ids=ids)], params(TINY_CANDIDATES - 1), use_tqdm=False)
    assert candidate_buckets(20).tolist() == [0, 1, 1, 2, 2, 2, 2] + [3] * 8 + [4] * 5
    with torch.no_grad():
        hidden, base = torch.randn(3, 32), torch.randn(3, tiny.vocab_size)
        base[1, 2:] = -math.inf  # two tokens allowed: only they can get a bonus
        base[2, :3] = 5.0  # three tied first: one bucket, the best, for all three
        lifted = plugin.add_candidate_score(hidden, torch.zeros(3, tiny.vocab_size), base)
        buckets = plugin.candidate_score(hidden)  # [3, buckets]: rank 1, 2-3, 4-7, ...
    top = base[0].topk(TINY_CANDIDATES).indices
    assert torch.allclose(lifted[0, top], buckets[0, [0, 1, 1, 2]]) and int((lifted[0] != 0).sum()) == TINY_CANDIDATES
    assert torch.allclose(lifted[1, base[1].topk(2).indices], buckets[1, [0, 1]]) and int((lifted[1] != 0).sum()) == 2
    assert torch.allclose(lifted[2, :3], buckets[2, 0].expand(3))
    assert torch.allclose(lifted[2, base[2].topk(TINY_CANDIDATES).indices[3]], buckets[2, 2])  # 3 above it: 4-7


def test_pending_copy_scores_lift_the_task_tokens_not_generated_yet(tiny, engine):
    """Plugin p adds pending-copy scores: a second bonus on the copied tokens that the output does
    not hold yet, which the processor reads from its output counts as the reference reads its
    output: served exactly as the reference decodes it, and without them the same plugin decodes
    differently; the bonus leaves a token once the output holds it."""
    from vllm_plugin.decode import copy_mask, pending_copy

    assert_served_as_reference_and_feature_matters(tiny, engine, "p", "pending_score")
    plugin, prompt = tiny.plugins["p"], tiny.encode(PROMPTS[0])
    mask = copy_mask(prompt, plugin)
    said = prompt[-3:]
    pending = pending_copy(mask, said)
    assert not pending[0, said].any() and torch.equal(pending | mask, mask)
    assert int(mask.sum()) - int(pending.sum()) == len(set(said) & set(prompt))
    with torch.no_grad():
        hidden, logits = torch.randn(1, 32), torch.randn(1, tiny.vocab_size)
        lifted = plugin.add_copy_score(hidden, logits, mask, pending) - logits
        with pytest.raises(ValueError, match="pending-copy scores"):
            plugin.add_copy_score(hidden, logits, mask)
    assert torch.allclose(lifted, plugin.copy_score(hidden) * mask + plugin.pending_score(hidden) * pending)


def test_input_bag_keeps_the_task_in_every_hidden_state(tiny, engine):
    """Plugin p has an input bag: the mean of a learned vector over its task's distinct tokens,
    added to every hidden state, which the processor sets once the prompt is whole as the
    reference sets it after reading the prompt: served exactly as the reference decodes it, and
    without it the same plugin decodes differently."""
    assert_served_as_reference_and_feature_matters(tiny, engine, "p", "bag")


def test_shortlisted_plugin_leaves_off_list_tokens_to_the_base(tiny, engine):
    """Plugin s scores a shortlist of its own and gives every other token one shared logit: served
    exactly as the reference decodes it, and without its copy scores it decodes differently; among
    off-list tokens its log-probs add the same amount to each, so the base alone orders them."""
    assert_served_as_reference_and_feature_matters(tiny, engine, "s", "copy_score")
    plugin = tiny.plugins["s"]
    off = plugin.index_of == plugin.config.shortlist_size
    with torch.no_grad():
        logits = plugin.head(torch.randn(3, 32))
    assert 0 < int(off.sum()) < tiny.vocab_size
    assert (logits[:, off] == logits[:, off][:, :1]).all() and logits[:, ~off].std() > 0.1


def penalised(max_tokens, plugin=None, weight=None, mode=None, **penalties):
    """Greedy params with vLLM's penalties: as vLLM's own arguments without a plugin, as the
    processor's ``plugin_*_penalty`` arguments with one (vLLM's are refused there)."""
    if plugin is None:
        return greedy(max_tokens, **penalties)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args={**xargs(plugin, weight, mode), **penalty_args(**penalties)})


@pytest.mark.parametrize("penalties", [{"repetition_penalty": 1.5},
                                       {"frequency_penalty": 0.9, "presence_penalty": 0.6},
                                       {"repetition_penalty": 1.2, "frequency_penalty": -0.4}])
def test_penalties_act_on_the_combined_logits(tiny, engine, penalties):
    """A plugin request's penalties are vLLM's formulas on the combined logits, applied by the
    processor (so identically on V1 and Model Runner V2); the reference does the same.

    Plugin a serves a product row and a mixture row in one batch: each must leave the numbers
    the reference computes, since the repetition penalty is not shift-invariant. The row
    without a plugin gets vLLM's own penalties: the same numbers.
    """
    cases = [(None, None, 0), ("a", None, 1), ("t", None, 2), ("b", None, 4), ("a", "mixture", 3), ("k", None, 0)]
    prompts = [tiny.encode(PROMPTS[p]) for _, _, p in cases]
    params = [penalised(14, plugin, 0.4 if mode else None, mode, **penalties) for plugin, mode, _ in cases]
    outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    changed = 0
    for (plugin, mode, _), ids, out in zip(cases, prompts, outs):
        weight = 0.4 if mode else 1.0
        model = tiny.plugins.get(plugin)
        top_k = model.config.training.get("top_k") if model is not None else None
        want = reference_generate(tiny.base, [ids], model, weight=weight, max_new_tokens=14,
                                  mode=mode or "product", top_k=top_k, **penalties)[0]
        assert list(out.outputs[0].token_ids) == want, (plugin, mode)
        changed += want != reference_generate(tiny.base, [ids], model, weight=weight, max_new_tokens=14,
                                              mode=mode or "product", top_k=top_k)[0]
    assert changed >= 2  # the penalties matter, so the equality above tests them


def test_expert_penalty_acts_on_each_expert_before_the_product(tiny, engine):
    """``plugin_expert_repetition_penalty`` is the paper's penalty: on the base's scores (its top-k
    view for a top-k plugin) and on the plugin's logits, separately, before they combine, for
    generated tokens only. Product, mixture and alone rows, the transformer, the top-k plugin and
    one row with vLLM's repetition penalty on top share a batch, each equal to the reference."""
    cases = [("a", None, 2.0, 1.0), ("t", None, 2.0, 1.0), ("a", "mixture", 1.5, 1.0), ("a", "alone", 2.0, 1.0),
             ("k", None, 2.0, 1.0), ("b", None, 1.5, 1.3), (None, None, 1.0, 1.0)]
    prompts = [tiny.encode(PROMPTS[i % len(PROMPTS)]) for i in range(len(cases))]
    params = [greedy(14) if plugin is None else SamplingParams(
        max_tokens=14, temperature=0.0, ignore_eos=True,
        extra_args={**xargs(plugin, 0.4 if mode == "mixture" else None, mode),
                    "plugin_expert_repetition_penalty": expert, **penalty_args(rp)})
        for plugin, mode, expert, rp in cases]
    outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    changed = 0
    for (plugin, mode, expert, rp), ids, out in zip(cases, prompts, outs):
        model = tiny.plugins.get(plugin)
        kwargs = dict(weight=0.4 if mode == "mixture" else 1.0, max_new_tokens=14, mode=mode or "product",
                      top_k=model.config.training.get("top_k") if model is not None else None,
                      repetition_penalty=rp)
        want = reference_generate(tiny.base, [ids], model, expert_repetition_penalty=expert, **kwargs)[0]
        assert list(out.outputs[0].token_ids) == want, (plugin, mode, expert, rp)
        changed += want != reference_generate(tiny.base, [ids], model, **kwargs)[0]
    assert changed >= 3  # the penalty matters, so the equality above tests it


def test_vllm_penalties_on_a_plugin_request_are_refused(tiny, engine):
    """vLLM's own penalties act after the plugin on V1 and before it on Model Runner V2: a plugin
    request that names them is refused with the arguments to use instead; none is served."""
    ids = TokensPrompt(prompt_token_ids=tiny.encode("Aromi is a"))
    for penalty in ({"repetition_penalty": 1.1}, {"frequency_penalty": 0.5}, {"presence_penalty": -1.0}):
        (name, _), = penalty.items()
        with pytest.raises(VLLMValidationError, match=rf"{name}=.*with a plugin.*differently by runner.*plugin_{name}"):
            engine.generate([ids], [greedy(3, "a", **penalty)], use_tqdm=False)
    for bad in ({"plugin_repetition_penalty": 0}, {"plugin_frequency_penalty": 2.5},
                {"plugin_expert_repetition_penalty": -1.1},
                {"plugin_presence_penalty": True}, {"plugin_repetition_penalty": float("nan")},
                {"plugin_beam_tokens": -1}, {"plugin_beam_tokens": 1.5}):
        with pytest.raises(VLLMValidationError, match=next(iter(bad))):
            engine.generate([ids], [SamplingParams(max_tokens=3, extra_args={"plugin": "a", **bad})], use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="given without 'plugin'"):
        engine.generate([ids], [SamplingParams(max_tokens=3, extra_args={"plugin_frequency_penalty": 0.5})],
                        use_tqdm=False)
    out = engine.generate([ids], [greedy(3, "a")], use_tqdm=False)[0]  # the engine still serves
    assert list(out.outputs[0].token_ids) == reference(tiny, ids["prompt_token_ids"], "a", None, 3)


def test_top_k_plugin_decodes_against_the_base_top_k(tiny, engine):
    """A plugin trained from top-k log-probs sees the base as it was trained: top-k plus a flat
    tail (by default, from its config); ``plugin_base_top_k`` overrides it per request."""
    trained = tiny.plugins["k"].config.training["top_k"]
    cases = [("k", None, trained, 1.0), ("k", 0, None, 1.0), ("a", 3, 3, 1.0), ("a", None, None, 1.0),
             ("k", None, trained, 1.3), ("k", 2, 2, 1.3)]
    prompts = [tiny.encode(PROMPTS[i % len(PROMPTS)]) for i in range(len(cases))]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                             extra_args={"plugin": p, **({} if k is None else {"plugin_base_top_k": k}),
                                         **penalty_args(rp)})
              for p, k, _, rp in cases]
    outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    differs = 0
    for (plugin, _, top_k, rp), ids, out in zip(cases, prompts, outs):
        want = reference_generate(tiny.base, [ids], tiny.plugins[plugin], max_new_tokens=12,
                                  repetition_penalty=rp, top_k=top_k)[0]
        assert list(out.outputs[0].token_ids) == want, (plugin, top_k, rp)
        full = reference_generate(tiny.base, [ids], tiny.plugins[plugin], max_new_tokens=12, repetition_penalty=rp)[0]
        differs += top_k is not None and want != full
    assert differs >= 2  # the top-k view changes the decoding, so the equalities test it


def _served_as_reference_and_unlike(tiny, engine, name: str, prompts, flat) -> int:
    """Serve plugin ``name`` (trained from top-k log-probs) on ``prompts`` greedily at its own k
    (the shortlisted path), with an expert penalty (the vocabulary-wide path) and at k = 3 per
    request; assert each output equals the reference decoder's, and return how many of those
    references differ from the same decode with ``flat`` (the plugin with a plain flat tail)."""
    from .conftest import TINY_TOP_K

    plugin, differs = tiny.plugins[name], 0
    for extra, k, expert in (({}, TINY_TOP_K, 1.0), ({"plugin_expert_repetition_penalty": 1.3}, TINY_TOP_K, 1.3),
                             ({"plugin_base_top_k": 3}, 3, 1.0)):
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, extra_args={"plugin": name, **extra})
        outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], [params] * len(prompts),
                               use_tqdm=False)
        for ids, out in zip(prompts, outs):
            want = reference_generate(tiny.base, [ids], plugin, max_new_tokens=12, top_k=k,
                                      expert_repetition_penalty=expert)[0]
            assert list(out.outputs[0].token_ids) == want, (extra, ids)
            differs += want != reference_generate(tiny.base, [ids], flat, max_new_tokens=12, top_k=k,
                                                  expert_repetition_penalty=expert)[0]
    return differs


def test_copy_tail_offset_lifts_the_task_out_of_the_flat_tail(tiny, engine):
    """Plugin l, trained from top-k log-probs with ``copy_tail_offset``, sees the base's top-k view
    with its task's tokens outside the top k at the k-th log-prob plus the offset, not in the flat
    tail: served exactly as the reference decodes it, on the shortlisted path, on the
    vocabulary-wide one (an expert penalty) and at another k per request; the same plugin with
    the flat tail alone decodes some prompt differently."""
    import copy

    from .conftest import COPY_MARKER

    example = f"name -- Zizzi\narea -- riverside\n\n{COPY_MARKER}\nZizzi is a pub by the riverside.\n\n"
    prompts = [tiny.encode(t) for t in (example + PROMPTS[2], PROMPTS[2], PROMPTS[4],
                                        example + "name -- Cotto\nfood -- Indian\n\n" + COPY_MARKER + "\n")]
    plugin = tiny.plugins["l"]
    flat = copy.deepcopy(plugin)
    flat.config.copy_tail_offset = None
    assert _served_as_reference_and_unlike(tiny, engine, "l", prompts, flat) >= 1


def test_tail_prior_shares_the_top_k_views_tail(tiny, engine):
    """Plugin u, trained from top-k log-probs with ``tail_prior``, sees the base's top-k view with
    the tail shared by its prior, not evenly: served exactly as the reference decodes it, on the
    shortlisted path, on the vocabulary-wide one (an expert penalty) and at another k per
    request; the same plugin with a flat tail decodes some prompt differently."""
    import copy

    prompts = [tiny.encode(p) for p in PROMPTS[:5]]
    plugin = tiny.plugins["u"]
    flat = copy.deepcopy(plugin)
    flat.tail_log_prior = None
    assert _served_as_reference_and_unlike(tiny, engine, "u", prompts, flat) >= 1


def test_requests_arriving_at_different_times(tiny, engine):
    """New rows join a batch that is already decoding; their prompts prefill while others step."""
    core = engine.llm_engine
    plan = {0: [("r0", 0, "a"), ("r1", 1, None)], 2: [("r2", 2, "b")], 5: [("r3", 3, "t"), ("r4", 4, "a")],
            9: [("r5", 0, "b")]}
    expected, finished = {}, {}
    step = 0
    while step <= max(plan) or core.has_unfinished_requests():
        for rid, p, plugin in plan.get(step, []):
            ids = tiny.encode(PROMPTS[p])
            core.add_request(rid, TokensPrompt(prompt_token_ids=ids), greedy(12, plugin))
            expected[rid] = reference(tiny, ids, plugin, None, 12)
        for out in core.step():
            if out.finished:
                finished[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    assert finished == expected


def test_parallel_sampling_children_each_get_the_plugin(tiny, engine):
    ids = tiny.encode(PROMPTS[1])
    # n > 1 needs sampling; top_k=1 samples the argmax.
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, top_k=1, ignore_eos=True, extra_args={"plugin": "b"})
    out = engine.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
    want = reference(tiny, ids, "b", None, 10)
    assert [list(c.token_ids) for c in out.outputs] == [want] * 3


def test_eos_stops_like_the_reference(tiny, engine):
    eos = tiny.tokenizer.eos_token_id
    prompts = [tiny.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=40, temperature=0.0, extra_args={"plugin": "a"})
    got = [list(o.outputs[0].token_ids) for o in
           engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)]
    want = reference_generate(tiny.base, prompts, tiny.plugins["a"], max_new_tokens=40, stop_token_ids=[eos])
    assert got == want


def test_seeded_sampling_matches_the_reference_distribution(tiny, engine):
    """vLLM's sampler draws differently from torch.multinomial, so compare distributions."""
    ids = tiny.encode(PROMPTS[0])
    n = 400
    params = [SamplingParams(max_tokens=1, temperature=1.0, seed=s, extra_args={"plugin": "a"}) for s in range(n)]
    outs = engine.generate([TokensPrompt(prompt_token_ids=ids)] * n, params, use_tqdm=False)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[0] for o in outs]), minlength=tiny.vocab_size)
    with torch.no_grad():
        base_logits = tiny.base(torch.tensor([ids])).logits[0, -1]
        plugin = tiny.plugins["a"]
        state = plugin.new_state(1)
        plugin.advance(state, torch.tensor([0]), torch.tensor([ids]), None, [0])
        probs = torch.softmax(combine(base_logits, plugin.logits(state, torch.tensor([0]))[0]), -1)
    base_probs = torch.softmax(base_logits, -1)
    assert (probs - base_probs).abs().sum() > 0.3  # the plugin moves the distribution
    freq = counts.float() / n
    for tok in torch.nonzero(probs > 0.03).flatten().tolist():
        p = probs[tok].item()
        assert abs(freq[tok].item() - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.01, (tok, p, freq[tok].item())
    # Same seed, same tokens.
    again = engine.generate([TokensPrompt(prompt_token_ids=ids)] * 5, params[:5], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs[:5]]


@pytest.mark.parametrize("args, message", [
    ({"plugin": "nope"}, "unknown plugin 'nope'"),
    ({"plugin": "a", "plugin_weight": -1}, "must be a number in"),
    ({"plugin": "a", "plugin_weight": float("nan")}, "must be a number in"),
    ({"plugin": "a", "plugin_weight": "1.0"}, "must be a number in"),
    ({"plugin_weight": 1.0}, "without 'plugin'"),
    ({"plugin": "a", "plugin_wieght": 1.0}, "unknown plugin argument"),
    ({"plugin": "a", "plugin_mode": "mixture", "plugin_weight": 1.5}, "must be a number in \\[0, 1\\]"),
    ({"plugin": "a", "plugin_mode": "sum"}, "'plugin_mode': combination mode must be one of product, mixture, alone"),
    ({"plugin": "a", "plugin_base_top_k": -1}, "must be an integer"),
    ({"plugin": "k", "plugin_base_top_k": 500}, "must be an integer in \\[0, 384\\]"),  # > vocabulary
    ({"plugin": "a", "plugin_base_top_k": 385}, "the base score 384 tokens"),
    ({"plugin": "q", "plugin_base_top_k": 2.0}, "with its candidate scores, 0 or at least 4"),
    ({"plugin": "a", "plugin_weight": True}, "must be a number in"),
    ({"plugin": "../../etc"}, "unknown plugin"),
])
def test_bad_request_is_refused_and_engine_keeps_serving(tiny, engine, args, message):
    ids = tiny.encode(PROMPTS[0])
    with pytest.raises((ValueError, VLLMValidationError), match=message):
        engine.generate([TokensPrompt(prompt_token_ids=ids)],
                        SamplingParams(max_tokens=4, temperature=0.0, extra_args=args), use_tqdm=False)
    out = engine.generate([TokensPrompt(prompt_token_ids=ids)], greedy(4, "a"), use_tqdm=False)[0]
    assert list(out.outputs[0].token_ids) == reference(tiny, ids, "a", None, 4)


def test_engine_refuses_to_start_with_a_non_finite_plugin(tiny, tmp_path):
    """A checkpoint whose out_bias is all NaN (served, every plugin request would decode token 0):
    a real engine refuses to start, naming the plugin, the tensor and the fix. (Own process: a
    second in-process engine would disturb the shared one.)"""
    from safetensors.torch import load_file, save_file

    from vllm_plugin.checkpoint import save_plugin

    folder = save_plugin(tiny.plugins["a"], tmp_path / "nan")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["out_bias"][:] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "vllm_plugin/1"})
    script = ("import sys\nfrom vllm import LLM\nfrom vllm_plugin.processor import PluginLogitsProcessor\n"
              "LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, max_model_len=64, max_num_seqs=2,"
              " logits_processors=[PluginLogitsProcessor])\nprint('ENGINE STARTED')\n")
    env = {**os.environ, "PLUGIN_LM_TABLE": json.dumps({"broken": str(folder)}), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, "-c", script, str(tiny.base_dir)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "ENGINE STARTED" not in proc.stdout, proc.stdout[-2000:]
    assert ("plugin 'broken'" in proc.stderr and "non-finite values" in proc.stderr
            and f"'out_bias' ({tiny.vocab_size} of {tiny.vocab_size} values)" in proc.stderr
            and "Retrain the plugin" in proc.stderr), proc.stderr[-3000:]


def test_forced_preemption(tiny):
    """A KV cache of 64 usable token slots for 5 requests of ~50 tokens: vLLM must preempt and resume.

    Resumed rows come back as new rows with output so far; the plugin rebuilds their state from
    prompt + output and the result still equals the reference. (Own process: see preemption_run.py.)
    """
    # p: copy region and pending tokens rebuilt on resume; e: example region; r: read from the marker;
    # q: candidate scores
    cases = [("a", 0), ("b", 1), (None, 3), ("t", 2), ("p", 2), ("e", 2), ("r", 2), ("q", 1)]
    requests = [{"ids": tiny.encode(PROMPTS[p]), "plugin": plugin} for plugin, p in cases]
    for r in requests:
        r["max_tokens"] = 50 - len(r["ids"])
    env = {**os.environ, "PLUGIN_LM_TABLE": tiny.env_value()}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("preemption_run.py")), str(tiny.base_dir),
                           json.dumps(requests)], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    for r, got in zip(requests, result["outputs"]):
        assert got == reference(tiny, r["ids"], r["plugin"], None, r["max_tokens"]), r["plugin"]
    assert result["preemptions"] > 0
