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
    """Summed cross-entropy of the target tokens, and how many there are."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    targets = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction="sum"), int((targets != -100).sum())


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
               split: str = "input", progress: bool = True) -> Path:
    """Fine-tune on the fit part of ``examples`` (``split_examples(examples, split)``, as the
    plugins), select on the rest, merge, save under ``out/merged``; ``out/metrics.json`` holds
    ``loop.summary`` plus the split. Returns the merged model's folder.

    Not resumable: an interrupted fine-tune starts over (a resume point would have to hold the
    adapter, its best copy so far and the optimizer state; the plugin trainer's holds a plugin).

    Raises:
        TrainingDivergedError: the loss, the gradient norm or the select loss went NaN/inf;
            nothing is written then.
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
    # LoRA's B starts at zero, so this is the base's own select loss: epoch 0, the one to beat.
    base_select = mean_loss(model, select_ts, config.batch_size, pad_id)
    log(f"lora: base select loss {base_select:.4f}")
    state = LoopState(best_select_loss=base_select, best_epoch=0)

    def trainable() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}

    best = trainable()
    loop.fit(model, loop.optimizer(model, config), config, state, len(fit_ts.targets),
             batch_loss=lambda idx: token_loss(model, *collate(fit_ts, idx, pad_id)),
             select_loss=lambda: mean_loss(model, select_ts, config.batch_size, pad_id),
             save_best=lambda: best.update(trainable()), kept=lambda s: "nothing was written",
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
