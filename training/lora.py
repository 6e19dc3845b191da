"""White-box upper bound: a LoRA fine-tune of the base itself (peft), on the same fit/select split.

Unlike a plugin this needs the base's weights, so no closed model allows it; it is the
comparison the paper's method gives up. Teacher forcing, cross-entropy on target tokens only,
AdamW with linear warmup, the best select-loss adapter kept, early stopping. The adapter is then
merged into the base and saved as a plain Hugging Face folder (safetensors + tokenizer), which
vLLM serves like any model.
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
from tqdm.auto import tqdm

from .base_logits import TokenizedSet, tokenize_examples
from .data import split_examples
from .train import TrainConfig


@dataclass
class LoraTrainConfig(TrainConfig):
    """The plugin trainer's settings, with defaults for fine-tuning a pretrained model, and a rank."""

    epochs: int = 2
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 20
    patience: int = 1
    rank: int = 8


def pad_token_id(tokenizer) -> int:
    """Padding only fills masked positions, so EOS serves where the tokenizer has no pad token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def batches(ts: TokenizedSet, batch_size: int, pad_id: int, order: list[int]):
    """(input ids, attention mask, labels) with prompt and padding positions masked out of the loss."""
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        seqs = [(ts.prompts[ts.example_prompt[e]], ts.targets[e]) for e in idx]
        width = max(len(p) + len(t) for p, t in seqs)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, (p, t) in enumerate(seqs):
            ids[row, :len(p) + len(t)] = torch.tensor(p + t)
            mask[row, :len(p) + len(t)] = 1
            labels[row, len(p):len(p) + len(t)] = torch.tensor(t)
        yield ids, mask, labels


def token_loss(model, ids, mask, labels) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the target tokens, and how many there are."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum"), int((targets != -100).sum())


@torch.no_grad()
def mean_loss(model, ts: TokenizedSet, batch_size: int, pad_id: int) -> float:
    model.eval()
    order = sorted(range(len(ts.targets)), key=lambda e: len(ts.prompts[ts.example_prompt[e]]) + len(ts.targets[e]))
    total, count = 0.0, 0
    for ids, mask, labels in batches(ts, batch_size, pad_id, order):
        loss, n = token_loss(model, ids, mask, labels)
        total, count = total + float(loss), count + n
    return total / count


def train_lora(base_path: str, examples, out: str | Path, config: LoraTrainConfig = LoraTrainConfig(), log=print,
               split: str = "input") -> Path:
    """Fine-tune on the fit part of ``examples`` (``split_examples(examples, split)``, as the
    plugins), select on the rest, merge, save under ``out/merged``; ``out/metrics.json`` records
    the losses. Returns the merged model's folder."""
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
    # LoRA's B starts at zero, so this is the base's own select loss.
    base_select = best = mean_loss(model, select_ts, config.batch_size, pad_id)
    log(f"lora: base select loss {base_select:.4f}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = math.ceil(len(fit_ts.targets) / config.batch_size)
    if config.max_steps_per_epoch:
        steps = min(steps, config.max_steps_per_epoch)
    total = steps * config.epochs
    warmup = min(config.warmup_steps, max(1, total // 10))  # a short run still reaches the full rate
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / total))
    best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    history, best_epoch, bad = [], 0, 0
    rng = random.Random(config.seed)
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = list(range(len(fit_ts.targets)))
        rng.shuffle(order)
        started, seen, fit_total, fit_count = time.perf_counter(), 0, 0.0, 0
        bar = tqdm(batches(fit_ts, config.batch_size, pad_id, order), total=steps, desc=f"lora epoch {epoch}")
        for step, (ids, mask, labels) in enumerate(bar):
            if step == steps:
                break
            loss, n = token_loss(model, ids, mask, labels)
            opt.zero_grad(set_to_none=True)
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            sched.step()
            fit_total, fit_count, seen = fit_total + float(loss.detach()), fit_count + n, seen + int(mask.sum())
            bar.set_postfix(loss=f"{fit_total / fit_count:.3f}")
        select_loss = mean_loss(model, select_ts, config.batch_size, pad_id)
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "fit_loss": fit_total / fit_count, "select_loss": select_loss,
                        "seconds": seconds, "tokens_per_s": seen / seconds})
        log(f"lora epoch {epoch}: fit {fit_total / fit_count:.4f}, select {select_loss:.4f}")
        if select_loss < best:
            best, best_epoch, bad = select_loss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        else:
            bad += 1
            if bad > config.patience:
                break
    model.load_state_dict(best_state, strict=False)
    merged_dir = out / "merged"
    model.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
    tok.save_pretrained(merged_dir)
    (out / "metrics.json").write_text(json.dumps(
        {"config": asdict(config), "split": split, "base_select_loss": base_select, "best_select_loss": best,
         "best_epoch": best_epoch, "history": history}, indent=2) + "\n")
    return merged_dir
