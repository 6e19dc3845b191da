"""`vllm serve` with the processor: OpenAI completions and chat, per-request plugins, 400s."""
import json
import math
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from vllm_plugin.decode import reference_generate


def complete(server, **body):
    return httpx.post(server + "/v1/completions", json={"model": "tiny", "temperature": 0.0, **body}, timeout=120)


def test_completions_with_and_without_plugin(server, tiny):
    ids = tiny.encode("Aromi is a coffee shop")
    for xargs, plugin in [(None, None), ({"plugin": "a"}, "a"), ({"plugin": "t", "plugin_weight": 0.7}, "t")]:
        body = {"prompt": ids, "max_tokens": 10, "ignore_eos": True, "return_token_ids": True}
        if xargs:
            body["vllm_xargs"] = xargs
        r = complete(server, **body)
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["token_ids"]
        weight = (xargs or {}).get("plugin_weight", 1.0)
        want = reference_generate(tiny.base, [ids], tiny.plugins.get(plugin), weight=weight, max_new_tokens=10)[0]
        assert got == want, xargs


def test_chat_completions_with_plugin(server, tiny):
    r = httpx.post(server + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Aromi"}], "max_tokens": 8,
        "temperature": 0.0, "vllm_xargs": {"plugin": "b"}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.parametrize("xargs, message", [
    ({"plugin": "nope"}, "unknown plugin 'nope'"),
    ({"plugin": "a", "plugin_weight": -3}, "must be a number"),
    ({"plugin": "/etc/passwd"}, "unknown plugin"),
    ({"plugin": "a", "plugin_strength": 2}, "unknown plugin argument"),
])
def test_bad_request_is_400_and_server_keeps_serving(server, tiny, xargs, message):
    r = complete(server, prompt="Aromi", max_tokens=4, vllm_xargs=xargs)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    ok = complete(server, prompt="Aromi", max_tokens=4, vllm_xargs={"plugin": "a"})
    assert ok.status_code == 200, ok.text
    assert httpx.get(server + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("xargs, message", [
    ({"plugin": "k", "plugin_base_top_k": 500}, "'plugin_base_top_k' must be an integer in [0, 384]"),
    ({"plugin": "a", "plugin_weight": True}, "JSON boolean"),
    ({"plugin": "a", "plugin_weight": False}, "JSON boolean"),  # would read as 0: the plugin off
    ({"plugin": "k", "plugin_base_top_k": True}, "JSON boolean"),
    ({"plugin": "a", "plugin_weight": "NaN"}, "must be a number"),
])
def test_values_the_engine_cannot_serve_are_400(server, tiny, xargs, message):
    """Refused at admission (validate_params, or the middleware for JSON booleans, which vLLM's
    schema would otherwise turn into 1/0), so the engine step never sees them."""
    for endpoint, body in [("/v1/completions", {"prompt": "Aromi"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Aromi"}]})]:
        r = httpx.post(server + endpoint, timeout=120, json={"model": "tiny", "max_tokens": 4, "temperature": 0.0,
                                                            "vllm_xargs": xargs, **body})
        assert r.status_code == 400, (endpoint, r.text)
        assert message in r.json()["error"]["message"], r.text
    assert httpx.get(server + "/health", timeout=10).status_code == 200


def test_middleware_passes_good_requests_through_unchanged(server, tiny):
    """The boolean check reads the body and replays it: streamed and plain answers are the
    plugin's, and a non-plugin boolean elsewhere in vllm_xargs is vLLM's business, not ours."""
    ids = tiny.encode("Cotto serves")
    want = reference_generate(tiny.base, [ids], tiny.plugins["a"], weight=0.5, max_new_tokens=6)[0]
    body = {"prompt": ids, "max_tokens": 6, "ignore_eos": True, "return_token_ids": True,
            "vllm_xargs": {"plugin": "a", "plugin_weight": 0.5, "other_flag": True}}
    r = complete(server, **body)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want, r.text
    with httpx.stream("POST", server + "/v1/completions", timeout=120,
                      json={"model": "tiny", "temperature": 0.0, "stream": True, **body}) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [t for e in events for t in e["choices"][0].get("token_ids") or []] == want


@pytest.mark.parametrize("endpoint, xargs", [
    ("/v1/completions", {"plugin": "a"}),
    ("/v1/completions", {"plugin": "nope"}),  # refused as beam search, before any name lookup
    ("/v1/completions", {"plugin_weight": 0.5}),  # would be dropped as silently as a plugin
    ("/v1/chat/completions", {"plugin": "k", "plugin_weight": 0.5}),
])
def test_beam_search_with_a_plugin_is_400(server, endpoint, xargs):
    """vLLM's server beam search builds its step requests without vllm_xargs (the base alone would
    choose the beams): the middleware refuses it, naming the Python helper; without a plugin,
    beam search is served as usual."""
    prompt = {"messages": [{"role": "user", "content": "Aromi"}]} if "chat" in endpoint else {"prompt": "Aromi is a"}
    body = {"model": "tiny", "max_tokens": 3, "n": 2, "use_beam_search": True, **prompt}
    r = httpx.post(server + endpoint, timeout=120, json={**body, "vllm_xargs": xargs})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert "vllm_plugin.beam.plugin_beam_search" in error["message"] and error["param"] == "use_beam_search"
    ok = httpx.post(server + endpoint, timeout=120, json=body)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2, ok.text
    plain = httpx.post(server + endpoint, timeout=120, json={**body, "use_beam_search": False, "vllm_xargs": xargs})
    assert plain.status_code == (400 if xargs.get("plugin") == "nope" or "plugin" not in xargs else 200), plain.text


# ----- fuzzing the request arguments -----------------------------------------------------------
FUZZ_REQUESTS = 60
# (valid-looking, invalid) values of each argument; 384 is the tiny vocabulary.
NAMES = (["a", "t", "k"], ["nope", "", "../a", "A", 1, True, ["a"]])
WEIGHTS = ([0, 0.5, 1, 1.0, 2.5, 100, -0.0], [True, False, 100.5, -1, 1e308, 10**30, "1.0", "NaN", "inf", [1.0]])
MODES = (["product", "mixture", "alone"], ["sum", "", "PRODUCT", True, 0, ["alone"]])
TOP_KS = ([0, 1, 5, 383, 384], [385, 500, 1000, True, False, 1001, -1, 2.5, 5.0, "5", [5]])
REPETITION = ([1.0, 1.1, 0.5, 100], [0, -1.1, 100.5, True, "1.1", "nan", [1.1]])
FREQUENCY = ([0.0, 0.5, -2, 2.0], [2.5, -2.01, False, "0.5", 1e308, [0.5]])
# vLLM's own penalties beside a plugin: refused (they would act before the plugin on Model
# Runner V2, after it on V1); without a plugin they are vLLM's business and served.
VLLM_PENALTY = [{"repetition_penalty": 1.1}, {"frequency_penalty": 0.5}, {"presence_penalty": -0.5}]
STRAYS = [("plugin_strength", 2), ("plugin_Weight", 1.0), ("plugin_top_k", 5), ("foo", "bar"), ("seed_x", 3)]


def fuzz_xargs(rng):
    """Plugin arguments as a client might send them: names, weights, modes, top-k values and
    stray keys in random combinations; in three of five one value is invalid, so that no other
    mistake can hide it."""
    fields = {"plugin": NAMES, "plugin_weight": WEIGHTS, "plugin_mode": MODES, "plugin_base_top_k": TOP_KS,
              "plugin_repetition_penalty": REPETITION, "plugin_frequency_penalty": FREQUENCY,
              "plugin_presence_penalty": FREQUENCY, "plugin_expert_repetition_penalty": REPETITION}
    present = [k for k, p in [("plugin", 0.9), ("plugin_weight", 0.5), ("plugin_mode", 0.4),
                              ("plugin_base_top_k", 0.5), ("plugin_repetition_penalty", 0.2),
                              ("plugin_frequency_penalty", 0.2), ("plugin_presence_penalty", 0.15),
                              ("plugin_expert_repetition_penalty", 0.2)]
               if rng.random() < p]
    bad = rng.choice(present + ["stray"]) if rng.random() < 0.6 else None
    args = {k: rng.choice(fields[k][1] if k == bad else fields[k][0]) for k in present}
    if bad == "stray":
        key, value = rng.choice(STRAYS)
        args[key] = value
    return args


def servable(args, vocab_size, vllm_penalty=None):
    """The contract, written independently of the processor: what a request may carry."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    known = ("plugin", "plugin_weight", "plugin_mode", "plugin_base_top_k", "plugin_repetition_penalty",
             "plugin_frequency_penalty", "plugin_presence_penalty", "plugin_expert_repetition_penalty")
    if any(k.startswith("plugin") and k not in known for k in args):
        return False
    if "plugin" not in args:
        return not any(k.startswith("plugin") for k in args)
    if vllm_penalty:
        return False
    mode = args.get("plugin_mode", "product")
    weight = args.get("plugin_weight", 1.0)
    top_k = args.get("plugin_base_top_k", 0)
    repetition = [args.get("plugin_repetition_penalty", 1.0), args.get("plugin_expert_repetition_penalty", 1.0)]
    others = [args.get("plugin_frequency_penalty", 0.0), args.get("plugin_presence_penalty", 0.0)]
    return (args["plugin"] in ("a", "t", "k") and isinstance(args["plugin"], str)
            and isinstance(mode, str) and mode in ("product", "mixture", "alone")
            and number(weight) and 0 <= weight <= (1.0 if mode == "mixture" else 100.0)
            and isinstance(top_k, int) and not isinstance(top_k, bool) and 0 <= top_k <= min(1000, vocab_size)
            and all(number(v) and 0 < v <= 100 for v in repetition) and all(number(v) and -2 <= v <= 2 for v in others))


def test_fuzzed_plugin_arguments_never_hurt_the_server(server, tiny):
    """Seeded random argument combinations: each is served (200, greedy tokens equal to the
    reference decoder for those arguments) or refused (400), exactly as the contract says;
    afterwards the server is healthy and a good request decodes as it did before."""
    rng = random.Random(7)
    ids = tiny.encode("Aromi is a coffee shop")

    def good():
        r = complete(server, prompt=ids, max_tokens=8, ignore_eos=True, return_token_ids=True,
                     vllm_xargs={"plugin": "k"})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    before = good()
    assert before == reference_generate(tiny.base, [ids], tiny.plugins["k"], max_new_tokens=8,
                                        top_k=tiny.plugins["k"].config.training["top_k"])[0]
    cases = []
    for _ in range(FUZZ_REQUESTS):
        args = fuzz_xargs(rng)
        prompt = tiny.encode(rng.choice(["Aromi is a", "the pub near", "Cotto serves", "name -- Zizzi\n"]))
        chat = rng.random() < 0.2
        vllm_penalty = rng.choice(VLLM_PENALTY) if rng.random() < 0.15 else {}
        cases.append((args, prompt, chat, vllm_penalty))

    def send(case):
        args, prompt, chat, vllm_penalty = case
        if chat:
            return httpx.post(server + "/v1/chat/completions", timeout=120, json={
                "model": "tiny", "messages": [{"role": "user", "content": "Aromi"}], "max_tokens": 3,
                "temperature": 0.0, "vllm_xargs": args, **vllm_penalty})
        return complete(server, prompt=prompt, max_tokens=3, ignore_eos=True, return_token_ids=True,
                        vllm_xargs=args, **vllm_penalty)

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, cases))
    served = 0
    for (args, prompt, chat, vllm_penalty), r in zip(cases, responses):
        ok = servable(args, tiny.vocab_size, vllm_penalty)
        assert r.status_code == (200 if ok else 400), (args, r.status_code, r.text)
        if not ok:
            assert r.json()["error"]["message"], args
            continue
        served += 1
        if chat or "plugin" not in args:
            continue
        plugin = tiny.plugins[args["plugin"]]
        top_k = args.get("plugin_base_top_k", plugin.config.training.get("top_k"))
        penalties = {k[len("plugin_"):]: float(v) for k, v in args.items() if k.endswith("_penalty")}
        want = reference_generate(tiny.base, [prompt], plugin, weight=float(args.get("plugin_weight", 1.0)),
                                  mode=args.get("plugin_mode", "product"), max_new_tokens=3, top_k=top_k,
                                  **penalties)[0]
        assert r.json()["choices"][0]["token_ids"] == want, args
    # Both outcomes exercised, and the inputs that once passed validation and then broke the
    # engine (a top-k past the vocabulary) or silently changed the request (JSON booleans).
    assert 8 <= served <= FUZZ_REQUESTS - 8
    args_seen = [args for args, _, _, _ in cases]
    assert any(type(a.get("plugin_base_top_k")) is int and a["plugin_base_top_k"] > tiny.vocab_size
               and servable({**a, "plugin_base_top_k": 0}, tiny.vocab_size) for a in args_seen)
    assert any(isinstance(v, bool) and servable({**a, k: 1}, tiny.vocab_size)
               for a in args_seen for k, v in a.items())
    assert any(p and servable(a, tiny.vocab_size) for a, _, _, p in cases)  # vLLM's penalty the only fault
    assert sum(any(k.endswith("_penalty") for k in a) and servable(a, tiny.vocab_size) for a in args_seen) >= 3
    assert sum(a.get("plugin_expert_repetition_penalty", 1.0) != 1.0 and servable(a, tiny.vocab_size)
               for a, _, chat, _ in cases if not chat) >= 2  # the paper's penalty, checked token for token
    assert httpx.get(server + "/health", timeout=10).status_code == 200
    assert good() == before
