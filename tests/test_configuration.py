"""Where the plugin table comes from, what the server log says about it, and refusals at start.

The table lives in the engine's ``additional_config`` (``--additional-config``,
``LLM(additional_config=...)``, ``plugin_llm``), else ``$PLUGIN_LM_TABLE``; never in
``$VLLM_PLUGINS``, which is vLLM's own allowlist of vLLM plugins. (The shared ``engine`` and
``server`` fixtures get their table through ``additional_config``, so every engine test also
tests that path; ``test_forced_preemption`` starts its engine from ``$PLUGIN_LM_TABLE``.)
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest

from vllm_plugin.decode import reference_generate
from vllm_plugin.processor import PluginConfigError, plugin_table

from .conftest import vllm_serve

PROCESSOR = ("--logits-processors", "vllm_plugin.processor:PluginLogitsProcessor")


def engine_config(additional_config):
    return SimpleNamespace(additional_config=additional_config)


def test_table_sources_and_precedence():
    ours = {"vllm_plugin": {"plugins": {"a": "/x"}}}
    env = {"PLUGIN_LM_TABLE": "b=/y"}
    assert plugin_table(engine_config(ours), env) == ({"a": "/x"}, "--additional-config vllm_plugin.plugins")
    assert plugin_table(engine_config({"other": 1}), env) == ({"b": "/y"}, "$PLUGIN_LM_TABLE")
    # An empty table in the engine config turns the environment's table off for that engine.
    assert plugin_table(engine_config({"vllm_plugin": {"plugins": {}}}), env)[0] == {}
    # vLLM's own variable is never read, whatever it holds.
    for value in ["lora_filesystem_resolver", "", "a,b", "e2e=/x", '{"e2e": "/x"}']:
        assert plugin_table(engine_config({}), {"VLLM_PLUGINS": value}) == ({}, "none")
    for bad, message in [({"vllm_plugin": {"plugins": {"a/b": "/x"}}}, "plugin name 'a/b' in --additional-config"),
                         ({"vllm_plugin": {"plugins": {"a": 3}}}, "--additional-config vllm_plugin.plugins must map"),
                         ({"vllm_plugin": {"plugin": {"a": "/x"}}}, "--additional-config vllm_plugin must be"),
                         ({"vllm_plugin": "a=/x"}, "--additional-config vllm_plugin must be")]:
        with pytest.raises(PluginConfigError, match=message):
            plugin_table(engine_config(bad), {})
    with pytest.raises(PluginConfigError, match=r"\$PLUGIN_LM_TABLE entry 'e2e' is not name=path"):
        plugin_table(engine_config({}), {"PLUGIN_LM_TABLE": "e2e"})


def test_server_log_names_each_loaded_plugin(server, tiny):
    """`vllm serve` shows what it loaded (vLLM's log, from the engine process): each plugin with
    its architecture, size in parameters and base view."""
    log = server.log.read_text()
    assert f"vllm_plugin: serving {len(tiny.plugins)} plugin(s) from --additional-config vllm_plugin.plugins" in log, \
        log[-3000:]
    for name, model in tiny.plugins.items():
        size = sum(p.numel() for p in model.parameters())
        view = "top-5" if model.config.training.get("top_k") else "full"
        line = next((li for li in log.splitlines() if f"vllm_plugin: plugin '{name}': " in li), None)
        assert line is not None, name
        assert (f"{model.config.architecture}, " in line and f"base view {view}" in line
                and f"{size / 1e3:.1f}K parameters" in line and str(tiny.plugin_dirs[name]) in line
                and (f"a shortlist of {tiny.vocab_size // 4} tokens" in line) == (model.config.shortlist_size > 0)
                and ("pending-copy scores" in line) == model.config.copy_pending
                and ("input bag" in line) == model.config.input_bag
                and ("nats below the 5th" in line) == (model.config.copy_tail_offset is not None)
                and ("unigram frequencies" in line) == (model.config.tail_prior is not None)), line


def test_vllms_own_plugin_variable_leaves_the_engine_untouched(tiny, tmp_path):
    """VLLM_PLUGINS set for vLLM's purpose and no table of ours: the server starts (the processor
    both in --logits-processors and as entry point, inert), serves the base exactly, and a plugin
    request is a 400 saying no plugin is configured."""
    ids = tiny.encode("Aromi is a coffee shop")
    env = {k: v for k, v in os.environ.items() if k != "PLUGIN_LM_TABLE"}
    with vllm_serve(tiny.base_dir, tmp_path / "serve.log", *PROCESSOR, env=env,
                    extra_env={"VLLM_PLUGINS": "lora_filesystem_resolver"}) as url:
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": ids, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == reference_generate(tiny.base, [ids], None, max_new_tokens=8)[0]
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": ids, "max_tokens": 2, "vllm_xargs": {"plugin": "a"}})
        assert r.status_code == 400 and "available: none (configure --additional-config" in r.text, r.text
        # Read while serving: stopping the server may log the engine's shutdown as a traceback.
        log = (tmp_path / "serve.log").read_text()
    assert "vllm_plugin: serving" not in log and "Traceback" not in log, log[-3000:]


PLUGIN_LLM_SCRIPT = """
import json, sys
from vllm.inputs import TokensPrompt
from vllm_plugin import plugin_llm, plugin_params
base, table, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = plugin_llm(base, table, dtype="float32", enforce_eager=True, max_model_len=64, max_num_seqs=2, seed=0)
out = {}
for name in ["a", "b"]:
    try:
        got = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                           plugin_params(name, max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)
        out[name] = list(got[0].outputs[0].token_ids)
    except Exception as e:  # vLLM's VLLMValidationError
        out[name] = str(e)
print("RESULT " + json.dumps(out))
"""


def test_plugin_llm_table_wins_over_the_environment(tiny):
    """plugin_llm puts its table in LLM(additional_config=...): the engine (its own process, with
    vLLM's default multiprocessing frontend) serves it equal to the reference decoder, and a
    $PLUGIN_LM_TABLE naming another plugin is ignored, at admission and in the engine."""
    ids = tiny.encode("Cotto serves")
    env = {**os.environ, "PLUGIN_LM_TABLE": json.dumps({"b": str(tiny.plugin_dirs["b"])}),
           "VLLM_PLUGINS": "lora_filesystem_resolver"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    proc = subprocess.run([sys.executable, "-c", PLUGIN_LLM_SCRIPT, str(tiny.base_dir),
                           json.dumps({"a": str(tiny.plugin_dirs["a"])}), json.dumps(ids)],
                          env=env, capture_output=True, text=True, timeout=600)
    lines = [li for li in proc.stdout.splitlines() if li.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["a"] == reference_generate(tiny.base, [ids], tiny.plugins["a"], max_new_tokens=6)[0]
    assert "unknown plugin 'b'; available: a" in out["b"]
    log = proc.stdout + proc.stderr  # vLLM logs to stdout by default
    assert "$PLUGIN_LM_TABLE is set and ignored" in log
    assert "vllm_plugin: serving 1 plugin(s) from --additional-config vllm_plugin.plugins" in log


def corrupt_checkpoint(tiny, folder):
    import shutil

    shutil.copytree(tiny.plugin_dirs["a"], folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


def test_vllm_plugin_serve_refuses_a_bad_plugin_before_any_engine_starts(tiny, tmp_path):
    """`vllm-plugin serve` checks the table against the base first: a corrupt or missing checkpoint
    ends it with exit code 2 and its last lines name the plugin, the file and the problem."""
    bad = corrupt_checkpoint(tiny, tmp_path / "bad")
    for folder, problem in [(bad, f"{bad / 'model.safetensors'} is corrupt or unreadable"),
                            (tmp_path / "missing", f"plugin checkpoint {tmp_path / 'missing'} does not exist")]:
        proc = subprocess.run([sys.executable, "-m", "vllm_plugin.cli", "serve", "--base", str(tiny.base_dir),
                               "--plugin", f"a={tiny.plugin_dirs['a']}", "--plugin", f"broken={folder}",
                               "--port", "1"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("vllm-plugin: error: vllm_plugin: refusing to serve plugin 'broken' (from --plugin"), last
        assert problem in last, last


def test_vllm_serve_refuses_a_corrupt_plugin_and_says_which(tiny, tmp_path):
    """Plain `vllm serve` with a corrupt checkpoint in --additional-config: non-zero exit, and the
    cause (plugin, source, file, problem) is the engine's ERROR line; vLLM's own traceback for a
    failed engine start follows it (nothing of ours runs in the API server with the engine config
    before the engine starts: README, "Serve it")."""
    bad = corrupt_checkpoint(tiny, tmp_path / "bad")
    table = {"vllm_plugin": {"plugins": {"a": str(tiny.plugin_dirs["a"]), "broken": str(bad)}}}
    with pytest.raises(RuntimeError, match="vllm serve exited") as failed:
        with vllm_serve(tiny.base_dir, tmp_path / "serve.log", *PROCESSOR, "--additional-config", json.dumps(table)):
            pass
    log = (tmp_path / "serve.log").read_text()
    errors = [li for li in log.splitlines() if "ERROR" in li and "refusing to serve plugin 'broken'" in li]
    assert errors, str(failed.value)
    assert ("(from --additional-config vllm_plugin.plugins" in errors[0]
            and f"{bad / 'model.safetensors'} is corrupt or unreadable" in errors[0]), errors[0]
