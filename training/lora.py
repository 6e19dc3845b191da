"""White-box upper bound: a LoRA fine-tune of the base itself (peft), on the same fit/select split.

Unlike a plugin this needs the base's weights, so no closed model allows it; it is the
comparison the paper's method gives up. Teacher forcing, cross-entropy on target tokens only,
and the plugin trainer's own loop (``training.loop``): the same learning-rate schedule (linear
warmup, cosine decay to a tenth), weight-decay rule, early stopper and divergence checks
(``TrainingDivergedError``). Epoch 0 is the base itself (LoRA's B starts at zero): the first
epoch must beat the base's select loss, and if none does the base's weights are kept. The best
adapter is then merged into the base and saved as a plain Hugging Face folder (safetensors +
tokenizer), which vLLM serves like any model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import loop
from .base_logits import TokenizedSet, tokenize_examples
from .data import split_examples
from .loop import LoopState, TrainConfig


@dataclass
class LoraTrainConfig(TrainConfig):
    """The plugin trainer's settings, with defaults for fine-tuning a pretrained model, and a rank."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    patience: int = 2  # as the plugin's: two epochs without improvement stop the fine-tune
    rank: int = 8


def pad_token_id(tokenizer) -> int:
    """Padding only fills masked positions, so EOS serves where the tokenizer has no pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(ts: TokenizedSet, idx: list[int], pad_id: int):
    """Examples ``idx`` as right-padded (input ids, attention mask, labels), each ``[len(idx),
    longest prompt + target]``, with prompt and padding positions masked out of the loss (-100)."""
    seqs = [(ts.prompts[ts.example_prompt[e]], ts.targets[e]) for e in idx]
    width = max(len(p) + len(t) for p, t in seqs)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    for row, (p, t) in enumerate(seqs):
        ids[row, :len(p) + len(t)] = torch.tensor(p + t)
        mask[row, :len(p) + len(t)] = 1
        labels[row, len(p):len(p) + len(t)] = torch.tensor(t)
    return ids, mask, labels


def batches(ts: TokenizedSet, batch_size: int, pad_id: int, order: list[int]):
    """``collate`` over ``order``, ``batch_size`` examples at a time."""
    for i in range(0, len(order), batch_size):
        yield collate(ts, order[i:i + batch_size], pad_id)


def token_loss(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the target tokens, and how many there are. The output layer runs
    on the positions before a target token only: the others (prompt, padding) carry no loss, and
    the vocabulary-sized matmul over them was a sixth of the fine-tune's time."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's wrapper, or a plain model
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    scored = targets != -100
    logits = lm.get_output_embeddings()(hidden[scored])
    return F.cross_entropy(logits.float(), targets[scored], reduction="sum"), int(scored.sum())


@torch.no_grad()
def mean_loss(model, ts: TokenizedSet, batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per target token (nats) of ``model`` (set to eval mode) over ``ts``."""
    model.eval()
    order = sorted(range(len(ts.targets)), key=lambda e: len(ts.prompts[ts.example_prompt[e]]) + len(ts.targets[e]))
    total, count = 0.0, 0
    for ids, mask, labels in batches(ts, batch_size, pad_id, order):
        loss, n = token_loss(model, ids, mask, labels)
        total, count = total + float(loss), count + n
    return total / count


def train_lora(base_path: str, examples, out: str | Path, config: LoraTrainConfig = LoraTrainConfig(), log=print,
               split: str = "input", progress: bool = True, resume: bool = True) -> Path:
    """Fine-tune on the fit part of ``examples`` (``split_examples(examples, split)``, as the
    plugins), select on the rest, merge, save under ``out/merged``; ``out/metrics.json`` holds
    ``loop.summary`` plus the split. Returns the merged model's folder.

    Resumable (``resume``): ``out/resume`` holds the adapter, its best copy so far, the optimizer
    state and the loop's counters, written at every epoch's end and every ``loop.SAVE_EVERY_S``
    seconds within one (an epoch of SmolLM2 on E2E takes about an hour on 2 CPU cores), so a
    killed fine-tune continues at its next batch.

    Raises:
        TrainingDivergedError: the loss, the gradient norm or the select loss went NaN/inf;
            no merged model is written then, and the last resume point is the one before.
        loop.ResumeError: ``out/resume`` is unreadable or holds a fine-tune with other settings.
    """
    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    tok = AutoTokenizer.from_pretrained(base_path)
    fit, select = split_examples(examples, split, seed=config.seed)
    fit_ts, select_ts = tokenize_examples(fit, tok), tokenize_examples(select, tok)
    pad_id = pad_token_id(tok)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(model, PeftLoraConfig(r=config.rank, lora_alpha=2 * config.rank, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    def trainable() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    def write_weights(folder: Path) -> None:
        save_file(trainable(), str(folder / "adapter.safetensors"))
        save_file(best, str(folder / "best.safetensors"))
        (folder / "base_select_loss.json").write_text(json.dumps(base_select))

    def read_weights(folder: Path) -> None:
        nonlocal base_select
        model.load_state_dict(load_file(str(folder / "adapter.safetensors")), strict=False)
        best.update(load_file(str(folder / "best.safetensors")))
        base_select = json.loads((folder / "base_select_loss.json").read_text())

    # What a resumed fine-tune must share with the one it continues (epochs and patience may grow).
    settings = {"base": str(base_path), "split": split, "fit_examples": len(fit_ts.targets),
                "fit_target_tokens": fit_ts.num_target_tokens, "rank": config.rank, "lr": config.lr,
                "batch_size": config.batch_size, "seed": config.seed, "weight_decay": config.weight_decay,
                "max_steps_per_epoch": config.max_steps_per_epoch}
    opt, best, base_select = loop.optimizer(model, config), trainable(), None
    resume_dir = out / "resume"
    if resume and (resume_dir / "state.json").is_file():
        state = loop.load_point(resume_dir, opt, read_weights, settings)
        log(f"lora: resuming at epoch {state.epoch + 1}, batch {state.batch + 1} "
            f"(best select loss {state.best_select_loss:.4f} at epoch {state.best_epoch})")
    else:
        # LoRA's B starts at zero, so this is the base's own select loss: epoch 0, the one to beat.
        base_select = mean_loss(model, select_ts, config.batch_size, pad_id)
        log(f"lora: base select loss {base_select:.4f}")
        state = LoopState(best_select_loss=base_select, best_epoch=0)
    loop.fit(model, opt, config, state, len(fit_ts.targets),
             batch_loss=lambda idx: token_loss(model, *collate(fit_ts, idx, pad_id)),
             select_loss=lambda: mean_loss(model, select_ts, config.batch_size, pad_id),
             save_best=lambda: best.update(trainable()),
             save_point=lambda s: loop.save_point(resume_dir, opt, s, write_weights, settings),
             save_every_s=loop.SAVE_EVERY_S, kept=lambda s: "no merged model was written",
             name="lora epoch", note=f"  (base {base_select:.4f})", progress=progress, log=log)
    model.load_state_dict(best, strict=False)
    merged_dir = out / "merged"
    model.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
    tok.save_pretrained(merged_dir)
    metrics = loop.summary(config, state, base_select_loss=base_select, fit_examples=len(fit_ts.targets),
                           select_examples=len(select_ts.targets), fit_target_tokens=fit_ts.num_target_tokens,
                           split=split)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return merged_dir
