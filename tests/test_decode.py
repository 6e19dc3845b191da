"""The reference decoder: cache or no cache, seeded sampling, plugin alone."""
import math

import torch

from vllm_plugin.decode import reference_generate
from vllm_plugin.experts import combine, entropy


def test_kv_cache_does_not_change_greedy_output(tiny):
    prompts = [tiny.encode("Aromi is a"), tiny.encode("the pub near")]
    for plugin in (None, tiny.plugins["a"], tiny.plugins["t"]):
        with_cache = reference_generate(tiny.base, prompts, plugin, max_new_tokens=12)
        without = reference_generate(tiny.base, prompts, plugin, max_new_tokens=12, use_cache=False)
        assert with_cache == without


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny):
    prompt = [tiny.encode("Aromi is a")]
    kw = dict(max_new_tokens=12, temperature=1.0)
    a = reference_generate(tiny.base, prompt, tiny.plugins["a"], seed=1, **kw)
    assert a == reference_generate(tiny.base, prompt, tiny.plugins["a"], seed=1, **kw)
    others = [reference_generate(tiny.base, prompt, tiny.plugins["a"], seed=s, **kw) for s in range(2, 6)]
    assert any(o != a for o in others)


def test_combination_is_the_renormalised_product_of_experts():
    base, plugin = torch.randn(50), torch.randn(50)
    p = torch.softmax(combine(base, plugin), -1)
    product = torch.softmax(base, -1) * torch.softmax(plugin, -1)
    torch.testing.assert_close(p, product / product.sum())
    torch.testing.assert_close(torch.softmax(combine(base, plugin, 0.0), -1), torch.softmax(base, -1))


def test_entropy_of_each_expert_counts_masked_tokens_as_zero():
    """The gate's entropy equals the categorical entropy, in nats, with -inf scores (tokens a
    grammar or bad words masked) as probability 0 and no NaN from them, also where most tokens
    lie under the log-prob floor that keeps exp out of float32's slow subnormal range."""
    torch.manual_seed(0)
    scores = torch.randn(4, 300) * 5
    scores[1, 10:200] = float("-inf")
    expected = torch.distributions.Categorical(logits=scores).entropy()
    assert torch.allclose(entropy(scores), expected, atol=1e-5)
    assert torch.allclose(entropy(torch.zeros(2, 64)), torch.full((2,), math.log(64)), atol=1e-6)
    assert entropy(scores.double()).dtype == torch.float32
    peaked = torch.full((1, 49152), -100.0)  # most log-probs below the floor that keeps exp fast
    peaked[0, :3] = torch.tensor([0.0, -1.0, -2.0])
    expected = torch.distributions.Categorical(logits=peaked.double()).entropy().float()
    assert torch.allclose(entropy(peaked), expected, atol=1e-6)
    masked = scores.clone().requires_grad_()
    entropy(masked).sum().backward()  # a gate's gradient through a masked row stays finite
    assert torch.isfinite(masked.grad).all() and (masked.grad[1, 10:200] == 0).all()


def test_entropy_with_flat_groups_is_the_entropy_of_the_spelled_out_columns():
    """``entropy_with_flat``: scores plus groups of equal columns (a shortlisted plugin's rest row,
    lifted or not on copied tokens) have the entropy of those columns written out, empty groups
    included, with a finite gradient."""
    from vllm_plugin.experts import entropy_with_flat

    torch.manual_seed(0)
    scores, flat = torch.randn(3, 50) * 3, torch.randn(3, 3)
    counts = torch.tensor([[100, 0, 5], [7, 3, 0], [0, 0, 0]])
    spelled = [torch.cat([scores[i]] + [flat[i, g].repeat(int(counts[i, g])) for g in range(3)]) for i in range(3)]
    expected = torch.stack([entropy(row[None].double())[0] for row in spelled])
    assert torch.allclose(entropy_with_flat(scores, flat, counts), expected, atol=1e-5)
    scores.requires_grad_(), flat.requires_grad_()
    entropy_with_flat(scores, flat, counts).sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.isfinite(flat.grad).all()


def test_plugin_alone_and_stop_tokens(tiny):
    prompt = tiny.encode("Aromi is a")
    alone = reference_generate(None, [prompt], tiny.plugins["a"], max_new_tokens=8)[0]
    state_model = tiny.plugins["a"]
    with torch.no_grad():
        first = int(state_model.head(state_model(torch.tensor([prompt])))[0, -1].argmax())
    assert alone[0] == first
    stopped = reference_generate(None, [prompt], tiny.plugins["a"], max_new_tokens=8, stop_token_ids=[first])[0]
    assert stopped == [first]
