"""Never silently without the plugin: beam search with a plugin, and the engine configurations
that would decode a plugin request without it (speculative decoding, prompt embeddings, a
transformer plugin's max_len), refused at admission. Real engines, each in its own process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.inputs import TokensPrompt
from vllm.sampling_params import BeamSearchParams

from vllm_plugin.checkpoint import save_plugin
from vllm_plugin.decode import reference_beam_search, reference_generate
from vllm_plugin.beam import plugin_beam_search
from vllm_plugin.testing import tiny_plugin

HERE = Path(__file__).parent
# The third: an in-context example before the task, each after the marker ("Sentence:") that plugins
# m, p, e and r read from (copy scores; e's example scores; r's state).
BEAM_PROMPTS = ["Aromi is a", "name -- Zizzi\narea -- riverside\n",
                "name -- Zizzi\n\nSentence:\nZizzi is a pub.\n\nname -- Cotto\narea -- riverside\n\nSentence:\n"]
BEAM_WIDTH, BEAM_TOKENS = 3, 8
SHORT_MAX_LEN = 16
# vLLM computes in fp32 with other kernels (oneDNN head, fused GRU step): per-step log-probs
# agree to ~1e-5; summed over 8 steps, well inside this.
CUM_LOGPROB_TOL = 2e-3


def run(script: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_PLUGINS", "PLUGIN_LM_TABLE")}  # the script's own
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run([sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True,
                          timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def beam_result(tiny, tmp_path_factory):
    short = tiny_plugin(tiny.vocab_size, "transformer", seed=5, fingerprint=tiny.fingerprint, max_len=SHORT_MAX_LEN)
    table = {**{n: str(p) for n, p in tiny.plugin_dirs.items()},
             "short": str(save_plugin(short, tmp_path_factory.mktemp("short") / "plugin"))}
    prompts = [tiny.encode(p) for p in BEAM_PROMPTS]
    # Stop tokens the search meets: the second token of each prompt's best beam without them.
    stop = sorted({reference_beam_search(tiny.base, ids, tiny.plugins["a"], BEAM_WIDTH, BEAM_TOKENS,
                                         eos_token_id=tiny.tokenizer.eos_token_id)[0][0][len(ids) + 1]
                   for ids in prompts})
    job = {"prompts": prompts, "beam_width": BEAM_WIDTH, "max_tokens": BEAM_TOKENS,
           "cases": [{"name": "a", "plugin": "a"}, {"name": "k", "plugin": "k"}, {"name": "t", "plugin": "t"},
                     {"name": "a_half", "plugin": "a", "weight": 0.5}, {"name": "c", "plugin": "c"},
                     {"name": "p", "plugin": "p"}, {"name": "e", "plugin": "e"}, {"name": "r", "plugin": "r"},
                     {"name": "q", "plugin": "q"}, {"name": "a_stop", "plugin": "a", "stop": stop}, {"name": "none", "plugin": None}],
           "hidden": tiny.base.config.hidden_size, "short_prompt": tiny.encode("Aromi is a coffee shop"),
           "short_max_tokens": [12, SHORT_MAX_LEN - len(tiny.encode("Aromi is a coffee shop")) + 1]}
    return {"job": job, "short": short, **run("beam_run.py", str(tiny.base_dir), json.dumps(table), json.dumps(job))}


def assert_beams_equal(got, want, label):
    assert len(got) == len(want), label
    for (g_tokens, g_cum), (w_tokens, w_cum) in zip(got, want):
        assert g_tokens == w_tokens, label
        assert abs(g_cum - w_cum) < CUM_LOGPROB_TOL, (label, g_cum, w_cum)


@pytest.mark.parametrize("case", ["a", "k", "t", "a_half", "c", "p", "e", "r", "q", "a_stop", "none"])
def test_plugin_beam_search_equals_the_reference(tiny, beam_result, case):
    """Beams scored by the combined distribution (full-base plugin a, top-k plugin k, transformer t,
    a at half strength, c with copy scores, p with pending-copy scores) equal a plain beam search over ``decode.combine``:
    tokens, and cumulative log-probs within a tolerance. Every step is a fresh request per beam,
    so this also checks that the processor catches the plugin state up from the whole beam, and
    (c) that copy scores read the user's prompt only, not the beam's tokens sent with it, (p)
    that pending-copy scores count the beam's tokens as generated, (e) that example scores and
    (r) the plugin's reading start at the user's prompt's marker, (q) that candidate scores sit on
    the base's top tokens of each beam's step; a_stop
    finishes beams at stop tokens."""
    spec = next(c for c in beam_result["job"]["cases"] if c["name"] == case)
    plugin = tiny.plugins[spec["plugin"]] if spec["plugin"] else None
    top_k = plugin.config.training.get("top_k") if plugin is not None else None
    eos = tiny.tokenizer.eos_token_id
    for ids, got in zip(beam_result["job"]["prompts"], beam_result["beams"][case]):
        want = reference_beam_search(tiny.base, ids, plugin, BEAM_WIDTH, BEAM_TOKENS, weight=spec.get("weight", 1.0),
                                     top_k=top_k, eos_token_id=eos, stop_token_ids=spec.get("stop", ()))
        assert_beams_equal(got, [(t, c) for t, c in want], (case, ids))
        if "stop" in spec:  # not vacuous: a beam ended at a stop token, short of max_tokens
            assert any(len(t) < len(ids) + BEAM_TOKENS and t[-1] in spec["stop"] for t, _ in got), got


def test_plugin_beams_differ_from_the_base_beams(beam_result):
    """Not vacuous: with a plugin the beams change; without one the helper is vLLM's beam search."""
    base = beam_result["vllm_no_plugin"]
    assert_beams_equal(beam_result["beams"]["none"][0], base[0], "none vs vLLM")
    assert_beams_equal(beam_result["beams"]["none"][1], base[1], "none vs vLLM")
    for case in ["a", "k", "t"]:
        for got, plain in zip(beam_result["beams"][case], base):
            assert [t for t, _ in got] != [t for t, _ in plain], case


def test_prompt_embeddings_with_a_plugin_are_refused(beam_result):
    assert beam_result["embeds_plugin"].startswith("ValueError"), beam_result["embeds_plugin"]
    assert "prompt embeddings carry no token ids" in beam_result["embeds_plugin"]
    assert isinstance(beam_result["embeds_no_plugin"], list) and len(beam_result["embeds_no_plugin"]) == 3


def test_transformer_plugin_max_len_is_checked_at_admission(tiny, beam_result):
    """A request that could grow past a transformer plugin's max_len would finish without it:
    refused, naming the limit and the largest max_tokens that fits; one that fits is served."""
    ids = beam_result["job"]["short_prompt"]
    too_long, fits = beam_result["job"]["short_max_tokens"]
    refused = beam_result[f"short_{too_long}"]
    assert isinstance(refused, str) and f"reads at most {SHORT_MAX_LEN} positions" in refused, refused
    assert f"set max_tokens to at most {fits}" in refused
    want = reference_generate(tiny.base, [ids], beam_result["short"], max_new_tokens=fits)[0]
    assert beam_result[f"short_{fits}"] == want


def test_plugin_beam_search_refuses_raw_logprobs(tiny, engine):
    """The shared engine runs vLLM's default raw_logprobs: its log-probs are the base's."""
    prompt = [TokensPrompt(prompt_token_ids=tiny.encode(BEAM_PROMPTS[0]))]
    with pytest.raises(ValueError, match="logprobs_mode='processed_logprobs'"):
        plugin_beam_search(engine, prompt, BeamSearchParams(beam_width=2, max_tokens=2), "a")


def test_speculative_decoding_refuses_plugin_requests(tiny):
    """ngram speculative decoding (runs on CPU): vLLM loads no entry-point processor, so a plugin
    request would be served by the base alone; admission refuses it, saying why. A plain request
    is served as usual (greedy: the base's tokens)."""
    ids = tiny.encode(BEAM_PROMPTS[0])
    table = {"a": str(tiny.plugin_dirs["a"])}
    result = run("spec_run.py", str(tiny.base_dir), json.dumps(table), json.dumps(ids))
    assert result["plugin"].startswith("ValueError") and "speculative decoding" in result["plugin"], result
    assert "--speculative-config" in result["plugin"]
    assert result["plain"] == reference_generate(tiny.base, [ids], None, max_new_tokens=8)[0]
