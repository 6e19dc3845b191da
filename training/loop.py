"""The training loop both trainers share: the plugin's (``train.py``) and LoRA's (``lora.py``).

A trainer says how to compute the summed loss of a batch of example indices, how to compute the
held-out (select) loss, and how to keep the best weights. This module does the rest, once:

- ``lr_at``, the schedule, in named phases: linear warmup to ``lr`` over ``warmup_steps``, then
  cosine decay to ``min_lr_ratio * lr`` at the last step.
- ``optimizer``, the weight-decay rule: AdamW, decay on every trainable parameter with dim >= 2
  (matrices, embeddings), none on vectors (biases, norm gains).
- ``LoopState.update_best``, the early stopper: stop after ``patience`` consecutive epochs whose
  select loss does not beat the best by more than ``MIN_IMPROVEMENT``.
- ``fit``, the epochs: a seeded shuffle per epoch, gradient clipping, a ``TrainingDivergedError``
  at the first non-finite loss or gradient norm, before the optimizer step that would write it
  into the weights, one history record per epoch; ``summary`` turns them into metrics.json.
- ``without_subnormals``: subnormal floats flushed to zero while ``fit`` runs (CPU speed).
- ``save_point`` / ``load_point``, the resume point: the trainer's weights, the optimizer state
  (safetensors, never pickled) and ``LoopState``, at the end of every epoch and, for long epochs,
  every ``save_every_s`` seconds within one; a resumed run continues at the next batch.
"""
from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vllm_plugin.paths import atomic_folder

from .config import TrainConfig

# A select loss counts as better only if it beats the best by more than this (nats/token).
MIN_IMPROVEMENT = 1e-4
# Within an epoch, a resume point at most this often: a kill loses no more than this much work,
# and writing the point (a plugin with its Adam state: ~150 MB for SmolLM2's vocabulary) costs little.
SAVE_EVERY_S = 600.0


class TrainingDivergedError(ValueError):
    """The loss or the gradient norm went non-finite (NaN/inf) during training."""


class ResumeError(ValueError):
    """A resume point that cannot be read (corrupt or incomplete) or that another run wrote."""


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of a run of ``total`` steps.

    Warmup: steps ``0 .. warmup_steps - 1`` ramp linearly up to ``lr`` (reached at the last
    one). Cosine decay: from ``lr`` right after warmup down to ``min_lr_ratio * lr`` at step
    ``total``; past it the minimum holds.
    """
    if step < cfg.warmup_steps:  # 1) warmup
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))  # 2) cosine decay
    m = cfg.min_lr_ratio  # 3) the minimum, as a fraction of lr
    return cfg.lr * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress)))


def steps(num_examples: int, cfg: TrainConfig) -> tuple[int, int]:
    """Optimizer steps per epoch (a batch each, capped at ``max_steps_per_epoch``) and in all."""
    per_epoch = math.ceil(num_examples / cfg.batch_size)
    if cfg.max_steps_per_epoch:
        per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
    return per_epoch, per_epoch * cfg.epochs


def optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters in two groups: ``cfg.weight_decay`` on those
    with dim >= 2 (matrices, embeddings), none on the rest (biases, norm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr)


@dataclass
class LoopState:
    """Where a run stands. Plain JSON values, so a resume point stores ``asdict`` of it."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    best_select_loss: float | None = None  # nats/token; None: nothing to beat yet
    best_epoch: int | None = None  # 1-based epoch of the kept weights; 0: the starting weights
    bad_epochs: int = 0  # consecutive epochs that did not improve on the best
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    # The unfinished epoch (a resume point written within it): batches done, their summed loss,
    # target tokens and seconds.
    batch: int = 0
    epoch_loss: float = 0.0
    epoch_tokens: int = 0
    epoch_seconds: float = 0.0

    def update_best(self, select_loss: float, epoch: int) -> bool:
        """The early stopper: count ``epoch`` (1-based) as an improvement if ``select_loss``
        beats the best by more than ``MIN_IMPROVEMENT``, else as one more bad epoch. Returns
        whether it improved (the caller then keeps these weights)."""
        if self.best_select_loss is None or select_loss < self.best_select_loss - MIN_IMPROVEMENT:
            self.best_select_loss, self.best_epoch, self.bad_epochs = select_loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def stopped_early(self, cfg: TrainConfig) -> bool:
        """``patience`` bad epochs in a row."""
        return self.bad_epochs >= cfg.patience


_flushing_depth = 0  # nested without_subnormals calls: only the outermost one turns flushing off


def without_subnormals(fn):
    """Run ``fn`` with subnormal floats (nonzero, below 1.2e-38 in float32) flushed to zero.

    x86 CPUs compute with subnormals in microcode, many times slower; a GRU plugin's training
    makes them in bursts (saturated gates, small gradients under weight decay), and its epochs
    then took 3 to 7 times as long here (the E2E shortlisted plugin at lr 5e-4 and weight decay
    10: 30 to 64 s against 9 s for 40 steps, with the same losses to four decimals). Values
    that small change no weight that matters. ``torch.set_flush_denormal`` sets the calling
    thread's floating-point control only: intra-op worker threads already running keep theirs,
    so a parallel op may still meet some (the gain above was measured as is). No effect where
    the CPU cannot flush; the outermost call turns flushing off again (torch's default).
    """
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        global _flushing_depth
        flushing = torch.set_flush_denormal(True)
        _flushing_depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _flushing_depth -= 1
            if flushing and _flushing_depth == 0:
                torch.set_flush_denormal(False)
    return wrapped


@without_subnormals
def fit(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig, state: LoopState,
        num_examples: int, batch_loss: Callable[[list[int]], tuple[torch.Tensor, int]],
        select_loss: Callable[[], float], save_best: Callable[[], None],
        save_point: Callable[[LoopState], None] | None = None, kept: Callable[[LoopState], str] = lambda s: "",
        name: str = "epoch", note: str = "", progress: bool = True, log=print,
        order: Callable[[int], list[int]] | None = None, save_every_s: float | None = None) -> LoopState:
    """Train from ``state`` (fresh, or read back from a resume point) until ``cfg.epochs`` epochs
    are done or the early stopper says stop; returns ``state``, updated in place.

    Args:
        num_examples: fit examples; each epoch visits them in an order seeded by ``cfg.seed`` and
            the epoch, ``cfg.batch_size`` at a time.
        batch_loss: example indices -> (summed loss over their target tokens, a 0-dim tensor
            with a graph; the number of target tokens). The loop divides by the count.
        select_loss: the held-out loss, mean nats per target token (sets eval mode itself).
        save_best: keep the current weights; called when an epoch improves on the best.
        save_point: write a resume point from ``state``; called at the end of every epoch, and
            within one after the first batch that ends ``save_every_s`` seconds or more after
            the last point (None: epoch ends only). A state read back from a point written
            within an epoch continues that epoch at its next batch.
        kept: for a divergence message, what the run has kept so far (e.g. "no checkpoint
            was written").
        name, note: the log line reads "<name> <n>: fit .., select ..<note>".
        order: epoch -> the order to visit the examples in (default: a shuffle seeded by
            ``cfg.seed`` and the epoch).

    Raises:
        TrainingDivergedError: the training loss, the gradient norm or the select loss is
            NaN/inf; raised before that step updates the weights, and before any save.
    """
    per_epoch, total_steps = steps(num_examples, cfg)
    params = [p for p in model.parameters() if p.requires_grad]

    def diverged(what: str, value: float, batch: int, step: int) -> TrainingDivergedError:
        return TrainingDivergedError(
            f"training diverged: the {what} is {value} at epoch {state.epoch + 1}, batch {batch + 1} (optimizer "
            f"step {step + 1}, learning rate {lr_at(step, total_steps, cfg):.3g}); {kept(state)}. Lower the "
            f"learning rate (--lr) or raise the warmup (--warmup-steps) and train again")

    while state.epoch < cfg.epochs and not state.stopped_early(cfg):
        epoch = state.epoch
        model.train()
        if order is not None:
            visit = order(epoch)
        else:
            visit = list(range(num_examples))
            random.Random(cfg.seed * 1000 + epoch).shuffle(visit)
        t0 = last_point = time.time()
        bar = tqdm(range(state.batch, per_epoch), desc=f"{name} {epoch + 1}/{cfg.epochs}", disable=not progress,
                   initial=state.batch, total=per_epoch)
        for b in bar:
            lr = lr_at(state.step, total_steps, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum, n = batch_loss(visit[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            loss_value = loss_sum.item()
            if not math.isfinite(loss_value):
                raise diverged("training loss", loss_value / n, b, state.step)
            opt.zero_grad(set_to_none=True)
            (loss_sum / n).backward()
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            if not math.isfinite(norm):  # clipping by an inf norm would write NaN into every weight
                raise diverged("gradient norm", norm, b, state.step)
            opt.step()
            state.step, state.batch = state.step + 1, b + 1
            state.epoch_loss, state.epoch_tokens = state.epoch_loss + loss_value, state.epoch_tokens + n
            bar.set_postfix(loss=f"{state.epoch_loss / state.epoch_tokens:.3f}")
            if save_point is not None and save_every_s is not None and b + 1 < per_epoch \
                    and time.time() - last_point >= save_every_s:
                now = time.time()
                state.epoch_seconds, t0, last_point = state.epoch_seconds + now - t0, now, now
                save_point(state)
        loss = select_loss()
        if not math.isfinite(loss):
            raise diverged("select loss", loss, per_epoch - 1, state.step - 1)
        seconds = state.epoch_seconds + time.time() - t0
        total, count = state.epoch_loss, state.epoch_tokens
        state.batch, state.epoch_loss, state.epoch_tokens, state.epoch_seconds = 0, 0.0, 0, 0.0
        state.history.append({"epoch": epoch + 1, "fit_loss": total / count, "select_loss": loss,
                              "seconds": seconds, "tokens_per_s": count / seconds})
        log(f"{name} {epoch + 1}: fit {total / count:.4f}  select {loss:.4f}{note}  {seconds:.0f}s")
        if state.update_best(loss, epoch + 1):
            save_best()
        state.epoch = epoch + 1
        if save_point is not None:
            save_point(state)
    return state


def save_point(folder: Path, opt: torch.optim.Optimizer, state: LoopState, write_weights: Callable[[Path], None],
               settings: dict | None = None) -> None:
    """A resume point as one folder: ``write_weights(tmp)`` writes the trainer's weights into it,
    then the optimizer state (``optimizer.safetensors``) and ``state.json`` (``state``, the
    optimizer's param groups, and the ``settings`` a resumed run must share). Written beside
    ``folder`` and renamed into place: a kill at any moment leaves the previous point or this one."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
               for i, s in sd["state"].items() for k, v in s.items()}
    with atomic_folder(folder) as tmp:
        write_weights(tmp)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**asdict(state), "param_groups": sd["param_groups"],
                                                    "settings": settings or {}}))


def load_point(folder: Path, opt: torch.optim.Optimizer, read_weights: Callable[[Path], None],
               settings: dict | None = None) -> LoopState:
    """Restore the trainer's weights (``read_weights(folder)``) and ``opt`` from ``folder``;
    returns the loop's counters.

    Raises:
        ResumeError: ``state.json``, the weights or the optimizer state are missing or corrupt, or
            the point was written with other ``settings``; the message names the file and says
            how to start over.
    """
    fix = f"delete {folder} or train again with --no-resume to start over"
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not {"epoch", "step", "param_groups"} <= set(state):
            raise ValueError("not a resume state (needs epoch, step, param_groups)")
    except (OSError, ValueError) as e:
        raise ResumeError(f"cannot resume from {path}: {e}; {fix}") from e
    stored = state.pop("settings", {})
    if settings is not None:
        differ = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if differ:
            raise ResumeError(f"{folder} holds a run with other settings (" + ", ".join(
                f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items()) + f"); {fix}")
    try:
        read_weights(folder)
        flat = load_file(str(folder / "optimizer.safetensors"))
        per_param: dict[int, dict] = {}
        for key, value in flat.items():
            i, name = key.split(".", 1)
            per_param.setdefault(int(i), {})[name] = value
        opt.load_state_dict({"state": per_param, "param_groups": state.pop("param_groups")})
        return LoopState(**state)
    except Exception as e:  # noqa: BLE001 - any unreadable part of the point gets the same advice
        raise ResumeError(f"cannot resume from {folder}: {e}; {fix}") from e


def summary(cfg: TrainConfig, state: LoopState, *, base_select_loss: float | None, fit_examples: int,
            select_examples: int, fit_target_tokens: int, **extra) -> dict:
    """The run's metrics.json: config, the base's select loss, the best select loss and its epoch,
    whether early stopping ended the run, the per-epoch history (``epoch``, ``fit_loss`` and
    ``select_loss`` in nats/token, ``seconds``, ``tokens_per_s`` over target tokens), the data's
    sizes, and any trainer-specific ``extra``."""
    return {"config": asdict(cfg), "base_select_loss": base_select_loss,
            "best_select_loss": state.best_select_loss, "best_epoch": state.best_epoch,
            "stopped_early": state.stopped_early(cfg), "history": state.history, "fit_examples": fit_examples,
            "select_examples": select_examples, "fit_target_tokens": fit_target_tokens, **extra}
