"""Paths a CPU engine cannot take, driven through vLLM's own interfaces as its runners drive them.

- Model Runner V2 (the GPU default) needs Triton, so it cannot start here. Its processor is
  driven the way ``vllm/v1/worker/gpu/sample/sampler.py`` drives it: ``add_request`` per slot,
  then ``apply(logits, LogitsContext)`` with rows reordered every step, prompts prefilled in
  chunks, slots recycled, tokens read from the runner's ``all_token_ids``.
- V1 under async scheduling (off on CPU): the newest output token is a ``-1`` placeholder
  until just before ``apply``, or, for an entry-point-only processor, during ``apply`` too.

The vLLM config and the runner's buffers are stand-ins holding only the fields the processor
reads; the interface classes, BatchUpdate and LogitsContext are vLLM's own.
"""
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1Interface
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcRequestState
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Interface

from vllm_plugin.decode import reference_generate
from vllm_plugin.processor import (PluginLogitsProcessor, PluginProcessorV1, PluginProcessorV2,
                                   configured_plugins, penalty_args, request_plugin)

MAX_LEN = 128
SLOTS = 12


@pytest.fixture
def plugins_env(tiny, monkeypatch):
    monkeypatch.setenv("PLUGIN_LM_TABLE", tiny.env_value())


class Config(SimpleNamespace):
    """Stands in for VllmConfig (which, unlike SimpleNamespace, can be weakly referenced)."""


def vllm_config(tiny):
    return Config(
        scheduler_config=SimpleNamespace(max_num_seqs=SLOTS),
        model_config=SimpleNamespace(get_vocab_size=lambda: tiny.vocab_size, tokenizer=str(tiny.base_dir),
                                     trust_remote_code=False, tokenizer_revision=None),
    )


def base_logits(tiny, seqs):
    with torch.no_grad():
        return torch.stack([tiny.base(torch.tensor([s])).logits[0, -1] for s in seqs])


def params(plugin=None, weight=None, penalties=None):
    args = {"plugin": plugin} if plugin else {}
    if weight is not None:
        args["plugin_weight"] = weight
    if plugin and penalties:
        expert = {k: v for k, v in penalties.items() if k == "expert_repetition_penalty"}
        args.update(penalty_args(**{k: v for k, v in penalties.items() if k not in expert}))
        args.update({f"plugin_{k}": v for k, v in expert.items()})
    return SamplingParams(max_tokens=8, extra_args=args or None)


# Every penalty at once, on the plugin rows (the processor applies them; vLLM's own, on the rows
# without a plugin, are its sampler's business, not driven here).
PENALTIES = {"repetition_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": 0.3}
# The paper's penalty on each expert before the product, with vLLM's repetition penalty after it.
EXPERT_PENALTY = {"expert_repetition_penalty": 1.6, "repetition_penalty": 1.2}


REQUESTS = [  # (prompt, plugin, weight, new tokens, arrival step)
    ("Aromi is a coffee shop in the", "a", None, 7, 0),
    ("the pub", None, None, 5, 0),
    ("name -- Zizzi\narea -- riverside\nfood -- Italian\n\nSentence:\n", "t", 1.5, 6, 0),
    ("Cotto serves", "b", None, 8, 2),
    ("Strada", "a", 0.5, 4, 3),
    ("Loch Fyne is near", "t", None, 6, 6),  # arrives after others leave: reuses a slot
    # m: copy scores from the last "Sentence:" on, found once the (chunked) prompt is whole
    ("name -- Zizzi\n\nSentence:\nZizzi is a pub.\n\nname -- Cotto\narea -- riverside\n\nSentence:\n",
     "m", None, 6, 1),
    # p: m's copy scores with pending ones, a shortlist and a gate (the shortlisted product path)
    ("name -- Zizzi\n\nSentence:\nZizzi is a pub.\n\nname -- Aromi\nfood -- Thai\n\nSentence:\n", "p", None, 6, 2),
    ("Aromi is a Thai", "p", 0.7, 5, 4),
    # e: copy and example scores after the last "Sentence:", a shortlist and a gate
    ("name -- Zizzi\n\nSentence:\nZizzi is a pub.\n\nname -- Strada\nfood -- Thai\n\nSentence:\n", "e", None, 6, 1),
    # r: reads from the last "Sentence:" on, once the (chunked) prompt is whole; arrives late: a recycled slot
    ("name -- Zizzi\n\nSentence:\nZizzi is a pub.\n\nname -- Loch Fyne\narea -- riverside\n\nSentence:\n", "r", None, 5, 6),
    # q: candidate scores on the base's top tokens (the vocabulary-wide path for a shortlisted plugin)
    ("Aromi is a coffee shop near", "q", None, 6, 3),
]


def expected_outputs(tiny, penalties=None):
    return [reference_generate(tiny.base, [tiny.encode(p)], tiny.plugins.get(plugin),
                               weight=1.0 if w is None else w, max_new_tokens=n,
                               **(penalties if plugin and penalties else {}))[0]
            for p, plugin, w, n, _ in REQUESTS]


def test_one_class_serves_both_runners(tiny, plugins_env):
    assert issubclass(PluginLogitsProcessor, V1Interface) and issubclass(PluginLogitsProcessor, V2Interface)
    v1 = PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)
    assert isinstance(v1, PluginProcessorV1) and not v1.is_argmax_invariant()
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=SLOTS)
    v2 = PluginLogitsProcessor(vllm_config(tiny), req_states)
    assert isinstance(v2, PluginProcessorV2)


def test_inert_without_configured_plugins(tiny, monkeypatch):
    monkeypatch.delenv("PLUGIN_LM_TABLE", raising=False)
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")  # vLLM's own: not ours to read
    v1 = PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)
    assert v1.bank is None and v1.is_argmax_invariant()
    logits = torch.randn(2, tiny.vocab_size)
    v1.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params("a"), [1, 2], [])], moved=[]))
    assert v1.apply(logits) is logits
    v2 = PluginLogitsProcessor(vllm_config(tiny), SimpleNamespace(device=torch.device("cpu"), max_num_reqs=4))
    assert v2.add_request(0, params("a")) is False


def test_registered_twice_applies_once(tiny, plugins_env):
    config = vllm_config(tiny)
    first = PluginLogitsProcessor(config, torch.device("cpu"), False)
    second = PluginLogitsProcessor(config, torch.device("cpu"), False)
    assert first.bank is not None and second.bank is None
    other_engine = PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)
    assert other_engine.bank is not None


def test_configuration_parsing(monkeypatch, tmp_path):
    assert configured_plugins({"PLUGIN_LM_TABLE": "e2e=/x/y, web=/z"}) == {"e2e": "/x/y", "web": "/z"}
    assert configured_plugins({"PLUGIN_LM_TABLE": '{"e2e": "/x"}'}) == {"e2e": "/x"}
    for bad, msg in [("{oops", r"not valid JSON.*: give \{\"name\": \"/checkpoint/folder\", \.\.\.\} or"),
                     ("e2e", "not name=path"), ('{"a/b": "/x"}', "plugin name"), ('{"a": 3}', "must map plugin names")]:
        with pytest.raises(ValueError, match=msg):
            configured_plugins({"PLUGIN_LM_TABLE": bad})
    assert request_plugin(params(), {})[:4] == (None, 0.0, 0, None)
    assert request_plugin(params("a", 2), {"a": "/x"}) == ("a", 2.0, 0, None, (1.0, 0.0, 0.0), 1.0, 0)
    mixture = SamplingParams(extra_args={"plugin": "a", "plugin_weight": 0.3, "plugin_mode": "mixture"})
    assert request_plugin(mixture, {"a": "/x"})[:4] == ("a", 0.3, 1, None)
    top = SamplingParams(extra_args={"plugin": "a", "plugin_base_top_k": 20})
    assert request_plugin(top, {"a": "/x"}).top_k == 20
    for bad in ({"plugin": "a", "plugin_mode": "sum"}, {"plugin": "a", "plugin_mode": "mixture", "plugin_weight": 2},
                {"plugin_mode": "alone"}, {"plugin": "a", "plugin_base_top_k": -1},
                {"plugin": "a", "plugin_base_top_k": 2.5}, {"plugin": "a", "plugin_base_top_k": True},
                {"plugin_base_top_k": 20}):
        with pytest.raises(ValueError):
            request_plugin(SamplingParams(extra_args=bad), {"a": "/x"})


def test_engine_start_refuses_bad_checkpoint(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("PLUGIN_LM_TABLE", f'{{"broken": "{tmp_path}"}}')
    with pytest.raises(ValueError, match="plugin 'broken' \\(from \\$PLUGIN_LM_TABLE, .*no config.json"):
        PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)


def test_engine_start_refuses_non_finite_checkpoint(tiny, monkeypatch, tmp_path):
    """The processor's load at engine start (load_bank) refuses a checkpoint with one NaN."""
    from safetensors.torch import load_file, save_file

    from vllm_plugin.checkpoint import save_plugin

    folder = save_plugin(tiny.plugins["a"], tmp_path / "nan")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["embed.weight"][5, 3] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "vllm_plugin/1"})
    monkeypatch.setenv("PLUGIN_LM_TABLE", f'{{"nan": "{folder}"}}')
    with pytest.raises(ValueError, match="plugin 'nan' \\(from \\$PLUGIN_LM_TABLE.*non-finite values .*'embed.weight' \\(1 of"):
        PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)


def test_top_k_is_bounded_by_the_vocabulary_at_admission(tiny, plugins_env):
    """validate_params (vLLM's frontend) knows no engine config: the bound comes from the
    configured checkpoints' config.json."""
    from vllm_plugin.processor import validate_request

    V = tiny.vocab_size
    for k in (0, 1, V):
        validate_request(SamplingParams(extra_args={"plugin": "k", "plugin_base_top_k": k}))
    for k in (V + 1, 500):
        with pytest.raises(ValueError, match=rf"'plugin_base_top_k' must be an integer in \[0, {V}\].*"
                                              rf"score {V} tokens.*got {k}"):
            validate_request(SamplingParams(extra_args={"plugin": "k", "plugin_base_top_k": k}))
    assert request_plugin(SamplingParams(extra_args={"plugin": "a", "plugin_base_top_k": 9}), {"a": "/x"},
                          vocab_size=lambda name: 10).top_k == 9
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        request_plugin(SamplingParams(extra_args={"plugin": "a", "plugin_base_top_k": 9}), {"a": "/x"},
                       vocab_size=lambda name: 8)
    for k, ok in ((0, True), (3, False), (4, True)):  # a plugin with candidate scores on the base's top 4
        args = SamplingParams(extra_args={"plugin": "a", "plugin_base_top_k": k})
        if ok:
            assert request_plugin(args, {"a": "/x"}, candidates=lambda name: 4).top_k == k
        else:
            with pytest.raises(ValueError, match="scores the base's top 4 tokens .*needs 0 .* or at least 4"):
                request_plugin(args, {"a": "/x"}, candidates=lambda name: 4)
    for bad in ({"plugin": "a", "plugin_mode": ["product"]}, {"plugin": "a", "plugin_weight": [1.0]},
                {"plugin": "a", "plugin_weight": False}, {"plugin": ["a"]}):
        with pytest.raises(ValueError):
            validate_request(SamplingParams(extra_args=bad))


def test_apply_clamps_a_top_k_past_the_vocabulary(tiny, plugins_env):
    """Second line behind admission: a top-k past the vocabulary (a request that bypassed
    validate_params) is served as the whole vocabulary, never raised inside the engine step."""
    proc = PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)
    ids = tiny.encode("Aromi is a")
    logits = base_logits(tiny, [ids, ids])
    proc.bank.assign(0, "a", 1.0, 0, 500)  # what admission refuses, assigned directly
    proc.bank.assign(1, "a", 1.0, 0, tiny.vocab_size)
    proc.row_slot[:2] = [0, 1]
    proc.row_tokens[0], proc.row_tokens[1] = (ids, []), (ids, [])
    proc.active_rows = np.array([0, 1])
    out = proc.apply(logits.clone())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], out[1])


def test_wrong_vocabulary_refused_at_start(tiny, plugins_env):
    config = vllm_config(tiny)
    config.model_config.get_vocab_size = lambda: tiny.vocab_size + 1
    with pytest.raises(ValueError, match="plugin 'a'.*vocabulary"):
        PluginLogitsProcessor(config, torch.device("cpu"), False)


# ----- Model Runner V2 ---------------------------------------------------------------------------
@pytest.mark.parametrize("penalties", [None, PENALTIES, EXPERT_PENALTY])
@pytest.mark.parametrize("chunk", [None, 4])
def test_mrv2_driven_like_the_runner(tiny, plugins_env, chunk, penalties):
    rng = random.Random(0)
    all_token_ids = torch.zeros(SLOTS, MAX_LEN, dtype=torch.int32)
    prompt_len = SimpleNamespace(np=np.zeros(SLOTS, dtype=np.int32))
    req_states = LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=SLOTS, vocab_size=tiny.vocab_size,
        all_token_ids=SimpleNamespace(gpu=all_token_ids), prompt_len=prompt_len, prefill_len=None, total_len=None)
    proc = PluginLogitsProcessor(vllm_config(tiny), req_states)
    free = list(range(SLOTS))
    rng.shuffle(free)
    live = {}  # slot -> request record
    outputs = [None] * len(REQUESTS)
    step = 0
    while step < 40 and (live or any(o is None for o in outputs)):
        for i, (text, plugin, weight, n, arrival) in enumerate(REQUESTS):
            if arrival == step:
                slot = free.pop()
                prompt = tiny.encode(text)
                all_token_ids[slot, :len(prompt)] = torch.tensor(prompt)
                all_token_ids[slot, len(prompt):] = -7  # stale data of a previous occupant
                prompt_len.np[slot] = len(prompt)  # the runner's req_states.add_request comes first
                assert proc.add_request(slot, params(plugin, weight, penalties)) == (plugin is not None)
                live[slot] = {"i": i, "tokens": prompt, "prompt_len": len(prompt), "computed": 0, "out": [], "n": n}
        rows = list(live.items())
        rng.shuffle(rows)  # rows are reordered every step
        slots, positions, inputs, sampling = [], [], [], []
        for slot, r in rows:
            if r["computed"] < r["prompt_len"]:
                r["computed"] = r["prompt_len"] if chunk is None else min(r["prompt_len"], r["computed"] + chunk)
                pos = r["computed"] - 1
                sampling.append(r["computed"] == r["prompt_len"])
            else:
                pos = len(r["tokens"]) - 1
                sampling.append(True)
            slots.append(slot)
            positions.append(pos)
            inputs.append(r["tokens"][pos])
        logits = base_logits(tiny, [live[s]["tokens"][:p + 1] for s, p in zip(slots, positions)])
        before = logits.clone()
        slots_np = np.array(slots, dtype=np.int32)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.from_numpy(slots_np), idx_mapping=torch.from_numpy(slots_np),
            idx_mapping_np=slots_np, expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32),
            input_ids=torch.tensor(inputs, dtype=torch.int32), pos=torch.tensor(positions),
            seq_lens_upper_bound_np=np.array(positions) + 1)
        out = proc.apply(logits, ctx)
        for row, (slot, take) in enumerate(zip(slots, sampling)):
            r = live[slot]
            if REQUESTS[r["i"]][1] is None:
                assert torch.equal(out[row], before[row])  # rows without a plugin are untouched
            if not take:
                continue
            tok = int(out[row].argmax())
            r["tokens"].append(tok)
            r["out"].append(tok)
            all_token_ids[slot, len(r["tokens"]) - 1] = tok  # committed after the step
            if len(r["out"]) == r["n"]:
                outputs[r["i"]] = r["out"]
                del live[slot]
                free.append(slot)  # MRV2 recycles slots without telling processors
        step += 1
    assert outputs == expected_outputs(tiny, penalties)
    if penalties:  # not vacuous: the penalties change the plugin rows
        assert outputs != expected_outputs(tiny)


# ----- V1, async scheduling ----------------------------------------------------------------------
@pytest.mark.parametrize("penalties", [None, PENALTIES, EXPERT_PENALTY])
def test_v1_async_placeholders_and_moves(tiny, plugins_env, penalties):
    """A small V1 runner with async scheduling: removals, SWAP and UNIDIRECTIONAL moves, and the
    newest token a -1 placeholder until just before ``apply`` (processor passed explicitly)."""
    proc = PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)
    batch = []  # row -> request record: the persistent batch
    outputs = [None] * len(REQUESTS)
    pending = []  # (record, token sampled last step): the copy that has not landed yet
    step = 0
    while step < 60 and (batch or any(o is None for o in outputs)):
        removed, added, moved = [], [], []
        for row, rec in enumerate(batch):
            if len(rec["out"]) >= rec["n"]:
                late = {id(r): tok for r, tok in pending}
                outputs[rec["i"]] = [late[id(rec)] if t == -1 else t for t in rec["out"]]
                batch[row] = None
                removed.append(row)
        for i, (text, plugin, weight, n, arrival) in enumerate(REQUESTS):
            if arrival == step:
                rec = {"i": i, "prompt": tiny.encode(text), "out": [], "n": n, "plugin": plugin}
                row = batch.index(None) if None in batch else len(batch)
                batch[row:row + 1] = [rec]
                added.append((row, params(plugin, weight, penalties), rec["prompt"], rec["out"]))
        while None in batch:  # condense: the last row moves into the first hole
            hole = batch.index(None)
            last = len(batch) - 1
            if hole != last:
                moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
                batch[hole] = batch[last]
            batch.pop()
        if len(batch) >= 3 and step % 4 == 1:  # and swaps rows
            moved.append((0, 2, MoveDirectionality.SWAP))
            batch[0], batch[2] = batch[2], batch[0]
        if batch:
            proc.update_state(BatchUpdate(batch_size=len(batch), removed=removed, added=added, moved=moved))
        for rec, tok in pending:  # vLLM fills placeholders just before apply
            if rec["out"][-1] == -1:
                rec["out"][-1] = tok
        pending = []
        if not batch:
            step += 1
            continue
        logits = base_logits(tiny, [r["prompt"] + r["out"] for r in batch])
        before = logits.clone()
        out = proc.apply(logits)
        for row, rec in enumerate(batch):
            if rec["plugin"] is None:
                assert torch.equal(out[row], before[row])
            if len(rec["out"]) < rec["n"]:
                rec["out"].append(-1)  # async: a placeholder now, the token later
                pending.append((rec, int(out[row].argmax())))
        step += 1
    assert outputs == expected_outputs(tiny, penalties)


def test_v1_placeholder_during_apply_skips_row_then_catches_up(tiny, plugins_env):
    """Entry-point-only under async scheduling (vLLM #52461): ``-1`` is still there in apply."""
    proc = PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)
    plugin = tiny.plugins["a"]
    prompt, out_ids = tiny.encode("Aromi is a"), []
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params("a"), prompt, out_ids)], moved=[]))
    tok1 = int(proc.apply(base_logits(tiny, [prompt])).argmax())
    out_ids.append(-1)
    proc.update_state(None)
    logits = base_logits(tiny, [prompt + [tok1]])
    assert torch.equal(proc.apply(logits.clone()), logits)  # unknown token: row left alone
    out_ids[-1] = tok1
    out_ids.append(5)  # the next token lands together with the late one
    proc.update_state(None)
    seq = prompt + out_ids
    logits = base_logits(tiny, [seq])
    delta = proc.apply(logits.clone()) - logits
    with torch.no_grad():
        want = torch.log_softmax(plugin.head(plugin(torch.tensor([seq])))[0, -1], -1)
    torch.testing.assert_close(torch.log_softmax(delta[0], -1), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_plugin_log_probs_normalised_only_where_a_penalty_needs_them(tiny, plugins_env, penalty):
    """Without a repetition penalty the added scores may differ from the plugin's log-probs by a
    per-row constant (the sampler's softmax cancels it); with one they are the log-probs exactly,
    and the penalty (vLLM's formula) acts on the sum."""
    proc = PluginLogitsProcessor(vllm_config(tiny), torch.device("cpu"), False)
    prompts = [tiny.encode("Aromi is a"), tiny.encode("The Eagle")]
    args = {"plugin": "a", **penalty_args(penalty)}
    added = [(row, SamplingParams(extra_args=args), prompt, []) for row, prompt in enumerate(prompts)]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
    logits = base_logits(tiny, prompts)
    out = proc.apply(logits.clone())
    plugin = tiny.plugins["a"]
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            want = logits[row] + torch.log_softmax(plugin.head(plugin(torch.tensor([prompt])))[0, -1], -1)
        if penalty == 1.0:
            offset = (out[row] - want).mean()
            assert abs(offset) > 1e-3  # the normalising pass really was skipped
            want = want + offset
        else:
            seen = torch.zeros_like(want, dtype=torch.bool)
            seen[prompt] = True
            want = torch.where(seen, torch.where(want > 0, want / penalty, want * penalty), want)
        torch.testing.assert_close(out[row], want, atol=1e-4, rtol=1e-4)


def test_cpu_head_uses_vllms_onednn_gemm_and_matches_torch(tiny):
    """On CPU the processor's head (its vocabulary's rows, or a shortlist's and its rest row) runs
    through vLLM's prepacked oneDNN GEMM."""
    from vllm import _custom_ops as ops

    from vllm_plugin.bank import _fast_head_rows

    for plugin in (tiny.plugins["a"], tiny.plugins["t"], tiny.plugins["p"]):
        head = _fast_head_rows(plugin, torch.device("cpu"))
        assert (head == plugin.head_rows) == (not ops._supports_onednn)
        for batch in (1, 3, 40):
            hidden = torch.randn(batch, plugin.config.d_model)
            torch.testing.assert_close(head(hidden), plugin.head_rows(hidden), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [[0, 1, 2], [2, 0, 1]])  # the logits' first rows in order (in place), or not
@pytest.mark.parametrize("examples", [False, True])  # with pending-copy and example scores after a marker
def test_shortlisted_product_path_equals_the_product_over_the_vocabulary(tiny, rows, examples):
    """The shortlisted product path never builds the plugin's vocabulary-wide logits; it leaves the
    softmax of ``base + gate * log_softmax(head + copy scores)`` over the whole vocabulary, also
    for a shortlist set in no particular order, and with pending-copy scores (nested in the copy
    scores' tokens) and example scores (on tokens apart from them)."""
    from vllm_plugin.bank import PluginBank
    from vllm_plugin.decode import copy_mask, example_mask, pending_copy
    from vllm_plugin.testing import tiny_plugin

    from .conftest import COPY_MARKER

    marker = tiny.tokenizer(COPY_MARKER, add_special_tokens=False).input_ids
    features = dict(copy_after=marker, copy_pending=True, copy_example=True) if examples else {}
    plugin = tiny_plugin(tiny.vocab_size, seed=11, copy=True, gate=True, shortlist_size=tiny.vocab_size // 4,
                         **features)
    order = torch.randperm(tiny.vocab_size, generator=torch.Generator().manual_seed(0))
    plugin.set_shortlist(order[:tiny.vocab_size // 4])  # row i scores token order[i]: not sorted
    shot = f"name -- Zizzi\nfood -- Thai\n\n{COPY_MARKER}\nZizzi serves Thai food.\n\n"
    prompts = [tiny.encode(p) for p in ("Aromi is a", shot + f"name -- Cotto\narea -- riverside\n\n{COPY_MARKER}\n",
                                        shot + "Cotto serves")]
    width = max(map(len, prompts))
    padded = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    bank = PluginBank({"x": plugin}, 4, "cpu")
    for slot, p in enumerate(prompts):
        bank.assign(slot, "x", 0.8, prompt_len=len(p))
    torch.manual_seed(1)
    base = torch.randn(4, tiny.vocab_size) * 3
    out = base.clone()
    bank.apply(out, np.array(rows), np.arange(3), np.array(list(map(len, prompts))), None,
               lambda sel, start, length: padded[torch.as_tensor(sel)][:, int(start.min()):int(start.min()) + int(length.max())])
    assert torch.equal(out[3], base[3])  # a row without a plugin is untouched
    with torch.no_grad():
        for i, p in enumerate(prompts):
            hidden = plugin(torch.tensor([p]))[:, -1]
            mask = copy_mask(p, plugin)
            logits = plugin.add_copy_score(hidden, plugin.head(hidden), mask,
                                           pending_copy(mask, []) if examples else None, example_mask(p, plugin))
            gate = plugin.strength(hidden, base[rows[i]][None], logits)
            want = base[rows[i]] + 0.8 * gate * torch.log_softmax(logits[0], -1)
            torch.testing.assert_close(torch.log_softmax(out[rows[i]], -1), torch.log_softmax(want, -1),
                                       atol=1e-4, rtol=1e-4)
