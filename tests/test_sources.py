"""Top-k base log-probs from vLLM and from an OpenAI-compatible endpoint match the full source."""
import pytest
import torch

from vllm_plugin.training.base_logits import (extract_full, extract_topk_openai, extract_topk_vllm, tokenize_examples,
                                  topk_view)
from vllm_plugin.training.data import load_e2e

from .test_data import write_e2e
from .test_training import synthetic_rows

K = 20


@pytest.fixture(scope="module")
def tokenized(tiny, tmp_path_factory):
    path = write_e2e(tmp_path_factory.mktemp("src") / "e2e.csv", synthetic_rows(6))
    return tokenize_examples(load_e2e(path), tiny.tokenizer)


@pytest.fixture(scope="module")
def full(tiny, tokenized):
    return extract_full(tiny.base, tokenized, progress=False)


def assert_matches_full(topk, full, ts):
    assert len(topk) == len(full) == ts.num_target_tokens  # same positions, same order
    targets = ts.flat_targets()
    ref = full.log_probs(torch.arange(len(full)))
    ref_top = ref.topk(K)
    # Same tokens in the top k (compared as sets: the k-th place can tie), same values.
    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(topk.topk_ids, ref_top.indices)]
    assert sum(same) >= 0.95 * len(same)
    assert torch.equal(topk.topk_ids[:, 0].long(), ref_top.indices[:, 0])
    torch.testing.assert_close(topk.topk_logprobs, ref_top.values, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(topk.target_logprobs, ref.gather(1, targets[:, None])[:, 0], atol=2e-3, rtol=1e-3)
    # Rebuilt distributions agree on every listed token.
    rebuilt = topk.log_probs(torch.arange(len(topk)))
    listed = topk.topk_ids.long()
    torch.testing.assert_close(rebuilt.gather(1, listed), ref.gather(1, listed), atol=2e-3, rtol=1e-3)


def test_vllm_prompt_logprobs_source(engine, tokenized, full):
    topk = extract_topk_vllm(engine, tokenized, k=K, progress=False)
    assert_matches_full(topk, full, tokenized)


def test_openai_endpoint_source(server, tiny, tokenized, full):
    topk = extract_topk_openai(server + "/v1", "tiny", tokenized, vocab_size=tiny.vocab_size, k=K,
                               progress=False)
    assert_matches_full(topk, full, tokenized)


def test_full_topk_view_matches_vllm(engine, tokenized, full):
    view = topk_view(full, tokenized, k=K, rows_per_batch=7, progress=False)  # odd batch: rows cross batch edges
    assert_matches_full(view, full, tokenized)
    from_vllm = extract_topk_vllm(engine, tokenized, k=K, progress=False)
    torch.testing.assert_close(view.target_logprobs, from_vllm.target_logprobs, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(view.topk_logprobs, from_vllm.topk_logprobs, atol=2e-3, rtol=1e-3)
