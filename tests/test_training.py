"""Base-logit extraction, its cache, and a short real training run on the tiny base."""
import json
import math
import re
from dataclasses import replace

import pytest
import torch

import vllm_plugin.training.base_logits as bl_mod
from vllm_plugin.training.base_logits import BaseLogits, BaseLogitsError, cached, extract_full, tokenize_examples
from vllm_plugin.training.data import load_e2e, split_by_input, with_shots
from vllm_plugin.training.pipeline import RunSpec, run
from vllm_plugin.training.train import PairSet, TrainConfig, TrainingDivergedError, evaluate
from vllm_plugin.checkpoint import load_plugin
from vllm_plugin.testing import CORPUS_WORDS

from .test_data import write_e2e


def synthetic_rows(n_inputs=40):
    """Inputs whose references follow a fixed pattern a plugin can learn."""
    names, foods, areas = CORPUS_WORDS[-12:], ["Italian", "French", "Chinese", "English"], ["riverside", "city centre"]
    rows = []
    for i in range(n_inputs):
        name, food, area = names[i % 12], foods[i % 4], areas[i % 2]
        mr = f"name[{name}], food[{food}], area[{area}], customer rating[{i}]"
        rows.append((mr, f"{name} serves {food} food in the {area}."))
        rows.append((mr, f"In the {area}, {name} serves {food} food."))
    return rows


@pytest.fixture(scope="module")
def e2e_file(tmp_path_factory):
    return write_e2e(tmp_path_factory.mktemp("data") / "e2e.csv", synthetic_rows())


def plain_log_probs(base, ts):
    """Per target token log-probs from one whole forward per example (no sharing, no cache)."""
    out = []
    with torch.no_grad():
        for p, t in zip(ts.example_prompt, ts.targets):
            ids = torch.tensor([ts.prompts[p] + t])
            logits = base(ids).logits[0, len(ts.prompts[p]) - 1:-1]
            out.append(torch.log_softmax(logits.float(), -1))
    return torch.cat(out)


def test_full_extraction_equals_plain_forward(tiny, e2e_file):
    ts = tokenize_examples(load_e2e(e2e_file)[:30], tiny.tokenizer)
    assert len(ts.prompts) == 15  # each distinct prompt once
    bl = extract_full(tiny.base, ts, prompts_per_batch=4, progress=False)
    assert len(bl) == ts.num_target_tokens
    got = bl.log_probs(torch.arange(len(bl)))
    torch.testing.assert_close(got, plain_log_probs(tiny.base, ts), atol=2e-4, rtol=1e-4)


def test_cache_round_trip_and_reuse(tiny, e2e_file, tmp_path):
    ts = tokenize_examples(load_e2e(e2e_file)[:6], tiny.tokenizer)
    calls = []

    def build():
        calls.append(1)
        return extract_full(tiny.base, ts, progress=False)

    first = cached(tmp_path / "c", build)
    second = cached(tmp_path / "c", build)
    assert calls == [1]
    assert torch.equal(first.hidden, second.hidden) and torch.equal(first.head_weight, second.head_weight)
    (tmp_path / "c" / "base_logits.safetensors").write_bytes(b"garbage")
    with pytest.raises(BaseLogitsError, match="unreadable.*delete it to rebuild"):
        BaseLogits.load(tmp_path / "c")


def test_topk_tail_treatment_is_normalised():
    lp = torch.log_softmax(torch.randn(3, 50), -1)
    top = lp.topk(5)
    least = lp.argmin(-1)
    targets = torch.tensor([top.indices[0, 0], least[1], least[2]])  # listed, then outside the top 5
    bl = BaseLogits(kind="topk", vocab_size=50, topk_ids=top.indices.int(), topk_logprobs=top.values,
                    target_logprobs=lp.gather(1, targets[:, None])[:, 0])
    full = bl.log_probs(torch.arange(3))
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(full.gather(1, top.indices), top.values)
    # A target outside the top k is not singled out: it sits in the flat tail with every other
    # unlisted token (its exact log-prob would tell the plugin which tail token is right).
    tail = torch.log((1 - top.values.exp().sum(-1)) / 45)
    torch.testing.assert_close(full[1:].gather(1, targets[1:, None])[:, 0], tail[1:])
    torch.testing.assert_close(full[0, targets[0]], top.values[0, 0])  # a listed target keeps its value


def test_lifted_tail_puts_the_prompts_tokens_below_the_kth_and_stays_normalised(tiny, e2e_file):
    """``copy_tail_offset``'s view: a lifted token outside the top k sits ``offset`` nats below the
    k-th log-prob (at most half the mass left among the lifted ones), the top k keep their values,
    the other tail tokens share what is left, and the rows still sum to 1; with nothing lifted it
    is the flat tail. A top-k cache ``with_lift`` lifts exactly each row's prompt tokens."""
    from vllm_plugin.experts import top_k_with_flat_tail

    torch.manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(3, 50), -1)
    top, ids = lp.topk(5)
    lifted = torch.zeros(3, 50, dtype=torch.bool)
    lifted[0, lp[0].argsort()[:4]] = True  # the four least likely tokens
    lifted[1, ids[1, 0]] = True  # a top-k token: stays as listed
    view = top_k_with_flat_tail(ids, top, 50, lifted, -1.5)
    torch.testing.assert_close(view.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(view.gather(1, ids), top)
    kth = top[0, -1]
    left = 1 - top[0].exp().sum()
    lift = torch.minimum(kth - 1.5, torch.log(0.5 * left / 4))
    torch.testing.assert_close(view[0, lifted[0]], lift.expand(4))
    torch.testing.assert_close(top_k_with_flat_tail(ids[1:], top[1:], 50, lifted[1:], -1.5),
                               top_k_with_flat_tail(ids[1:], top[1:], 50))
    with pytest.raises(BaseLogitsError, match="only a top-k cache"):
        extract_full(tiny.base, tokenize_examples(load_e2e(e2e_file)[:2], tiny.tokenizer), progress=False).with_lift(
            tokenize_examples(load_e2e(e2e_file)[:2], tiny.tokenizer), [], -1.0)
    ts = tokenize_examples(load_e2e(e2e_file)[:4], tiny.tokenizer)
    bl = bl_mod.topk_view(extract_full(tiny.base, ts, progress=False), ts, 5, progress=False).with_lift(ts, [], 0.0)
    row = len(ts.targets[0])  # the second example's first target token
    dense = bl.log_probs(torch.tensor([row]))[0]
    prompt = set(ts.prompts[ts.example_prompt[1]]) - set(bl.topk_ids[row].tolist())
    tail = dense.min()
    assert {int(t) for t in (dense > tail + 1e-4).nonzero()[:, 0]} == prompt | set(bl.topk_ids[row].tolist())


def test_tail_prior_shares_the_mass_the_top_k_leave_by_the_fit_targets_unigram_frequencies(tiny, e2e_file):
    """``tail_prior``'s view: every token outside the top k gets the mass they leave times its
    prior share of the tail, capped at the k-th listed log-prob (the API says it is less likely),
    and the row is renormalised for what the cap took: the top k keep their ratios, no tail token
    passes the k-th, rows sum to 1; a uniform prior is the flat tail. ``unigram_log_prior``
    counts the targets, add-``smoothing``; the view is refused for a full cache, beside a lift,
    and with a prior of another size."""
    from vllm_plugin.experts import base_top_k, top_k_with_flat_tail
    from vllm_plugin.model import PluginConfig

    torch.manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(3, 50), -1)
    top, ids = lp.topk(5)
    prior = torch.log_softmax(2 * torch.randn(50), 0)
    view = top_k_with_flat_tail(ids, top, 50, tail_prior=prior)
    torch.testing.assert_close(view.logsumexp(-1), torch.zeros(3), atol=1e-5, rtol=0)
    shift = view.gather(1, ids) - top  # the renormalisation: one constant per row
    torch.testing.assert_close(shift, shift[:, :1].expand(3, 5))
    tail = torch.ones(3, 50, dtype=torch.bool).scatter(1, ids, False)
    kth = view.gather(1, ids).amin(-1, keepdim=True)
    assert (view[tail] <= kth.expand(3, 50)[tail] + 1e-6).all()
    left, rest = 1 - top.exp().sum(-1, keepdim=True), 1 - prior[ids].exp().sum(-1, keepdim=True)
    shared = (left.log() - rest.log() + prior + shift[:, :1])  # the tail before the cap
    uncapped = tail & (shared < kth)
    assert (tail & ~uncapped).any() and uncapped.any()  # this prior is peaked enough for the cap to act
    torch.testing.assert_close(view[uncapped], shared[uncapped])
    torch.testing.assert_close(view[tail & ~uncapped], kth.expand(3, 50)[tail & ~uncapped])
    torch.testing.assert_close(top_k_with_flat_tail(ids, top, 50, tail_prior=torch.full((50,), -math.log(50))),
                               top_k_with_flat_tail(ids, top, 50))
    with pytest.raises(ValueError, match="not both"):
        top_k_with_flat_tail(ids, top, 50, torch.zeros(3, 50, dtype=torch.bool), -1.0, prior)
    ts = tokenize_examples(load_e2e(e2e_file)[:4], tiny.tokenizer)
    unigram = bl_mod.unigram_log_prior(ts, tiny.vocab_size, 0.5)
    counts = torch.bincount(ts.flat_targets(), minlength=tiny.vocab_size).double()
    torch.testing.assert_close(unigram.double().exp(), (counts + 0.5) / (counts.sum() + 0.5 * tiny.vocab_size))
    tempered = (counts + 0.5).sqrt()  # tail_prior_power 0.5; 0 is the flat tail's uniform prior
    torch.testing.assert_close(bl_mod.unigram_log_prior(ts, tiny.vocab_size, 0.5, 0.5).double().exp(),
                               tempered / tempered.sum())
    torch.testing.assert_close(bl_mod.unigram_log_prior(ts, tiny.vocab_size, 0.5, 0.0),
                               torch.full((tiny.vocab_size,), -math.log(tiny.vocab_size)))
    full = extract_full(tiny.base, ts, progress=False)
    with pytest.raises(BaseLogitsError, match="only a top-k cache without lifted tokens"):
        full.with_tail_prior(unigram)
    topk = bl_mod.topk_view(full, ts, 5, progress=False)
    with pytest.raises(BaseLogitsError, match="only a top-k cache without lifted tokens"):
        topk.with_lift(ts, [], -1.0).with_tail_prior(unigram)
    with pytest.raises(BaseLogitsError, match="a tail prior of"):
        topk.with_tail_prior(unigram[:-1])
    with pytest.raises(BaseLogitsError, match="only a top-k cache with a flat tail"):
        topk.with_tail_prior(unigram).with_lift(ts, [], -1.0)
    with pytest.raises(ValueError, match="tail_prior_power tempers the tail prior: it needs tail_prior"):
        PluginConfig(vocab_size=50, tail_prior_power=0.5)
    # a token vLLM's logit_bias touched keeps its place relative to the top k: shifted with them
    biased = torch.zeros(3, 50)
    far = lp[0].argsort()[0]  # the least likely token of row 0
    biased[0, far] = 1.0
    constrained = base_top_k(lp, 5, biased, tail_prior=prior)
    torch.testing.assert_close(constrained[0, far] - constrained[0, ids[0, 0]], lp[0, far] - lp[0, ids[0, 0]])
    torch.testing.assert_close(constrained[1:], view[1:])


def test_short_training_lowers_heldout_loss_and_resumes(tiny, e2e_file, tmp_path, monkeypatch):
    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"),
                   train=TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup_steps=2, patience=5))
    metrics = run(spec, progress=False, log=lambda *_: None)
    history = [h["select_loss"] for h in metrics["history"]]
    assert len(history) == 3
    assert metrics["best_select_loss"] < metrics["base_select_loss"] - 0.5
    assert history[-1] < history[0]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["best_epoch"] == metrics["best_epoch"] and saved["source"] == "full"

    plugin = load_plugin(tmp_path / "run" / "checkpoint", tiny.vocab_size, tiny.fingerprint)
    assert plugin.config.training["dataset"] == "e2e" and plugin.config.tokenizer_fingerprint == tiny.fingerprint
    examples = load_e2e(e2e_file)
    _, select = split_by_input(examples)
    # The base logits are cached: a resumed run must not extract them again.
    monkeypatch.setattr(bl_mod, "extract_full", lambda *a, **k: pytest.fail("re-extracted base logits"))
    monkeypatch.setattr("vllm_plugin.training.pipeline.extract_full", lambda *a, **k: pytest.fail("re-extracted"))
    spec.train.epochs = 4
    resumed = run(spec, progress=False, log=lambda *_: None)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3, 4]
    assert resumed["history"][:3] == metrics["history"]


def test_full_topk_source_trains_on_the_top_k_view(tiny, e2e_file, tmp_path, monkeypatch):
    views = []

    def recording_view(full, ts, k, **kw):
        views.append(bl_mod.topk_view(full, ts, k, **kw))
        return views[-1]

    monkeypatch.setattr("vllm_plugin.training.pipeline.topk_view", recording_view)
    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), source="full_topk", top_k=5, d_model=32,
                   out=str(tmp_path / "run"), train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=2))
    metrics = run(spec, progress=False, log=lambda *_: None)
    assert [v.topk_ids.shape[1] for v in views] == [5, 5]  # fit and select, both top-5 only
    assert all(v.kind == "topk" and v.meta["source"] == "full_topk" for v in views)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["source"] == "full_topk"
    assert metrics["best_select_loss"] < metrics["base_select_loss"]


def test_pipeline_refuses_bad_input_before_work(tiny, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run(RunSpec(data=str(tmp_path / "missing.csv"), base=str(tiny.base_dir), out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="unknown base-logit source 'magic'"):
        run(RunSpec(source="magic", base=str(tiny.base_dir), out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match="needs --endpoint"):
        run(RunSpec(source="openai", base=str(tiny.base_dir), out=str(tmp_path / "r")))


def test_pair_set_refuses_foreign_cache(tiny, e2e_file):
    ts = tokenize_examples(load_e2e(e2e_file)[:4], tiny.tokenizer)
    other = tokenize_examples(load_e2e(e2e_file)[:2], tiny.tokenizer)
    with pytest.raises(ValueError, match="does not belong to this data"):
        PairSet(ts, extract_full(tiny.base, other, progress=False))


def test_evaluate_base_alone_is_mean_nll(tiny, e2e_file):
    ts = tokenize_examples(load_e2e(e2e_file)[:4], tiny.tokenizer)
    data = PairSet(ts, extract_full(tiny.base, ts, progress=False))
    lp = plain_log_probs(tiny.base, ts)
    targets = ts.flat_targets()
    expected = -lp.gather(1, targets[:, None]).mean().item()
    assert evaluate(None, data) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("kind", ["full", "topk", "topk_lift", "topk_prior"])
def test_base_log_probs_at_some_columns_equal_the_full_rows(tiny, e2e_file, kind):
    """``log_probs_at`` and ``target_log_probs`` read only the columns they need, and give exactly
    the numbers of the whole-vocabulary rows (the top-k view for a top-k cache, with or without
    the prompt's tokens lifted out of its flat tail, or its tail shared by a prior)."""
    ts = tokenize_examples(load_e2e(e2e_file)[:8], tiny.tokenizer)
    bl = extract_full(tiny.base, ts, progress=False)
    if kind.startswith("topk"):
        bl = bl_mod.topk_view(bl, ts, 5, progress=False)
    if kind == "topk_lift":
        bl = bl.with_lift(ts, [], -2.0)
    if kind == "topk_prior":  # a peaked prior, so that the cap at the k-th acts in many rows
        bl = bl.with_tail_prior(bl_mod.unigram_log_prior(ts, tiny.vocab_size, 0.001))
        whole = bl.log_probs(torch.arange(len(bl)))
        tail = torch.ones_like(whole, dtype=torch.bool).scatter(1, bl.topk_ids.long(), False)
        assert ((whole >= whole.gather(1, bl.topk_ids.long()).amin(-1, keepdim=True) - 1e-6) & tail).any()
    rows = torch.arange(len(bl))
    candidates = bl.candidates(7)
    assert candidates.shape == (len(bl), 7 if kind == "full" else 5)
    whole = bl.log_probs(rows)
    assert (whole.gather(1, candidates) >= whole.topk(candidates.shape[1]).values[:, -1:] - 1e-5).all()
    # Repeats, as drawn negatives and a top-k token asked for twice.
    cols = torch.cat([torch.unique(candidates), candidates[0, :1], torch.tensor([3, 3, 17])])
    torch.testing.assert_close(bl.log_probs_at(rows, cols), whole[:, cols], atol=1e-5, rtol=1e-5)
    targets = ts.flat_targets()
    torch.testing.assert_close(bl.target_log_probs(rows, targets), whole.gather(1, targets[:, None])[:, 0],
                               atol=1e-5, rtol=1e-5)


def test_base_candidates_are_cached_beside_the_base_log_probs(tiny, e2e_file, tmp_path, monkeypatch):
    ts = tokenize_examples(load_e2e(e2e_file)[:6], tiny.tokenizer)
    bl = cached(tmp_path / "c", lambda: extract_full(tiny.base, ts, progress=False))
    ids = bl.candidates(4)
    assert (tmp_path / "c" / "candidates_top4.safetensors").is_file()
    again = BaseLogits.load(tmp_path / "c")
    monkeypatch.setattr(BaseLogits, "scores", lambda *a: pytest.fail("recomputed the candidates"))
    assert torch.equal(again.candidates(4), ids) and torch.equal(again.log_normaliser, bl.log_normaliser)


@pytest.mark.parametrize("kind", ["full", "topk"])
def test_sampled_softmax_estimates_the_exact_loss(tiny, e2e_file, kind):
    """With enough negatives the sampled normaliser matches the exact one; with few it is an
    unbiased estimate of the tail's sum: over many draws its mean comes to the exact loss."""
    from vllm_plugin.model import PluginConfig, build_plugin
    from vllm_plugin.training.train import batch_loss, sampled_batch_loss

    ts = tokenize_examples(load_e2e(e2e_file)[:12], tiny.tokenizer)
    bl = extract_full(tiny.base, ts, progress=False)
    if kind == "topk":
        bl = bl_mod.topk_view(bl, ts, 5, progress=False)
    data = PairSet(ts, bl)
    torch.manual_seed(0)
    plugin = build_plugin(PluginConfig(vocab_size=tiny.vocab_size, d_model=32, dropout=0.0)).eval()
    with torch.no_grad():
        plugin.out_bias.normal_(0, 2.0)  # a plugin with opinions about the tail
        exact, n = batch_loss(plugin, data, list(range(12)))
        close, m = sampled_batch_loss(plugin, data, list(range(12)), negatives=200_000, candidate_k=4)
        assert m == n
        assert close.item() == pytest.approx(exact.item(), rel=2e-3)
        few = [sampled_batch_loss(plugin, data, [i], negatives=8, candidate_k=4)[0].item() for i in range(12)]
    assert sum(few) == pytest.approx(exact.item(), rel=0.05)


def test_sampled_softmax_is_exact_when_the_candidates_cover_the_vocabulary(tiny, e2e_file):
    from vllm_plugin.model import PluginConfig, build_plugin
    from vllm_plugin.training.train import batch_loss, sampled_batch_loss

    ts = tokenize_examples(load_e2e(e2e_file)[:4], tiny.tokenizer)
    data = PairSet(ts, extract_full(tiny.base, ts, progress=False))
    torch.manual_seed(0)
    plugin = build_plugin(PluginConfig(vocab_size=tiny.vocab_size, d_model=32, dropout=0.0)).eval()
    with torch.no_grad():
        exact = batch_loss(plugin, data, [0, 1, 2, 3])[0]
        covered = sampled_batch_loss(plugin, data, [0, 1, 2, 3], negatives=8, candidate_k=10 * tiny.vocab_size)[0]
    assert covered.item() == pytest.approx(exact.item(), rel=1e-5)


def test_copy_scores_in_both_losses_and_their_gradient(tiny, e2e_file):
    """A plugin with copy scores: both losses add the same bonus on each target's prompt tokens
    (the sampled one is exact once its candidates cover the vocabulary); a fresh one starts as
    the plugin without them, and its copy scores get a gradient from the first batch."""
    import copy

    from vllm_plugin.model import PluginConfig, build_plugin
    from vllm_plugin.testing import tiny_plugin
    from vllm_plugin.training.train import batch_loss, sampled_batch_loss

    ts = tokenize_examples(load_e2e(e2e_file)[:6], tiny.tokenizer)
    data = PairSet(ts, extract_full(tiny.base, ts, progress=False))
    idx = [0, 3, 5]
    mask = data.in_prompt(idx, tiny.vocab_size)
    assert mask.shape == (sum(len(ts.targets[e]) for e in idx), tiny.vocab_size)
    assert mask[0].nonzero()[:, 0].tolist() == sorted(set(ts.prompts[ts.example_prompt[0]]))
    plugin = tiny_plugin(tiny.vocab_size, copy=True)
    plain = copy.deepcopy(plugin)
    plain.copy_score = None
    with torch.no_grad():
        exact = batch_loss(plugin, data, idx)[0]
        covered = sampled_batch_loss(plugin, data, idx, negatives=8, candidate_k=10 * tiny.vocab_size)[0]
        assert covered.item() == pytest.approx(exact.item(), rel=1e-5)
        assert abs(exact.item() - batch_loss(plain, data, idx)[0].item()) > 1e-3
    torch.manual_seed(0)
    fresh = build_plugin(PluginConfig(vocab_size=tiny.vocab_size, d_model=32, dropout=0.0, copy=True))
    without = copy.deepcopy(fresh)
    without.copy_score = None
    loss = batch_loss(fresh, data, idx)[0]
    assert loss.item() == pytest.approx(batch_loss(without, data, idx)[0].item(), rel=1e-6)
    loss.backward()
    assert fresh.copy_score.weight.grad.abs().sum() > 0


def test_pending_copy_scores_leave_what_the_target_said_before(tiny, e2e_file):
    """Pending-copy scores in training read, for each target token, the prompt's tokens that its
    target has not held before it (what the processor reads from the output so far); both losses
    agree on them, and a fresh plugin's pending scores start at no bonus and get a gradient."""
    from vllm_plugin.model import PluginConfig, build_plugin
    from vllm_plugin.testing import tiny_plugin
    from vllm_plugin.training.train import batch_loss, sampled_batch_loss

    ts = tokenize_examples(load_e2e(e2e_file)[:6], tiny.tokenizer)
    data = PairSet(ts, extract_full(tiny.base, ts, progress=False))
    idx = [1, 4]
    before = data.generated_before(idx, tiny.vocab_size)
    rows = [(e, t) for e in idx for t in range(len(ts.targets[e]))]
    assert before.shape == (len(rows), tiny.vocab_size)
    for r, (e, t) in enumerate(rows):
        assert before[r].nonzero()[:, 0].tolist() == sorted(set(ts.targets[e][:t])), (e, t)
    cols = torch.tensor(sorted({x for e in idx for x in ts.targets[e]} | {0, 1}))
    assert torch.equal(data.generated_before(idx, tiny.vocab_size, cols), before[:, cols])
    plugin = tiny_plugin(tiny.vocab_size, copy=True, copy_pending=True)
    with torch.no_grad():
        exact = batch_loss(plugin, data, idx)[0]
        covered = sampled_batch_loss(plugin, data, idx, negatives=8, candidate_k=10 * tiny.vocab_size)[0]
        assert covered.item() == pytest.approx(exact.item(), rel=1e-5)
    torch.manual_seed(0)
    fresh = build_plugin(PluginConfig(vocab_size=tiny.vocab_size, d_model=32, dropout=0.0, copy=True,
                                      copy_pending=True))
    loss = batch_loss(fresh, data, idx)[0]
    loss.backward()
    assert fresh.pending_score.weight.grad.abs().sum() > 0
    fresh.pending_score = None
    with torch.no_grad():
        assert loss.item() == pytest.approx(batch_loss(fresh, data, idx)[0].item(), rel=1e-6)
    with pytest.raises(ValueError, match="copy_pending is for a plugin with copy scores"):
        PluginConfig(vocab_size=tiny.vocab_size, copy_pending=True)
    with pytest.raises(ValueError, match="read_task_only reads the prompt from the copy_after marker on"):
        PluginConfig(vocab_size=tiny.vocab_size, copy=True, read_task_only=True)
    with pytest.raises(ValueError, match="read_task_only is for the gru plugin"):
        PluginConfig(vocab_size=tiny.vocab_size, architecture="transformer", copy=True, copy_after=[1],
                     read_task_only=True)
    for bad in ({}, {"copy_after": [1], "read_task_only": True}):
        with pytest.raises(ValueError, match="copy_example scores the examples before the copy_after marker"):
            PluginConfig(vocab_size=tiny.vocab_size, copy=True, copy_example=True, **bad)
    for bad in (-1, 21, 2.0, True, "4"):  # what a hand-edited config.json could hold
        with pytest.raises(ValueError, match="base_candidates=.* must be an integer between 0 \\(none\\) and 20"):
            PluginConfig(vocab_size=tiny.vocab_size, base_candidates=bad)
    with pytest.raises(ValueError, match="base_candidates=8 is more than the 5 top log-probs the plugin was trained"):
        PluginConfig(vocab_size=tiny.vocab_size, base_candidates=8, training={"source": "vllm", "top_k": 5})
    for bad, copy in ((0.5, True), (float("nan"), True), (-60, True), (True, True), ("-1", True), (-1.0, False)):
        with pytest.raises(ValueError, match="copy_tail_offset=.* must be a number of nats between -50 and 0"):
            PluginConfig(vocab_size=tiny.vocab_size, copy=copy, copy_tail_offset=bad)


def test_resume_refuses_a_run_trained_with_other_settings(tiny, e2e_file, tmp_path):
    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"),
                   train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=2))
    run(spec, progress=False, log=lambda *_: None)
    for bad, message in [({"base_candidates": 21}, "--base-candidates is a number of the base's top tokens, 0 to 20"),
                         ({"base_candidates": 4, "alone": True}, "not with --alone"),
                         ({"base_candidates": 8, "source": "full_topk", "top_k": 5}, "more than the 5 top log-probs"),
                         ({"copy_tail_offset": -1.0, "copy": True}, "needs --copy and a top-k --source"),
                         ({"copy_tail_offset": 1.0, "copy": True, "source": "full_topk"}, "nats in \\[-50, 0\\]")]:
        with pytest.raises(ValueError, match=message):
            run(replace(spec, out=str(tmp_path / "bad"), **bad), progress=False, log=lambda *_: None)
    spec.train.negatives = 16
    with pytest.raises(ValueError, match=r"another base, plugin or training \(negatives: 0 then, 16 now\).*--no-resume"):
        run(spec, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--name-swap is for E2E"):
        run(RunSpec(dataset="webnlg", data=str(e2e_file), base=str(tiny.base_dir), name_swap=0.5,
                    out=str(tmp_path / "w")), progress=False)
    with pytest.raises(ValueError, match="--value-swap is for E2E"):
        run(RunSpec(dataset="webnlg", data=str(e2e_file), base=str(tiny.base_dir), value_swap=0.5,
                    out=str(tmp_path / "w")), progress=False)
    with pytest.raises(ValueError, match=r"--value-swap is a share of the fit inputs, in \[0, 1\]; got 2"):
        run(replace(spec, value_swap=2.0), progress=False)


def test_sampled_softmax_training_lowers_the_exact_heldout_loss(tiny, e2e_file, tmp_path):
    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"),
                   train=TrainConfig(epochs=3, batch_size=8, lr=1e-2, warmup_steps=2, patience=5, negatives=32,
                                     candidate_k=8))
    metrics = run(spec, progress=False, log=lambda *_: None)
    assert metrics["best_select_loss_exact"] < metrics["base_select_loss"] - 0.5
    assert metrics["best_select_loss"] == pytest.approx(metrics["best_select_loss_exact"], abs=0.3)


def test_shared_prompts_give_the_plain_forward_numbers(tiny, e2e_file):
    """The GRU reads each distinct prompt of a batch once, their common prefix (here the
    template's opening, or an in-context example before every prompt) once for all
    (``target_hidden(share_prompts=True)``); in eval mode that is exactly the plain forward of
    every whole sequence, and grouped batches visit each example once."""
    from vllm_plugin.model import PluginConfig, build_plugin
    from vllm_plugin.training.train import target_hidden

    ts = tokenize_examples(load_e2e(e2e_file)[:16], tiny.tokenizer)
    data = PairSet(ts, None)
    torch.manual_seed(0)
    plugin = build_plugin(PluginConfig(vocab_size=tiny.vocab_size, d_model=32, n_layers=2)).eval()
    example = load_e2e(e2e_file)[20]
    behind = PairSet(tokenize_examples([replace(e, prompt=with_shots(e.prompt, [example]))
                                        for e in load_e2e(e2e_file)[:16]], tiny.tokenizer), None)
    for pairs, idx in ((data, [5, 0, 1, 9, 4, 8]), (behind, [5, 0, 1, 9, 4, 8]), (data, [3])):
        with torch.no_grad():  # prompts shared by pairs, out of order; and a batch of one
            shared, rows, targets = target_hidden(plugin, pairs, idx, share_prompts=True)
            ids, pos_b, pos_t, plain_rows, plain_targets = pairs.batch(idx)
            plain = plugin(ids)[pos_b, pos_t]
        assert torch.equal(rows, plain_rows) and torch.equal(targets, plain_targets)
        torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    order = data.grouped_order(3)
    assert sorted(order) == list(range(16)) and order != data.grouped_order(4)
    prompt = [ts.example_prompt[e] for e in order]
    assert all(prompt.index(p) + prompt.count(p) - 1 == len(prompt) - 1 - prompt[::-1].index(p) for p in prompt)


def test_a_top_k_run_with_copy_tail_offset_trains_and_selects_on_the_lifted_view(tiny, e2e_file, tmp_path):
    """``RunSpec(copy_tail_offset=...)`` with a top-k source: the plugin trains against the top-k
    view with each prompt's tokens lifted out of the flat tail (``BaseLogits.with_lift``), its
    select loss and the base's are those of that view, and its checkpoint carries the offset,
    which the processor and the reference decoder read."""
    from vllm_plugin.training.pipeline import LazyBase, base_logits_for, tokenized_splits

    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"), copy=True,
                   source="full_topk", top_k=5, shortlist_min_count=1, copy_tail_offset=-1.0,
                   train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=2))
    metrics = run(spec, progress=False, log=lambda *_: None)
    plugin = load_plugin(tmp_path / "run" / "checkpoint")
    assert plugin.config.copy_tail_offset == -1.0 and plugin.config.training["copy_tail_offset"] == -1.0
    splits = tokenized_splits(spec, log=lambda *_: None)
    select = base_logits_for(splits.select_ts, spec, splits.base_path, splits.fingerprint, LazyBase(splits.base_path),
                             progress=False)
    lifted = PairSet(splits.select_ts, select.with_lift(splits.select_ts, [], -1.0))
    assert evaluate(None, lifted) == pytest.approx(metrics["base_select_loss"], rel=1e-5)
    assert evaluate(None, PairSet(splits.select_ts, select)) != pytest.approx(metrics["base_select_loss"], rel=1e-3)
    assert evaluate(plugin, lifted) == pytest.approx(metrics["best_select_loss"], rel=1e-4)


def test_a_top_k_run_with_a_tail_prior_trains_and_selects_on_that_view(tiny, e2e_file, tmp_path):
    """``RunSpec(tail_prior=...)`` with a top-k source: the plugin trains against the top-k view
    whose tail follows the fit targets' unigram frequencies (``BaseLogits.with_tail_prior``), its
    select loss and the base's are those of that view, and its checkpoint carries the prior, which
    the processor and the reference decoder read; a full source or a lift beside it is refused."""
    from vllm_plugin.training.pipeline import LazyBase, base_logits_for, tokenized_splits

    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"), copy=True,
                   source="full_topk", top_k=5, shortlist_min_count=1, tail_prior=0.1,
                   train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=2))
    metrics = run(spec, progress=False, log=lambda *_: None)
    plugin = load_plugin(tmp_path / "run" / "checkpoint")
    splits = tokenized_splits(spec, log=lambda *_: None)
    prior = bl_mod.unigram_log_prior(splits.fit_ts, tiny.vocab_size, 0.1)
    assert plugin.config.tail_prior == 0.1 and plugin.config.training["tail_prior"] == 0.1
    torch.testing.assert_close(plugin.tail_log_prior, prior)
    select = base_logits_for(splits.select_ts, spec, splits.base_path, splits.fingerprint, LazyBase(splits.base_path),
                             progress=False)
    priored = PairSet(splits.select_ts, select.with_tail_prior(prior))
    assert evaluate(None, priored) == pytest.approx(metrics["base_select_loss"], rel=1e-5)
    assert evaluate(None, PairSet(splits.select_ts, select)) != pytest.approx(metrics["base_select_loss"], rel=1e-3)
    assert evaluate(plugin, priored) == pytest.approx(metrics["best_select_loss"], rel=1e-4)
    for bad in (dict(source="full"), dict(copy_tail_offset=-1.0), dict(tail_prior=0.0), dict(tail_prior_power=1.5)):
        with pytest.raises(ValueError, match="--tail-prior .* shares a top-k view's tail"):
            run(replace(spec, out=str(tmp_path / "bad"), **bad), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--tail-prior-power tempers the tail prior: it needs --tail-prior"):
        run(replace(spec, out=str(tmp_path / "bad"), tail_prior=None, tail_prior_power=0.5), progress=False,
            log=lambda *_: None)


def test_gate_is_fitted_on_select_after_training(tiny, e2e_file, tmp_path):
    """``RunSpec(gate=True)``: the trained plugin gets a per-position strength fitted on the select
    split, everything else frozen; the loss it starts from is the ungated plugin's."""
    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"), gate=True,
                   train=TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_steps=2))
    metrics = run(spec, progress=False, log=lambda *_: None)
    gate = metrics["gate"]
    assert gate["select_loss_ungated"] == pytest.approx(metrics["best_select_loss"], rel=1e-5)
    assert gate["select_loss_gated"] < gate["select_loss_ungated"]
    plugin = load_plugin(tmp_path / "run" / "checkpoint")
    assert plugin.config.gate and plugin.gate.weight.abs().sum() > 0
    # --gate-values: the same training, the gate fitted on select with its values redrawn.
    values = run(replace(spec, out=str(tmp_path / "values"), gate_values=True), progress=False, log=lambda *_: None)
    assert values["best_select_loss"] == pytest.approx(metrics["best_select_loss"], rel=1e-5)
    assert (gate["select_view"], values["gate"]["select_view"]) == ("real", "values")
    assert values["gate"]["select_loss_ungated"] != pytest.approx(gate["select_loss_ungated"], rel=1e-3)
    assert values["gate"]["select_loss_gated"] < values["gate"]["select_loss_ungated"]
    with pytest.raises(ValueError, match="--gate-values .* needs --gate"):
        run(replace(spec, out=str(tmp_path / "bad"), gate=False, gate_values=True), progress=False)


def test_gate_keeps_its_best_epoch(tiny, e2e_file):
    """``fit_gate`` returns, and leaves in the plugin, the gate of its best epoch (epoch 0 is the
    ungated plugin), not its last: an lr far too large makes the epochs overshoot."""
    from vllm_plugin.model import PluginConfig, build_plugin
    from vllm_plugin.training.train import fit_gate

    ts = tokenize_examples(load_e2e(e2e_file)[:24], tiny.tokenizer)
    data = PairSet(ts, extract_full(tiny.base, ts, progress=False))
    torch.manual_seed(0)
    plugin = build_plugin(PluginConfig(vocab_size=tiny.vocab_size, d_model=32, gate=True)).eval()
    with torch.no_grad():  # a unigram plugin, useful at some strength: the gate has an optimum
        counts = torch.bincount(torch.tensor([t for ts_t in ts.targets for t in ts_t]), minlength=tiny.vocab_size)
        plugin.out_bias.copy_(torch.log(counts + 0.1))
    losses = []
    gate = fit_gate(plugin, data, epochs=4, lr=3.0, batch_size=8,
                    log=lambda line: losses.append(float(re.search(r"select (\S+)", line).group(1))))
    everything = [gate["select_loss_ungated"], *losses]
    assert min(everything) < everything[-1] - 0.01  # the case this test is for: the last epoch is not the best
    assert gate["select_loss_gated"] == pytest.approx(min(everything), abs=1e-4)
    assert everything[gate["best_epoch"]] == pytest.approx(min(everything), abs=1e-4)
    assert evaluate(plugin, data) == pytest.approx(gate["select_loss_gated"], abs=1e-4)


def test_resume_refuses_a_run_of_another_base(tiny, e2e_file, tmp_path):
    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=16, out=str(tmp_path / "run"),
                   train=TrainConfig(epochs=1, batch_size=16))
    run(spec, progress=False, log=lambda *_: None)
    cfg = json.loads((tmp_path / "run" / "resume" / "model" / "config.json").read_text())
    cfg["tokenizer_fingerprint"] = "sha256:another-base"
    (tmp_path / "run" / "resume" / "model" / "config.json").write_text(json.dumps(cfg))
    spec.train.epochs = 2
    with pytest.raises(ValueError, match="holds a run of another base, plugin or training "
                                         r"\(tokenizer: 'sha256:another-base' then"):
        run(spec, progress=False, log=lambda *_: None)


def test_resume_refuses_another_recipe_before_the_base_pass(tiny, e2e_file, tmp_path, monkeypatch):
    """A run folder trained with the paper's recipe, continued with the default one: refused
    before any base log-prob pass, naming what differs and the recipe the folder looks like."""
    import vllm_plugin.training.pipeline as pipeline
    from vllm_plugin.training.recipes import recipe

    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=16, out=str(tmp_path / "run"),
                   train=TrainConfig(epochs=1, batch_size=16), **recipe("paper", "e2e"))
    run(spec, progress=False, log=lambda *_: None)

    def no_base_pass(*args, **kwargs):
        raise AssertionError("the base pass ran before the resume check")

    monkeypatch.setattr(pipeline, "base_logits_for", no_base_pass)
    chosen = replace(spec, **recipe("chosen", "e2e"))
    with pytest.raises(ValueError, match=r"copy: False then, True now.*shots: 0 then, 1 now.*"
                                         r"it looks like --recipe paper.*--no-resume"):
        run(chosen, progress=False, log=lambda *_: None)


def test_diverging_training_stops_and_keeps_the_best_checkpoint(tiny, e2e_file, tmp_path):
    """A learning rate that blows the weights up: training stops at the first non-finite loss or
    gradient, naming epoch and batch and the fix, and the good epoch-1 checkpoint survives."""
    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=16, out=str(tmp_path / "run"),
                   train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=1))
    run(spec, progress=False, log=lambda *_: None)
    run_dir = tmp_path / "run"
    kept = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and ("checkpoint" in p.parts or "resume" in p.parts)}
    assert any("checkpoint" in p.parts for p in kept)
    spec.train.epochs, spec.train.lr = 2, 1e30  # resumes after epoch 1, then diverges
    with pytest.raises(TrainingDivergedError, match=r"(loss|gradient norm) is (nan|inf).* at epoch 2, batch \d+ "
                                                    r".*best checkpoint .*epoch 1.* untouched.*Lower the learning rate"):
        run(spec, progress=False, log=lambda *_: None)
    now = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.rglob("*"))
           if p.is_file() and ("checkpoint" in p.parts or "resume" in p.parts)}
    assert now == kept
    load_plugin(run_dir / "checkpoint", tiny.vocab_size, tiny.fingerprint)  # finite, loads

    fresh = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=16, out=str(tmp_path / "fresh"),
                    train=TrainConfig(epochs=1, batch_size=8, lr=1e30, warmup_steps=1))
    with pytest.raises(TrainingDivergedError, match=r"epoch 1, batch \d+ .*no checkpoint was written"):
        run(fresh, progress=False, log=lambda *_: None)
    assert not (tmp_path / "fresh" / "checkpoint").exists()


def test_strength_sweep_ends_at_base_alone_and_training_loss(tiny, e2e_file):
    """benchmarks.strength: w = 0 is the base alone, w = 1 the loss training minimises, and the
    top-k plugin is scored against the base's top-k view, as it decodes."""
    from benchmarks.strength import cross_entropies
    from vllm_plugin.experts import base_top_k

    ts = tokenize_examples(load_e2e(e2e_file)[:8], tiny.tokenizer)
    data = PairSet(ts, extract_full(tiny.base, ts, progress=False))
    plugin = tiny.plugins["a"]
    base_ce, mid, full_ce = cross_entropies(data, plugin, [0.0, 0.5, 1.0], top_k=None)
    assert base_ce == pytest.approx(evaluate(None, data), rel=1e-5)
    assert full_ce == pytest.approx(evaluate(plugin, data), rel=1e-5)
    assert mid != base_ce and mid != full_ce

    k = tiny.plugins["k"]
    (top_k_base,) = cross_entropies(data, k, [0.0], top_k=5)
    targets = ts.flat_targets()
    view = torch.log_softmax(base_top_k(data.base.scores(torch.arange(len(data.base))), 5), -1)
    assert top_k_base == pytest.approx(-view.gather(1, targets[:, None]).mean().item(), rel=1e-5)


def test_resume_point_is_atomic_and_a_corrupt_one_names_the_fix(tiny, e2e_file, tmp_path, monkeypatch):
    """The resume point is one folder renamed into place: a kill while writing it (here, the
    optimizer file failing) leaves the previous point whole, and the re-run trains each epoch
    once. A corrupt ``state.json`` is an error naming the file and ``--no-resume``."""
    import vllm_plugin.training.loop as loop_mod

    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=16, out=str(tmp_path / "run"),
                   train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=1))
    first = run(spec, progress=False, log=lambda *_: None)
    resume = tmp_path / "run" / "resume"
    before = {p.relative_to(resume): p.read_bytes() for p in sorted(resume.rglob("*")) if p.is_file()}

    real_save_file = loop_mod.save_file

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the resume point")

    spec.train.epochs = 2
    monkeypatch.setattr(loop_mod, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        run(spec, progress=False, log=lambda *_: None)
    after = {p.relative_to(resume): p.read_bytes() for p in sorted(resume.rglob("*")) if p.is_file()}
    assert after == before  # the epoch-1 point, whole; no half-written sibling left
    assert sorted(p.name for p in resume.parent.iterdir() if p.name.startswith(".resume")) == []
    monkeypatch.setattr(loop_mod, "save_file", real_save_file)
    resumed = run(spec, progress=False, log=lambda *_: None)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]  # epoch 2 trained once, epoch 1 not again
    assert resumed["history"][0] == first["history"][0]

    (resume / "state.json").write_text('{"epoch": 2, "step":')
    spec.train.epochs = 3
    with pytest.raises(ValueError, match=rf"cannot resume from {re.escape(str(resume / 'state.json'))}.*--no-resume"):
        run(spec, progress=False, log=lambda *_: None)


def test_a_gated_run_stopped_while_fitting_its_gate_is_not_finished(tmp_path):
    """``train`` writes the training's metrics before the gate is fitted: a gated run stopped in
    between must run again (it resumes past its last epoch and fits the gate), not be reused."""
    from vllm_plugin.training.pipeline import run_finished

    gated, plain = RunSpec(out=str(tmp_path / "g"), gate=True), RunSpec(out=str(tmp_path / "p"))
    assert not run_finished(gated) and not run_finished(plain)
    for spec in (gated, plain):
        spec.out_dir().mkdir()
        (spec.out_dir() / "metrics.json").write_text(json.dumps({"best_epoch": 3}))
    assert run_finished(plain) and not run_finished(gated)
    (gated.out_dir() / "metrics.json").write_text(json.dumps({"best_epoch": 3, "gate": {"best_epoch": 2}}))
    assert run_finished(gated)


def full_vocabulary_loss(plugin, data, idx):
    """``batch_loss`` of any plugin the plain way: its head over the whole vocabulary."""
    import torch.nn.functional as F

    from vllm_plugin.training.train import target_hidden, with_copy_score

    hidden, rows, targets = target_hidden(plugin, data, idx)
    logits = with_copy_score(plugin, data, idx, hidden, plugin.head(hidden))
    if data.base is not None:
        base = data.base.log_probs(rows)
        logits = plugin.add_candidate_score(hidden, logits, base)
        gate = plugin.strength(hidden, base, logits)
        logits = base + (logits if gate is None else gate[:, None] * logits)
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("kind,copy_scores,gate,pending,example,candidates",
                         [(kind, copy_scores, False, False, False, 0) for kind in ("full", "topk", "alone")
                          for copy_scores in (False, True)]
                         + [("full", True, True, False, False, 0), ("topk", True, True, False, False, 0)]  # a gate weighs the plugin against a base
                         + [("full", True, True, True, False, 0), ("alone", True, False, True, False, 0)]  # pending-copy scores
                         + [("full", True, True, True, True, 0), ("alone", True, False, False, True, 0)]  # example scores
                         + [("full", True, True, False, False, 4), ("topk", True, True, False, False, 5),
                            ("full", False, False, False, False, 20)]  # candidate scores on the base's top tokens
                         + [("topk_lift", True, True, False, False, 0)]  # copied tokens lifted out of the flat tail
                         + [("topk_prior", True, True, False, False, 0)])  # the tail shared by a prior
def test_shortlist_loss_is_the_exact_loss_at_the_cost_of_the_shortlist(tiny, e2e_file, kind, copy_scores, gate,
                                                                       pending, example, candidates):
    """A shortlisted plugin (every token off its shortlist shares one logit) has the same loss
    and gradient as its head spread over the whole vocabulary, against a full base, a top-k
    view and no base, with and without a gate (which reads both experts' entropies over the
    vocabulary), pending-copy scores, example scores (prompts after an in-context example) and
    candidate scores (on the base's top tokens, off the shortlist too); its head gives every
    off-list token the rest row's logit."""
    from vllm_plugin.testing import tiny_plugin
    from vllm_plugin.training.data import PROMPT_TEMPLATES
    from vllm_plugin.training.train import batch_loss

    ts = tokenize_examples(load_e2e(e2e_file)[:12], tiny.tokenizer)
    marker = []
    if example:  # each prompt after an example, as --shots makes them
        shot = ts.prompts[-1] + ts.targets[-1]
        ts.prompts = [shot + p for p in ts.prompts]
        marker = tiny.tokenizer(PROMPT_TEMPLATES["e2e"].split("{input}")[0].strip(), add_special_tokens=False).input_ids
    bl = None if kind == "alone" else extract_full(tiny.base, ts, progress=False)
    if kind.startswith("topk"):
        bl = bl_mod.topk_view(bl, ts, 5, progress=False)
    if kind == "topk_lift":
        bl = bl.with_lift(ts, marker, -1.0)
    if kind == "topk_prior":
        bl = bl.with_tail_prior(bl_mod.unigram_log_prior(ts, tiny.vocab_size, 0.001))
    data = PairSet(ts, bl)
    plugin = tiny_plugin(tiny.vocab_size, copy=copy_scores, gate=gate, copy_pending=pending, copy_after=marker,
                         copy_example=example, base_candidates=candidates, shortlist_size=tiny.vocab_size // 3)
    if example:
        lifted = data.in_example([0], tiny.vocab_size, after=marker)
        assert lifted.any() and not (lifted & data.in_prompt([0], tiny.vocab_size, after=marker)).any()
    off = plugin.index_of == plugin.config.shortlist_size
    assert off.sum() == tiny.vocab_size - tiny.vocab_size // 3
    logits = plugin.head(torch.randn(2, 32))
    assert torch.equal(logits[:, off], logits[:, off][:, :1].expand(2, int(off.sum())))
    idx = [0, 3, 5, 7, 11]
    fast, n = batch_loss(plugin, data, idx)
    assert n == sum(len(ts.targets[e]) for e in idx)
    fast.backward()
    fast_grad = {k: p.grad.clone() for k, p in plugin.named_parameters()}
    plugin.zero_grad()
    slow = full_vocabulary_loss(plugin, data, idx)
    slow.backward()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
    for k, p in plugin.named_parameters():
        torch.testing.assert_close(fast_grad[k], p.grad, atol=1e-5, rtol=1e-4, msg=k)


def test_a_run_with_the_nearest_shot_puts_each_inputs_own_example_first(tiny, e2e_file, tmp_path):
    """``RunSpec(shots=1, nearest_shot=True)``: each prompt follows the fit example whose input is
    most like its own (``data.NearestShot``), never its own input's; the checkpoint's template
    is the task's alone (the example varies per input) and says how it was trained."""
    from vllm_plugin.training.data import PROMPT_TEMPLATES, NearestShot, input_features

    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"), shots=1,
                   nearest_shot=True, shortlist_min_count=1, train=TrainConfig(epochs=1, batch_size=8, lr=1e-2))
    run(spec, progress=False, log=lambda *_: None)
    config = load_plugin(tmp_path / "run" / "checkpoint").config
    assert config.prompt_template == PROMPT_TEMPLATES["e2e"] and config.training["nearest_shot"] is True
    fit, select = split_by_input(load_e2e(e2e_file), 0.6, seed=0)
    nearest = NearestShot(fit)
    for e in fit[:5] + select[:5]:
        shot = nearest(e)
        assert shot.group != e.group
        overlap = lambda x: len(input_features(e) & input_features(x)) / len(input_features(e) | input_features(x))
        assert overlap(shot) == max(overlap(x) for x in fit if x.group != e.group)
    apart = NearestShot(fit, apart="venue")
    for e in fit[:5]:
        assert dict(apart(e).meta)["venue"] != dict(e.meta)["venue"]
    spec.shots = 2
    with pytest.raises(ValueError, match="--nearest-shot chooses one in-context example per input: it needs --shots 1"):
        run(spec, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--nearest-apart is for --nearest-shot"):
        run(RunSpec(data=str(e2e_file), base=str(tiny.base_dir), out=str(tmp_path / "x"), nearest_apart="venue"),
            progress=False, log=lambda *_: None)


def test_a_run_with_shots_trains_against_the_prompted_base(tiny, e2e_file, tmp_path):
    """``RunSpec(shots=k)``: fit and select prompts follow the fit split's first k drawn
    examples (those the quality benchmark's icl_k systems prompt with), the checkpoint's
    prompt template says so, and a resumed run must keep the same number. ``shot_seed`` draws
    them with another seed (the split stays), and a resumed run must keep it too."""
    from vllm_plugin.training.data import PROMPT_TEMPLATES, in_context_shots, with_shots

    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"), shots=1,
                   shortlist_min_count=1, train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=2))
    metrics = run(spec, progress=False, log=lambda *_: None)
    fit, _ = split_by_input(load_e2e(e2e_file), 0.6, seed=0)
    shot = in_context_shots(fit, 1)[0]
    assert in_context_shots(fit, 3)[0] == shot  # one shot is the first of three
    template = load_plugin(tmp_path / "run" / "checkpoint").config.prompt_template
    assert template == with_shots(PROMPT_TEMPLATES["e2e"], [shot]) and template.startswith(shot.prompt + shot.target)
    plain = run(RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "plain"),
                        shortlist_min_count=1, train=TrainConfig(epochs=1)), progress=False, log=lambda *_: None)
    assert metrics["base_select_loss"] != pytest.approx(plain["base_select_loss"])  # another prompt, another base
    spec.shots = 2
    with pytest.raises(ValueError, match=r"shots: 1 then, 2 now"):
        run(spec, progress=False, log=lambda *_: None)
    spec.shots = 4
    with pytest.raises(ValueError, match=r"--shots is a number of in-context examples, 0 to 3; got 4"):
        run(spec, progress=False, log=lambda *_: None)
    spec.shots, spec.shot_seed = 1, 3
    with pytest.raises(ValueError, match=r"shot_seed: None then, 3 now"):
        run(spec, progress=False, log=lambda *_: None)
    spec.out = str(tmp_path / "seed3")
    run(spec, progress=False, log=lambda *_: None)
    other = in_context_shots(fit, 1, seed=3)[0]
    assert other != shot
    config = load_plugin(tmp_path / "seed3" / "checkpoint").config
    assert config.prompt_template == with_shots(PROMPT_TEMPLATES["e2e"], [other]) and config.training["shot_seed"] == 3
    for bad in ({"shots": 0}, {"nearest_shot": True}):
        with pytest.raises(ValueError, match="--shot-seed chooses the drawn in-context examples: it needs --shots"):
            run(replace(spec, **bad), progress=False, log=lambda *_: None)


def test_copy_task_only_reads_the_task_not_the_examples(tiny, e2e_file, tmp_path):
    """``RunSpec(copy_task_only=True)``: the checkpoint's ``copy_after`` is the template's text
    before {input}, tokenised; training's copy mask holds the tokens of each prompt from its last
    occurrence on (the task, not the in-context example), as the reference decoder's does; it
    needs copy scores and a template with text before {input}. With ``read_task_only`` the plugin
    reads each prompt from there too (its config says so; training's view of the prompts is
    the task's segment, the base's rows unchanged); it needs ``copy_task_only`` and the GRU."""
    from vllm_plugin.decode import copy_mask
    from vllm_plugin.model import copy_start, read_start
    from vllm_plugin.training.data import PROMPT_TEMPLATES

    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"), shots=1,
                   copy=True, copy_task_only=True, read_task_only=True, shortlist_min_count=1,
                   train=TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup_steps=2))
    read_metrics = run(spec, progress=False, log=lambda *_: None)
    plugin = load_plugin(tmp_path / "run" / "checkpoint")
    assert plugin.config.read_task_only
    whole = run(replace(spec, read_task_only=False, out=str(tmp_path / "whole")), progress=False, log=lambda *_: None)
    assert read_metrics["best_select_loss"] != pytest.approx(whole["best_select_loss"], rel=1e-6)  # it read less
    prefix = PROMPT_TEMPLATES["e2e"].split("{input}")[0].strip()
    assert plugin.config.copy_after == tiny.tokenizer(prefix, add_special_tokens=False).input_ids
    ts = tokenize_examples(load_e2e(e2e_file)[:4], tiny.tokenizer)
    shot = ts.prompts[1] + ts.targets[1]
    ts.prompts = [shot + p for p in ts.prompts]  # each prompt after an example, as --shots makes them
    data = PairSet(ts, None)
    whole = data.in_prompt([0], tiny.vocab_size)[0]
    task = data.in_prompt([0], tiny.vocab_size, after=plugin.config.copy_after)[0]
    assert torch.equal(task, copy_mask(ts.prompts[0], plugin)[0])
    assert torch.equal(task, copy_mask(ts.prompts[0][len(shot):], plugin)[0])  # the task's tokens only
    assert (whole & ~task).any() and not (task & ~whole).any()
    read = ts.read_from(lambda p: read_start(plugin.config, p))
    assert read.prompts[0] == ts.prompts[0][copy_start(ts.prompts[0], plugin.config.copy_after):]
    assert read.targets == ts.targets and read.prompts[0][:len(plugin.config.copy_after)] == plugin.config.copy_after
    with pytest.raises(ValueError, match="--read-task-only reads the prompt from --copy-task-only's marker on"):
        run(RunSpec(data=str(e2e_file), base=str(tiny.base_dir), out=str(tmp_path / "r"), copy=True, shots=1,
                    read_task_only=True), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--copy-example scores the examples before --copy-task-only's marker"):
        run(RunSpec(data=str(e2e_file), base=str(tiny.base_dir), out=str(tmp_path / "e"), copy=True, shots=1,
                    copy_example=True), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--read-task-only is for the gru plugin"):
        run(RunSpec(data=str(e2e_file), base=str(tiny.base_dir), out=str(tmp_path / "t"), copy=True, shots=1,
                    copy_task_only=True, read_task_only=True, arch="transformer"), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="--copy-task-only restricts copy scores: it needs --copy"):
        run(RunSpec(data=str(e2e_file), base=str(tiny.base_dir), out=str(tmp_path / "x"), copy_task_only=True),
            progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="needs a prompt template with text before"):
        run(RunSpec(dataset="jsonl", data=str(e2e_file), base=str(tiny.base_dir), out=str(tmp_path / "y"), copy=True,
                    copy_task_only=True), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="needs --shots"):
        run(RunSpec(data=str(e2e_file), base=str(tiny.base_dir), out=str(tmp_path / "z"), copy=True,
                    copy_task_only=True), progress=False, log=lambda *_: None)
    from vllm_plugin.training.pipeline import task_marker
    with pytest.raises(ValueError, match=r"2 time\(s\)"):  # an example's marker missing: the last would not be the task's
        task_marker(tiny.tokenizer, "e2e", [ts.prompts[0][len(shot):]], segments=2)
    assert task_marker(tiny.tokenizer, "e2e", [ts.prompts[0]], segments=2) == plugin.config.copy_after


def test_task_marker_keeps_only_the_tokens_the_input_cannot_change():
    """A BPE that merges the template's last character with what follows (Qwen2.5 writes
    "Attributes:" then a newline as "Attributes", ":\\n") still gets a marker that occurs in every
    prompt: the template's tokens up to the first one the input can change."""
    from types import SimpleNamespace

    from vllm_plugin.training.data import Example, format_prompt, template_prefix, with_shots
    from vllm_plugin.training.pipeline import task_marker

    def merging(text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[0 if piece == ":\n" else ord(piece)
                                          for piece in re.findall(r":\n|.", text, flags=re.S)])

    prompt = format_prompt("e2e", "name[Aromi], food[Thai]")
    marker = task_marker(merging, "e2e", [merging(with_shots(prompt, [Example("g", prompt, "Aromi is Thai.")])).input_ids],
                         segments=2)
    assert marker == [ord(c) for c in template_prefix("e2e").removesuffix(":")]
    whole = lambda text, add_special_tokens=False: SimpleNamespace(input_ids=[len(text)])  # noqa: E731
    with pytest.raises(ValueError, match="merges all of the template's text before"):
        task_marker(whole, "e2e", [[1, 2, 3]], segments=1)


def test_shortlisted_run_trains_on_the_fit_splits_tokens(tiny, e2e_file, tmp_path):
    """``RunSpec(shortlist_min_count=...)``: the plugin's shortlist is the tokens that occur that
    often in the fit split's prompts and targets; it learns (select loss below the base's), its
    checkpoint round-trips, and a resumed run must keep the same setting."""
    from vllm_plugin.training.train import task_shortlist

    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "run"), copy=True,
                   shortlist_min_count=2, train=TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_steps=2))
    metrics = run(spec, progress=False, log=lambda *_: None)
    assert metrics["best_select_loss"] < metrics["base_select_loss"] - 0.2
    plugin = load_plugin(tmp_path / "run" / "checkpoint")
    fit, _ = split_by_input(load_e2e(e2e_file), 0.6, seed=0)
    want = task_shortlist(tokenize_examples(fit, tiny.tokenizer), 2)
    assert plugin.shortlist().tolist() == want and 0 < len(want) < tiny.vocab_size
    spec.shortlist_min_count = 1
    with pytest.raises(ValueError, match=r"shortlist_min_count: 2 then, 1 now"):
        run(spec, progress=False, log=lambda *_: None)
    spec.train.negatives = 16
    with pytest.raises(ValueError, match=r"--negatives samples the vocabulary a shortlisted plugin does not score"):
        run(spec, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("shortlisted", [False, True])
def test_scheduled_sampling_feeds_the_plugin_its_own_greedy_choices(tiny, e2e_file, shortlisted):
    """``own_inputs``: the token greedy decoding picks at each target position under teacher
    forcing (the argmax of the combined scores over the vocabulary, also for a shortlisted
    plugin here), at a seeded share of the positions and never at an example's last; fed back
    (``target_hidden(feed=...)``), the plugin's states change from the first replaced position
    on and match the plain forward of the altered sequence, in both batch layouts."""
    from vllm_plugin.testing import tiny_plugin
    from vllm_plugin.training.train import batch_loss, own_inputs, target_hidden

    ts = tokenize_examples(load_e2e(e2e_file)[:12], tiny.tokenizer)
    data = PairSet(ts, extract_full(tiny.base, ts, progress=False))
    plugin = tiny_plugin(tiny.vocab_size, copy=True, gate=True, shortlist_size=tiny.vocab_size // 3 if shortlisted else 0)
    idx = [0, 3, 5, 7]
    hidden, rows, targets = target_hidden(plugin, data, idx)
    with torch.no_grad():
        logits = with_copy_score_full(plugin, data, idx, hidden)
    assert torch.equal(batch_loss(plugin, data, idx, choose=True), logits.argmax(-1))
    feed = own_inputs(plugin, data, idx, 0.5, seed=3)
    assert torch.equal(feed, own_inputs(plugin, data, idx, 0.5, seed=3))
    lengths = [len(ts.targets[e]) for e in idx]
    last = torch.tensor(lengths).cumsum(0) - 1
    assert (feed[last] == -1).all() and 0 < int((feed >= 0).sum()) < len(feed)
    assert torch.equal(feed[feed >= 0], logits.argmax(-1)[feed >= 0])
    for share_prompts in (False, True):
        fed, _, _ = target_hidden(plugin, data, idx, share_prompts, feed)
        start = 0
        for e, n in zip(idx, lengths):  # the plain forward of prompt + altered target
            own = torch.tensor(ts.targets[e])
            own = torch.where(feed[start:start + n] >= 0, feed[start:start + n], own)
            seq = torch.tensor(ts.prompts[ts.example_prompt[e]] + own[:-1].tolist())
            p = len(ts.prompts[ts.example_prompt[e]])
            with torch.no_grad():
                want = plugin(seq[None])[0, p - 1:p - 1 + n]
            torch.testing.assert_close(fed[start:start + n], want, atol=1e-5, rtol=1e-4)
            first = int((feed[start:start + n] >= 0).int().argmax()) if (feed[start:start + n] >= 0).any() else n
            torch.testing.assert_close(fed[start:start + first + 1], hidden[start:start + first + 1])
            start += n


def with_copy_score_full(plugin, data, idx, hidden):
    """The combined scores over the whole vocabulary at each target token (what ``full_vocabulary_loss`` takes the CE of)."""
    from vllm_plugin.training.train import target_hidden, with_copy_score

    _, rows, _ = target_hidden(plugin, data, idx)
    logits = with_copy_score(plugin, data, idx, hidden, plugin.head(hidden))
    base = data.base.log_probs(rows)
    gate = plugin.strength(hidden, base, logits)
    return base + (logits if gate is None else gate[:, None] * logits)


def test_a_run_with_scheduled_sampling_learns(tiny, e2e_file, tmp_path):
    """``TrainConfig.scheduled_sampling``: a run whose plugin reads its own greedy choices at that
    share of the target positions still learns (select loss below the base's) and differs from
    the same run with teacher forcing only; bad shares and combinations are refused."""
    spec = RunSpec(data=str(e2e_file), base=str(tiny.base_dir), d_model=32, out=str(tmp_path / "ss"), copy=True,
                   shortlist_min_count=1, train=TrainConfig(epochs=2, batch_size=8, lr=1e-2, warmup_steps=2,
                                                            scheduled_sampling=0.5))
    sampled = run(spec, progress=False, log=lambda *_: None)
    assert sampled["best_select_loss"] < sampled["base_select_loss"] - 0.2
    forced = run(replace(spec, out=str(tmp_path / "tf"), train=replace(spec.train, scheduled_sampling=0.0)),
                 progress=False, log=lambda *_: None)
    assert sampled["best_select_loss"] != pytest.approx(forced["best_select_loss"], abs=1e-6)
    assert load_plugin(tmp_path / "ss" / "checkpoint").config.training["scheduled_sampling"] == 0.5
    with pytest.raises(ValueError, match=r"another base, plugin or training \(scheduled_sampling: 0.5 then, 0.0 now\)"):
        run(replace(spec, train=replace(spec.train, scheduled_sampling=0.0)), progress=False, log=lambda *_: None)
    for train, message in [(replace(spec.train, scheduled_sampling=1.0), "in \\[0, 1\\)"),
                           (replace(spec.train, negatives=16), "drop --negatives 16 \\(or --scheduled-sampling\\)")]:
        with pytest.raises(ValueError, match=message):
            run(replace(spec, out=str(tmp_path / "bad"), train=train), progress=False, log=lambda *_: None)


@pytest.mark.parametrize("shortlist", [False, True])
def test_input_bag_in_training_is_the_bag_decoding_sets(tiny, e2e_file, shortlist):
    """An input bag (``PluginConfig.input_bag``): the trainer's hidden states before each target
    token, prompts read once per batch or not, equal those of the decode state after
    ``set_bag`` with the prompt's task tokens (what the reference decoder and the processor do);
    the bag is the mean of the task's distinct rows (off-shortlist tokens share the rest row,
    counted once); it trains from zero, and bad configurations are refused."""
    from vllm_plugin.decode import copy_mask
    from vllm_plugin.model import PluginConfig, build_plugin
    from vllm_plugin.testing import tiny_plugin
    from vllm_plugin.training.data import PROMPT_TEMPLATES
    from vllm_plugin.training.train import batch_loss, target_hidden

    ts = tokenize_examples(load_e2e(e2e_file)[:8], tiny.tokenizer)
    shot = ts.prompts[-1] + ts.targets[-1]
    ts.prompts = [shot + p for p in ts.prompts]  # after an example, as --shots makes them
    marker = tiny.tokenizer(PROMPT_TEMPLATES["e2e"].split("{input}")[0].strip(), add_special_tokens=False).input_ids
    plugin = tiny_plugin(tiny.vocab_size, copy=True, copy_after=marker, input_bag=True,
                         shortlist_size=tiny.vocab_size // 3 if shortlist else 0)
    data, idx = PairSet(ts, None), [0, 2, 5]
    with torch.no_grad():
        for share in (False, True):
            hidden = target_hidden(plugin, data, idx, share_prompts=share)[0]
            r = 0
            for e in idx:
                prompt, target = ts.prompts[ts.example_prompt[e]], ts.targets[e]
                state, slot = plugin.new_state(2), torch.tensor([1])
                plugin.set_bag(state, slot, copy_mask(prompt, plugin))
                plugin.advance(state, slot, torch.tensor([prompt]), None, [0])
                for t in range(len(target)):
                    torch.testing.assert_close(hidden[r], state["out"][1], atol=1e-5, rtol=1e-5)
                    plugin.advance(state, slot, torch.tensor([[target[t]]]), None, [len(prompt) + t])
                    r += 1
            assert r == len(hidden)
        task = copy_mask(ts.prompts[0], plugin)
        rows = task[0].nonzero()[:, 0] if not shortlist else torch.unique(plugin.index_of[task[0]])
        assert shortlist == bool((rows == plugin.config.shortlist_size).any())  # off-list tokens: one rest row
        torch.testing.assert_close(plugin.bag_of(task)[0], plugin.bag.weight[rows].mean(0))
        assert not plugin.bag_of(torch.zeros_like(task)).any()
    torch.manual_seed(0)
    fresh = build_plugin(PluginConfig(vocab_size=tiny.vocab_size, d_model=32, copy=True, copy_after=marker,
                                      input_bag=True))
    assert not fresh.bag.weight.any()  # starts as the plugin without it
    batch_loss(fresh, data, idx)[0].backward()
    assert fresh.bag.weight.grad.abs().sum() > 0
    for bad in ({"copy_after": []}, {"architecture": "transformer"}):
        with pytest.raises(ValueError, match="input_bag averages the task's tokens from the copy_after marker on"):
            PluginConfig(**{"vocab_size": tiny.vocab_size, "copy": True, "copy_after": marker, "input_bag": True,
                            **bad})
    with pytest.raises(ValueError, match="--input-bag averages the task's tokens .* it needs --copy-task-only"):
        run(RunSpec(data=str(e2e_file), base=str(tiny.base_dir), out="unused", copy=True, input_bag=True),
            progress=False, log=lambda *_: None)
