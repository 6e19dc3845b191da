"""Train a plugin against a frozen base's cached log-probs (teacher forcing).

Loss: cross-entropy of softmax(base log-probs + plugin logits) on target tokens only, which is
the product of experts p_base * p_plugin renormalised. AdamW with linear warmup and cosine
decay, early stopping on the held-out (select) loss, the best checkpoint kept, resumable at
epoch boundaries. Nothing is pickled: the optimizer state is stored as safetensors too.
A loss or gradient that goes non-finite stops training (``TrainingDivergedError``) before the
step that would spread it into the weights, so neither checkpoint is ever overwritten with it.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vllm_plugin.checkpoint import load_plugin, save_plugin
from vllm_plugin.model import PluginLM
from vllm_plugin.paths import atomic_folder

from .base_logits import BaseLogits, TokenizedSet


class TrainingDivergedError(ValueError):
    """The loss or the gradient norm went non-finite (NaN/inf) during training."""


def _diverged(what: str, value: float, epoch: int, batch: int, step: int, lr: float, out_dir: Path,
              state: dict) -> TrainingDivergedError:
    best = (f"the best checkpoint ({out_dir / 'checkpoint'}, epoch {state['best_epoch']}) and the resume point "
            f"(after epoch {state['epoch']}) are untouched" if state["best_epoch"] else
            "no checkpoint was written")
    return TrainingDivergedError(
        f"training diverged: the {what} is {value} at epoch {epoch + 1}, batch {batch + 1} (optimizer step "
        f"{step + 1}, learning rate {lr:.3g}); {best}. Lower the learning rate (--lr) or raise the warmup "
        f"(--warmup-steps) and train again")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    patience: int = 2
    grad_clip: float = 1.0
    seed: int = 0
    max_steps_per_epoch: int | None = None


class PairSet:
    """Tokenized examples with the base's log-probs for each of their target tokens."""

    def __init__(self, ts: TokenizedSet, base: BaseLogits | None):
        """``base=None``: no base expert (training the small model alone)."""
        if base is not None and len(base) != ts.num_target_tokens:
            raise ValueError(f"base logits cover {len(base)} target tokens, the examples have "
                             f"{ts.num_target_tokens}: the cache does not belong to this data")
        self.ts, self.base = ts, base
        self.offsets = [0]
        for t in ts.targets:
            self.offsets.append(self.offsets[-1] + len(t))

    def __len__(self):
        return len(self.ts.targets)

    def batch(self, idx: list[int]):
        """Right-padded plugin inputs and, for each target token, where its prediction is read."""
        seqs = [self.ts.prompts[self.ts.example_prompt[e]] + self.ts.targets[e][:-1] for e in idx]
        ids = torch.zeros(len(idx), max(map(len, seqs)), dtype=torch.long)
        pos_b, pos_t, rows, targets = [], [], [], []
        for b, (e, seq) in enumerate(zip(idx, seqs)):
            ids[b, :len(seq)] = torch.tensor(seq)
            p, n = len(self.ts.prompts[self.ts.example_prompt[e]]), len(self.ts.targets[e])
            pos_b += [b] * n
            pos_t += range(p - 1, p - 1 + n)
            rows += range(self.offsets[e], self.offsets[e + 1])
            targets += self.ts.targets[e]
        return ids, torch.tensor(pos_b), torch.tensor(pos_t), torch.tensor(rows), torch.tensor(targets)


def batch_loss(plugin: PluginLM | None, data: PairSet, idx: list[int]):
    """Summed combined cross-entropy over the batch's target tokens, and their count."""
    ids, pos_b, pos_t, rows, targets = data.batch(idx)
    logits = 0.0 if data.base is None else data.base.scores(rows)  # CE renormalises the sum
    if plugin is not None:
        logits = logits + plugin.head(plugin(ids)[pos_b, pos_t])
    return F.cross_entropy(logits, targets, reduction="sum"), len(targets)


@torch.no_grad()
def evaluate(plugin: PluginLM | None, data: PairSet, batch_size: int = 64) -> float:
    """Mean per-token cross-entropy (nats); with ``plugin=None`` the base alone."""
    if plugin is not None:
        plugin.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        loss, n = batch_loss(plugin, data, list(range(i, min(i + batch_size, len(data)))))
        total, count = total + loss.item(), count + n
    return total / count


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class ResumeError(ValueError):
    """A resume point that cannot be read (corrupt or incomplete)."""


def _save_resume(folder: Path, plugin, opt, state: dict) -> None:
    """The resume point (plugin weights, optimizer state, counters) as one folder, written beside
    ``folder`` and renamed into place: a kill at any moment leaves the previous point or this one."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
               for i, s in sd["state"].items() for k, v in s.items()}
    with atomic_folder(folder) as tmp:
        save_plugin(plugin, tmp / "model")
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "param_groups": sd["param_groups"]}))


def _load_resume(folder: Path, plugin, opt) -> dict:
    """Restore ``plugin`` and ``opt`` from ``folder``; returns the training counters.

    Raises:
        ResumeError: ``state.json``, the weights or the optimizer state are missing or corrupt;
            the message names the file and says to start over with ``--no-resume``.
    """
    fix = f"delete {folder} or train again with --no-resume to start over"
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not {"epoch", "step", "param_groups"} <= set(state):
            raise ValueError("not a resume state (needs epoch, step, param_groups)")
    except (OSError, ValueError) as e:
        raise ResumeError(f"cannot resume from {path}: {e}; {fix}") from e
    try:
        plugin.load_state_dict(load_plugin(folder / "model").state_dict())
        flat = load_file(str(folder / "optimizer.safetensors"))
        per_param: dict[int, dict] = {}
        for key, value in flat.items():
            i, name = key.split(".", 1)
            per_param.setdefault(int(i), {})[name] = value
        opt.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
    except Exception as e:  # noqa: BLE001 - any unreadable part of the point gets the same advice
        raise ResumeError(f"cannot resume from {folder}: {e}; {fix}") from e
    return state


def train(plugin: PluginLM, fit: PairSet, select: PairSet, cfg: TrainConfig, out_dir: str | Path,
          resume: bool = True, progress: bool = True, log=print) -> dict:
    """Fit the plugin; the best-on-select weights end up in ``out_dir/checkpoint``.

    Raises:
        TrainingDivergedError: the training loss, the gradient norm or the select loss went
            NaN/inf; raised before that step updates the weights, and before any save.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    decay = [p for n, p in plugin.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in plugin.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(len(fit) / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs

    state = {"epoch": 0, "step": 0, "best_select_loss": None, "best_epoch": None, "bad_epochs": 0,
             "history": []}
    resume_dir = out_dir / "resume"
    if resume and (resume_dir / "state.json").is_file():
        state = _load_resume(resume_dir, plugin, opt)
        log(f"resuming after epoch {state['epoch']} (best select loss {state['best_select_loss']})")
    with_base = select.base is not None
    base_select = evaluate(None, select) if with_base else None
    base_fit = evaluate(None, fit) if with_base else None

    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        epoch = state["epoch"]
        plugin.train()
        order = list(range(len(fit)))
        random.Random(cfg.seed * 1000 + epoch).shuffle(order)
        t0, total, count = time.time(), 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        for b in bar:
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            lr = _lr_at(state["step"], total_steps, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum, n = batch_loss(plugin, fit, idx)
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                raise _diverged("training loss", loss_value / n, epoch, b, state["step"], lr, out_dir, state)
            opt.zero_grad(set_to_none=True)
            (loss_sum / n).backward()
            norm = float(torch.nn.utils.clip_grad_norm_(plugin.parameters(), cfg.grad_clip))
            if not math.isfinite(norm):  # clipping by an inf norm would write NaN into every weight
                raise _diverged("gradient norm", norm, epoch, b, state["step"], lr, out_dir, state)
            opt.step()
            state["step"] += 1
            total, count = total + loss_value, count + n
            bar.set_postfix(loss=f"{total / count:.3f}")
        select_loss = evaluate(plugin, select)
        if not math.isfinite(select_loss):
            raise _diverged("select loss", select_loss, epoch, steps_per_epoch - 1, state["step"] - 1,
                            _lr_at(state["step"] - 1, total_steps, cfg), out_dir, state)
        record = {"epoch": epoch + 1, "fit_loss": total / count, "select_loss": select_loss,
                  "seconds": time.time() - t0, "tokens_per_s": count / (time.time() - t0)}
        state["history"].append(record)
        base_note = f"  (base alone {base_select:.4f})" if with_base else ""
        log(f"epoch {epoch + 1}: fit {record['fit_loss']:.4f}  select {select_loss:.4f}{base_note}  "
            f"{record['seconds']:.0f}s")
        best = state["best_select_loss"]
        if best is None or select_loss < best - 1e-4:
            state.update(best_select_loss=select_loss, best_epoch=epoch + 1, bad_epochs=0)
            save_plugin(plugin, out_dir / "checkpoint")
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        _save_resume(resume_dir, plugin, opt, state)

    metrics = {
        "config": asdict(cfg),
        "base_fit_loss": base_fit,
        "base_select_loss": base_select,
        "best_select_loss": state["best_select_loss"],
        "best_epoch": state["best_epoch"],
        "stopped_early": state["bad_epochs"] >= cfg.patience,
        "history": state["history"],
        "fit_examples": len(fit),
        "select_examples": len(select),
        "fit_target_tokens": fit.ts.num_target_tokens,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
