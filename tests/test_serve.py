"""`vllm serve` with the processor: OpenAI completions and chat, per-request plugins, 400s."""
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
