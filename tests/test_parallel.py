"""Tensor parallel 2 and data parallel 2 on CPU: `vllm serve` with the processor in every
worker (TP: each rank runs the sampler on the full logits) or every engine (DP) serves plugin
requests equal to the reference decoder."""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from vllm_plugin.decode import reference_generate

from .conftest import vllm_serve

CASES = [  # (prompt, vllm_xargs)
    ("Aromi is a", {"plugin": "a"}),
    ("the coffee shop near the riverside serves", {"plugin": "t", "plugin_weight": 0.7}),
    ("Cotto", None),
    ("Strada is a family friendly pub", {"plugin": "k", "plugin_repetition_penalty": 1.3}),
    ("name -- Zizzi\narea -- riverside\n", {"plugin": "b", "plugin_mode": "mixture", "plugin_weight": 0.4}),
    ("The Eagle", {"plugin": "a", "plugin_frequency_penalty": 0.8}),
]


def expected(tiny, ids, xargs):
    if not xargs:
        return reference_generate(tiny.base, [ids], None, max_new_tokens=8)[0]
    plugin = tiny.plugins[xargs["plugin"]]
    penalties = {k[len("plugin_"):]: v for k, v in xargs.items() if k.endswith("_penalty")}
    return reference_generate(tiny.base, [ids], plugin, weight=xargs.get("plugin_weight", 1.0),
                              mode=xargs.get("plugin_mode", "product"), max_new_tokens=8,
                              top_k=plugin.config.training.get("top_k"), **penalties)[0]


@pytest.mark.parametrize("parallel", [["--tensor-parallel-size", "2"], ["--data-parallel-size", "2"]],
                         ids=["tp2", "dp2"])
def test_parallel_serving_equals_reference(tiny, tmp_path, parallel):
    env = {k: v for k, v in os.environ.items() if k != "PLUGIN_LM_TABLE"}
    # vLLM's CPU backend binds each rank's OpenMP threads to its own NUMA node by default, and
    # refuses two ranks on a one-node machine; the tiny model needs no binding.
    extra = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
    with vllm_serve(tiny.base_dir, tmp_path / "serve.log", *parallel,
                    "--logits-processors", "vllm_plugin.processor:PluginLogitsProcessor",
                    "--additional-config", json.dumps(tiny.additional_config()), env=env, extra_env=extra) as url:
        def send(case):
            text, xargs = case
            body = {"model": "tiny", "prompt": tiny.encode(text), "max_tokens": 8, "temperature": 0.0,
                    "ignore_eos": True, "return_token_ids": True}
            if xargs:
                body["vllm_xargs"] = xargs
            return httpx.post(url + "/v1/completions", json=body, timeout=300)

        with ThreadPoolExecutor(len(CASES)) as pool:  # concurrent: DP spreads them over both engines
            responses = list(pool.map(send, CASES * 2))
        for (text, xargs), r in zip(CASES * 2, responses):
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == expected(tiny, tiny.encode(text), xargs), (parallel, xargs)
        # Every TP rank runs the sampler on the full logits, every DP engine has its own: each
        # loaded the plugins.
        assert url.log.read_text().count(f"vllm_plugin: serving {len(tiny.plugins)} plugin(s)") == 2
        refused = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "Aromi", "max_tokens": 2, "vllm_xargs": {"plugin": "nope"}})
        assert refused.status_code == 400 and "unknown plugin 'nope'" in refused.text
