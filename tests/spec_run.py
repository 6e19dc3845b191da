"""Runs in its own process (tests/test_beam_spec.py): an engine with ngram speculative decoding.

The plugin processor is registered only through its entry point (with ``logits_processors=``
vLLM's V1 runner refuses speculative decoding at start); the plugin table is set the way
``plugin_llm`` sets it. Prints what a plugin request and a plain request got, as JSON.
"""
import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    from vllm_plugin.serving import set_plugins

    base_dir, table, ids = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    set_plugins(table)
    llm = LLM(model=base_dir, dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0,
              speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3,
                                  "prompt_lookup_min": 1})
    result = {}
    for name, extra in [("plugin", {"plugin": "a"}), ("plain", None)]:
        try:
            out = llm.generate([TokensPrompt(prompt_token_ids=ids)],
                               SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, extra_args=extra),
                               use_tqdm=False)
            result[name] = list(out[0].outputs[0].token_ids)
        except (ValueError, VLLMValidationError) as e:
            result[name] = f"ValueError: {e}"
    print("RESULT " + json.dumps(result))
