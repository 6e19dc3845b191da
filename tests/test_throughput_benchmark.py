"""The speed benchmark's peers and its results format, on the tiny base."""
import json
import subprocess
import sys

import torch

from benchmarks.throughput import HFPluginLogitsProcessor, base_flops_per_token
from vllm_plugin.decode import reference_generate


def test_hf_processor_decodes_like_the_reference(tiny):
    """The Hugging Face peer applies the same product of experts, token for token."""
    from transformers import LogitsProcessorList

    plugin = tiny.plugins["a"]
    prompts = [[5, 9, 14, 3, 22, 7], [11, 4, 30, 2, 8, 19]]
    want = reference_generate(tiny.base, prompts, plugin, max_new_tokens=10)
    with torch.inference_mode():
        out = tiny.base.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 6, dtype=torch.long),
                                 max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([HFPluginLogitsProcessor(plugin)]))
    assert out[:, 6:].tolist() == [w[:10] for w in want]


def test_base_flops_count_matmuls_head_and_attention(tiny):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny.base_dir)
    params = sum(p.numel() for n, p in tiny.base.named_parameters() if "norm" not in n and "embed_tokens" not in n)
    if tiny.base.config.tie_word_embeddings:
        params += tiny.base.get_input_embeddings().weight.numel()
    assert base_flops_per_token(config, 0) == 2 * params
    assert base_flops_per_token(config, 10) > base_flops_per_token(config, 0)


def test_throughput_benchmark_writes_the_results_format(tiny, tmp_path):
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--base", str(tiny.base_dir),
                           "--batch-sizes", "1,2", "--bf16-batch-sizes", "2", "--repeats", "1", "--prompt-len", "8",
                           "--new-tokens", "4", "--hf-new-tokens", "3", "--recompute-steps", "1", "--max-num-seqs", "4", "--profile-batch", "2",
                           "--profile-steps", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert 0 < result["flop_share"] < 10
    configs = {"none", "inert", "plugin", "two_plugins", "hf_generate", "recompute"}
    assert {(r["config"], r["batch_size"]) for r in result["rows"]} == {(c, b) for c in configs for b in (1, 2)}
    for r in result["rows"]:
        assert r["tokens_per_s"] > 0 and r["ms_per_token"] > 0 and r["decode_steps_timed"] >= 1
    assert out.with_suffix(".png").stat().st_size > 1000
    assert [r["config"] for r in result["reference_rows"]] == ["hf_generate_no_plugin"] * 2 + ["none_bf16"]
    assert result["none_bf16_over_none"]["2"] > 0
    ceiling = result["compute_ceiling"]
    assert ceiling["matmul_peak_gflops"] > 0 and set(ceiling["max_ours_over_hf_generate"]) == {"1", "2"}
    profile = result["profile"]
    assert profile["decode_steps"] >= 2 and 0 < profile["processor_ms"] < profile["step_ms"]
    assert "vllm_plugin" in (tmp_path / profile["table"]).read_text()
