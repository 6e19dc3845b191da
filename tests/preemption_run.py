"""Runs in its own process (tests/test_processor_engine.py): an engine with room for 64 tokens.

A second in-process engine would tear down the distributed state the shared test engine uses.
Prints the generated token ids and vLLM's preemption count as JSON.
"""
import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_plugin.processor import PluginLogitsProcessor

    base_dir, requests = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=base_dir, dtype="float32", enforce_eager=True, max_model_len=64, max_num_seqs=4,
              block_size=32, num_gpu_blocks_override=3, seed=0, disable_log_stats=False,
              logits_processors=[PluginLogitsProcessor])
    prompts = [TokensPrompt(prompt_token_ids=r["ids"]) for r in requests]
    params = [SamplingParams(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True,
                             extra_args={"plugin": r["plugin"]} if r["plugin"] else None) for r in requests]
    outs = llm.generate(prompts, params, use_tqdm=False)
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    print("RESULT " + json.dumps({"outputs": [list(o.outputs[0].token_ids) for o in outs],
                                  "preemptions": preemptions}))
