"""Runs in its own process (tests/test_beam_spec.py): an engine returning processed log-probs.

Beam search with a plugin needs ``logprobs_mode="processed_logprobs"``, and a second in-process
engine would tear down the distributed state the shared test engine uses. The engine also
enables prompt embeddings, to check that a plugin request with an embedding prompt is refused.
Prints the beams (tokens, cumulative log-prob), vLLM's own beam search without a plugin, and
what admission answered, as JSON.
"""
import json
import sys

if __name__ == "__main__":
    import torch
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    from vllm_plugin.beam import plugin_beam_search
    from vllm_plugin.serving import plugin_llm

    base_dir, table, job = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = plugin_llm(base_dir, table, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                     max_logprobs=20, seed=0, logprobs_mode="processed_logprobs", enable_prompt_embeds=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    params = BeamSearchParams(beam_width=job["beam_width"], max_tokens=job["max_tokens"])
    result = {"beams": {}}

    def beams(outputs):
        return [[[list(s.tokens), float(s.cum_logprob)] for s in o.sequences] for o in outputs]

    for case in job["cases"]:
        out = plugin_beam_search(llm, prompts, params, case["plugin"], weight=case.get("weight", 1.0),
                                 base_top_k=case.get("top_k"), stop_token_ids=case.get("stop", ()))
        result["beams"][case["name"]] = beams(out)
    result["vllm_no_plugin"] = beams(llm.beam_search(prompts, params))

    def attempt(prompt, sampling):
        try:
            return list(llm.generate([prompt], sampling, use_tqdm=False)[0].outputs[0].token_ids)
        except (ValueError, VLLMValidationError) as e:
            return f"ValueError: {e}"

    embeds = {"prompt_embeds": torch.randn(5, job["hidden"])}
    result["embeds_plugin"] = attempt(embeds, SamplingParams(max_tokens=3, extra_args={"plugin": "a"}))
    result["embeds_no_plugin"] = attempt(embeds, SamplingParams(max_tokens=3))
    short = TokensPrompt(prompt_token_ids=job["short_prompt"])
    for n in job["short_max_tokens"]:
        result[f"short_{n}"] = attempt(short, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                             extra_args={"plugin": "short"}))
    print("RESULT " + json.dumps(result))
