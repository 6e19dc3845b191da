"""vLLM's request constraints hold for plugin requests in every mode and base view.

vLLM applies ``allowed_token_ids``, ``bad_words``, ``min_tokens``, ``logit_bias`` and the
structured-output grammar mask before logits processors. Each case below decodes with a plugin
(product, mixture, alone; against the full base, and against the base's top-k view) under one
constraint, checks that the constraint holds, and checks the greedy tokens against the
reference decoder applying the same constraint to the base's logits (``decode.constrain``).
"""
import json

import pytest
import regex
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import StructuredOutputsParams

from vllm_plugin.decode import reference_generate

from .conftest import TINY_TOP_K

PROMPTS = ["Aromi is a", "the coffee shop near the riverside serves", "Cotto"]
# (plugin, weight, mode): a decodes against the full base, k against the base's top-5 view
# (it was trained from top-5 log-probs); weight 5 makes the plugin dominate the product; q's
# candidate scores sit on the base's top 4 after the constraints (allowed_token_ids leaves 3).
USES = [("a", 1.0, "product"), ("a", 0.5, "mixture"), ("a", 1.0, "alone"),
        ("k", 1.0, "product"), ("k", 5.0, "product"), ("k", 0.5, "mixture"), ("k", 1.0, "alone"),
        ("q", 1.0, "product")]
CHOICES = ["Cotto", "Strada"]
PATTERN = r"(Cotto|Strada) (is|serves) (a|the)"


def params(use, max_tokens, **kw):
    plugin, weight, mode = use
    return SamplingParams(max_tokens=max_tokens, temperature=0.0,
                          extra_args={"plugin": plugin, "plugin_weight": weight, "plugin_mode": mode}, **kw)


def reference(tiny, ids, use, max_tokens, **kw):
    plugin, weight, mode = use
    top_k = TINY_TOP_K if plugin == "k" else None
    return reference_generate(tiny.base, [ids], tiny.plugins[plugin], weight=weight, mode=mode, top_k=top_k,
                              max_new_tokens=max_tokens, **kw)[0]


def grammar_mask(tiny, pattern):
    """The reference's grammar: a token is allowed while the text stays a prefix of the
    pattern's language; EOS once the text matches it whole."""
    tok = tiny.tokenizer
    eos = tok.eos_token_id
    pieces = [tok.decode([t], clean_up_tokenization_spaces=False) for t in range(tiny.vocab_size)]

    def allowed(out):
        text = "".join(pieces[t] for t in out)
        mask = torch.tensor([t != eos and regex.fullmatch(pattern, text + p, partial=True) is not None
                             for t, p in enumerate(pieces)])
        mask[eos] = regex.fullmatch(pattern, text) is not None
        return mask
    return allowed


def run(engine, prompts, all_params):
    outs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], all_params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("use", USES, ids=lambda u: f"{u[0]}-{u[2]}-w{u[1]:g}")
def test_token_constraints_hold_and_equal_the_reference(tiny, engine, use):
    """logit_bias, min_tokens, allowed_token_ids and bad_words, each on its own, in one batch."""
    cases = []  # (prompt ids, vLLM kwargs, reference kwargs, what must hold)
    for text in PROMPTS:
        ids = tiny.encode(text)
        first = reference(tiny, ids, use, 1)[0]  # what the request picks first, unconstrained
        cases.append((ids, dict(max_tokens=1, logit_bias={first: -100.0}), dict(logit_bias={first: -100.0}),
                      lambda out, first=first: out[0] != first))
        cases.append((ids, dict(max_tokens=4, min_tokens=3, stop_token_ids=[first], ignore_eos=True),
                      dict(min_tokens=3, stop_token_ids=[first]),
                      lambda out, first=first: len(out) >= 3 and first not in out[:3]))
        allowed = tiny.encode(" serves the coffee")[:3]
        cases.append((ids, dict(max_tokens=5, allowed_token_ids=allowed, ignore_eos=True),
                      dict(allowed_token_ids=allowed), lambda out, allowed=allowed: set(out) <= set(allowed)))
        word = tiny.tokenizer.decode([first]).strip()
        if word:
            bad = SamplingParams(bad_words=[word])
            bad.update_from_tokenizer(engine.get_tokenizer())
            cases.append((ids, dict(max_tokens=5, bad_words=[word], ignore_eos=True),
                          dict(bad_words=bad._bad_words_token_ids),
                          lambda out, words=bad._bad_words_token_ids: not any(
                              out[i:i + len(w)] == w for w in words for i in range(len(out)))))
    outs = run(engine, [c[0] for c in cases], [params(use, **c[1]) for c in cases])
    for (ids, kw, ref_kw, holds), out in zip(cases, outs):
        got = list(out.token_ids)
        assert holds(got), (kw, got)
        assert out.finish_reason in ("stop", "length"), (kw, out.finish_reason)
        want = reference(tiny, ids, use, kw["max_tokens"], **ref_kw)
        assert got == want, (kw, got, want)


@pytest.mark.parametrize("use", USES, ids=lambda u: f"{u[0]}-{u[2]}-w{u[1]:g}")
def test_structured_outputs_hold_and_equal_the_reference(tiny, engine, use):
    """A choice and a regex grammar: the text obeys it, the request ends normally (a token the
    grammar rejects would end it with finish_reason="error"), tokens equal the reference."""
    grammars = [(StructuredOutputsParams(choice=CHOICES), "(" + "|".join(CHOICES) + ")"),
                (StructuredOutputsParams(regex=PATTERN), PATTERN)]
    cases = [(tiny.encode(text), so, pattern) for text in PROMPTS for so, pattern in grammars]
    outs = run(engine, [c[0] for c in cases], [params(use, 16, structured_outputs=so) for _, so, _ in cases])
    for (ids, so, pattern), out in zip(cases, outs):
        assert out.finish_reason == "stop", (pattern, out.finish_reason, out.text)
        assert regex.fullmatch(pattern, out.text), (pattern, out.text)
        want = reference(tiny, ids, use, 16, grammar=grammar_mask(tiny, pattern),
                         stop_token_ids=[tiny.tokenizer.eos_token_id])
        assert list(out.token_ids) == want, (pattern, out.text)


@pytest.mark.parametrize("use", USES, ids=lambda u: f"{u[0]}-{u[2]}-w{u[1]:g}")
def test_json_schema_holds(tiny, engine, use):
    schema = {"type": "object", "properties": {"name": {"enum": CHOICES}}, "required": ["name"],
              "additionalProperties": False}
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    (out,) = run(engine, [tiny.encode(PROMPTS[0])], [params(use, 24, structured_outputs=so)])
    # The tiny random base may fill its 24 tokens with JSON whitespace, as it does without a
    # plugin; what must never happen is a token the grammar rejects (finish_reason "error").
    assert out.finish_reason in ("stop", "length"), (out.finish_reason, out.text)
    if out.finish_reason == "stop":
        assert json.loads(out.text)["name"] in CHOICES


def test_top_k_view_keeps_masked_and_biased_tokens_exact():
    """The top-k view of constrained logits: a masked token stays -inf, a biased one keeps its
    biased log-prob (never the flat tail), and unconstrained logits give the plain view."""
    from vllm_plugin.experts import base_top_k, combine, top_k_with_flat_tail

    logits = torch.randn(2, 50)
    lp = torch.log_softmax(logits, -1)
    top, ids = lp.topk(5)
    torch.testing.assert_close(base_top_k(logits, 5), top_k_with_flat_tail(ids, top, 50))
    constrained = logits.clone()
    tail_token = int(lp[0].argsort()[20])  # outside the top 5
    constrained[0, tail_token] = float("-inf")
    bias = torch.zeros(2, 50)
    bias[1, tail_token] = -100.0
    constrained += bias
    view = base_top_k(constrained, 5, bias)
    assert view[0, tail_token] == float("-inf")
    torch.testing.assert_close(view[1, tail_token], torch.log_softmax(constrained[1], -1)[tail_token])
    plugin = torch.zeros(2, 50)
    plugin[:, tail_token] = 50.0  # the plugin wants exactly the constrained token
    for mode, weight in (("product", 1.0), ("mixture", 0.5), ("alone", 1.0)):
        scores = combine(constrained, plugin, weight, mode, top_k=5, bias=bias)
        assert scores[0, tail_token] == float("-inf"), mode
        assert int(scores[1].argmax()) != tail_token, mode
