"""The one training loop: its schedule's phases, the early stopper, the weight-decay rule, and
both trainers (plugin and LoRA) running on it."""
import json
import math

import pytest
import torch

from vllm_plugin.training import loop
from vllm_plugin.training.loop import LoopState, TrainConfig, TrainingDivergedError

from .test_data import write_e2e
from .test_training import synthetic_rows


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_minimum():
    cfg = TrainConfig(lr=2.0, warmup_steps=4, min_lr_ratio=0.1)
    total = 24
    lrs = [loop.lr_at(s, total, cfg) for s in range(total + 3)]
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # warmup: linear, reaching lr at its last step
    assert lrs[4] == pytest.approx(2.0)  # decay starts from lr
    assert lrs[4 + 10] == pytest.approx(0.2 + 1.8 * 0.5)  # halfway: the cosine's midpoint
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[total:] == pytest.approx([0.2] * 3)  # ends at min_lr_ratio * lr and stays there
    assert loop.lr_at(total, total, TrainConfig(lr=2.0, warmup_steps=4, min_lr_ratio=0.0)) == 0.0


def test_early_stopper_counts_patience_bad_epochs_with_a_threshold():
    cfg = TrainConfig(patience=2)
    state = LoopState()
    assert state.update_best(5.0, 1) and state.best_epoch == 1
    assert not state.update_best(5.0 - 0.5e-4, 2)  # better, but not by more than 1e-4: a bad epoch
    assert state.bad_epochs == 1 and not state.stopped_early(cfg)
    assert state.update_best(5.0 - 2e-4, 3)  # beats the best by more than 1e-4: resets the count
    assert (state.best_epoch, state.bad_epochs) == (3, 0)
    assert not state.update_best(6.0, 4) and not state.stopped_early(cfg)
    assert not state.update_best(5.0 - 2e-4, 5) and state.stopped_early(cfg)  # the 2nd bad epoch stops
    assert (state.best_select_loss, state.best_epoch) == (5.0 - 2e-4, 3)


def test_weight_decay_only_on_matrices_and_only_trainable_parameters():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[0].weight.requires_grad_(False)
    decay, no_decay = loop.optimizer(model, TrainConfig(weight_decay=0.3)).param_groups
    assert decay["weight_decay"] == 0.3 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and [p.shape for p in no_decay["params"]] == [(4,), (4,), (4,)]


def load_examples(tmp_path):
    from vllm_plugin.training.data import load_e2e

    return load_e2e(write_e2e(tmp_path / "e2e.csv", synthetic_rows(20)))


@pytest.fixture
def applied_lrs(monkeypatch):
    """The learning rate of each param group at every AdamW step, as the optimizer saw it."""
    seen = []
    real_step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    return seen


def test_plugin_and_lora_trainers_run_the_same_loop(tiny, tmp_path, applied_lrs):
    """Both trainers apply the core's schedule step for step, and record the same history and
    metrics fields."""
    from vllm_plugin.training.base_logits import extract_full, tokenize_examples
    from vllm_plugin.training.data import split_by_input
    from vllm_plugin.training.lora import LoraTrainConfig, train_lora
    from vllm_plugin.training.train import PairSet, train
    from vllm_plugin.testing import tiny_plugin

    examples = load_examples(tmp_path)
    shared = dict(epochs=2, batch_size=4, lr=5e-3, warmup_steps=2, max_steps_per_epoch=3)  # 6 steps in all
    expected = [[loop.lr_at(s, 6, TrainConfig(**shared))] * 2 for s in range(6)]

    fit, select = (tokenize_examples(part, tiny.tokenizer) for part in split_by_input(examples))
    pairs = [PairSet(ts, extract_full(tiny.base, ts, progress=False)) for ts in (fit, select)]
    plugin_metrics = train(tiny_plugin(tiny.vocab_size), *pairs, TrainConfig(**shared, patience=5), tmp_path / "p",
                           progress=False, log=lambda *_: None)
    assert applied_lrs == expected
    applied_lrs.clear()
    train_lora(str(tiny.base_dir), examples, tmp_path / "lora", LoraTrainConfig(**shared, patience=5),
               log=lambda *_: None, progress=False)
    assert applied_lrs == expected

    lora_metrics = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert set(lora_metrics) - {"split"} == set(plugin_metrics) - {"base_fit_loss"}
    for m in (plugin_metrics, lora_metrics):
        assert [set(h) for h in m["history"]] == [{"epoch", "fit_loss", "select_loss", "seconds", "tokens_per_s"}] * 2


def test_lora_keeps_the_base_when_no_epoch_beats_it_and_stops_after_patience(tiny, tmp_path):
    """Epoch 0 is the base (B starts at zero): an epoch that does not beat its select loss by
    more than 1e-4 is a bad one, ``patience`` of them stop, and the merged model is the base."""
    from transformers import AutoModelForCausalLM

    from vllm_plugin.training.lora import LoraTrainConfig, train_lora

    examples = load_examples(tmp_path)
    merged = train_lora(str(tiny.base_dir), examples, tmp_path / "lora",
                        LoraTrainConfig(epochs=4, batch_size=8, lr=1e-12, warmup_steps=1, patience=1),
                        log=lambda *_: None, progress=False)
    m = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert (m["best_epoch"], m["stopped_early"], len(m["history"])) == (0, True, 1)
    assert m["best_select_loss"] == m["base_select_loss"]
    merged_weights = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    for name, weight in tiny.base.state_dict().items():
        assert torch.equal(merged_weights[name], weight), name


def test_lora_stops_on_divergence_and_writes_nothing(tiny, tmp_path):
    from vllm_plugin.training.lora import LoraTrainConfig, train_lora

    with pytest.raises(TrainingDivergedError, match=r"is (nan|inf).* at epoch 1, batch \d+ .*no merged model was written"):
        train_lora(str(tiny.base_dir), load_examples(tmp_path), tmp_path / "lora",
                   LoraTrainConfig(epochs=1, batch_size=8, lr=1e30, warmup_steps=1), log=lambda *_: None,
                   progress=False)
    assert not (tmp_path / "lora" / "merged").exists() and not (tmp_path / "lora" / "metrics.json").exists()


def kill_after_points(monkeypatch, n: int) -> list:
    """Resume points after every batch (``SAVE_EVERY_S`` 0), and a kill right after the ``n``-th
    is written; returns the (epoch, batch) of each point written."""
    real, points = loop.save_point, []

    def save_then_kill(folder, opt, state, *args, **kwargs):
        real(folder, opt, state, *args, **kwargs)
        points.append((state.epoch, state.batch))
        if len(points) == n:
            raise KeyboardInterrupt("killed after a resume point")

    monkeypatch.setattr(loop, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(loop, "save_point", save_then_kill)
    return points


def test_both_trainers_killed_within_an_epoch_continue_at_the_next_batch(tiny, tmp_path, monkeypatch):
    """A run killed after a resume point written within an epoch continues at the batch after it
    and ends exactly as the run that was never killed: same history, same weights (no dropout
    here, so the continuation is deterministic)."""
    from safetensors.torch import load_file

    from vllm_plugin.training.base_logits import extract_full, tokenize_examples
    from vllm_plugin.training.data import split_by_input
    from vllm_plugin.training.lora import LoraTrainConfig, train_lora
    from vllm_plugin.training.train import PairSet, train
    from vllm_plugin.testing import tiny_plugin

    examples = load_examples(tmp_path)
    shared = dict(epochs=2, batch_size=4, lr=5e-3, warmup_steps=2, max_steps_per_epoch=4, patience=5)
    pairs = [PairSet(ts, extract_full(tiny.base, ts, progress=False))
             for ts in (tokenize_examples(part, tiny.tokenizer) for part in split_by_input(examples))]

    def plugin_run(out, log=lambda *_: None):
        return train(tiny_plugin(tiny.vocab_size), *pairs, TrainConfig(**shared), out, progress=False, log=log)

    def lora_run(out, log=lambda *_: None):
        train_lora(str(tiny.base_dir), examples, out, LoraTrainConfig(**shared), log=log, progress=False)
        return json.loads((out / "metrics.json").read_text())

    for name, run_it, weights in [("plugin", plugin_run, "checkpoint/model.safetensors"),
                                  ("lora", lora_run, "merged/model.safetensors")]:
        monkeypatch.setattr(loop, "SAVE_EVERY_S", 0.0)
        whole = run_it(tmp_path / f"{name}-whole")
        points = kill_after_points(monkeypatch, 6)
        with pytest.raises(KeyboardInterrupt):
            run_it(tmp_path / f"{name}-cut")
        assert points == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)], name
        monkeypatch.undo()
        logs = []
        cut = run_it(tmp_path / f"{name}-cut", log=logs.append)
        assert any("resuming at epoch 2, batch 3" in line for line in logs), (name, logs)
        for a, b in zip(whole["history"], cut["history"], strict=True):
            assert (a["fit_loss"], a["select_loss"]) == pytest.approx((b["fit_loss"], b["select_loss"]), abs=1e-5), name
        assert whole["best_epoch"] == cut["best_epoch"]
        w_whole, w_cut = (load_file(str(tmp_path / f"{name}-{k}" / weights)) for k in ("whole", "cut"))
        for key, value in w_whole.items():
            torch.testing.assert_close(w_cut[key], value, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")


def test_select_loss_divergence_names_the_last_step():
    """A non-finite select loss (weights fine, evaluation not) is caught after the epoch."""
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(epochs=1, batch_size=2, warmup_steps=1)

    def batch_loss(idx):
        return model(torch.ones(len(idx), 2)).sum(), len(idx)

    with pytest.raises(TrainingDivergedError, match=r"select loss is nan at epoch 1, batch 2 \(optimizer step 2,"):
        loop.fit(model, loop.optimizer(model, cfg), cfg, LoopState(), 4, batch_loss, lambda: math.nan,
                 save_best=lambda: pytest.fail("saved a diverged model"), progress=False, log=lambda *_: None)
