"""Training settings, importable without torch (the command line builds its options from them).

``SOURCES``: where a run's base log-probs come from (``training.base_logits``).
``TrainConfig``: the training loop's settings (``training.loop``), shared by the plugin and LoRA.
"""
from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("full", "vllm", "openai", "full_topk")


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 32  # examples per optimizer step
    lr: float = 3e-3  # peak learning rate, reached at the end of warmup
    weight_decay: float = 0.01  # AdamW's, on parameters with dim >= 2 only
    warmup_steps: int = 50  # optimizer steps of linear warmup
    min_lr_ratio: float = 0.1  # the cosine decay ends at min_lr_ratio * lr
    patience: int = 2  # stop after this many consecutive epochs without improvement
    grad_clip: float = 1.0  # max global L2 norm of the gradient
    seed: int = 0
    max_steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (a compute budget)
    # Sampled softmax (plugin training only): 0 computes the product's normaliser over the whole
    # vocabulary; N > 0 makes it exact over the batch's base top-``candidate_k`` tokens and targets
    # and estimates the rest of the vocabulary from N uniformly drawn tokens (``train.sampled_batch_loss``).
    negatives: int = 0
    candidate_k: int = 32  # base candidates per position (a top-k cache uses its own k)
    # Batches of whole prompt groups (every target of a prompt together), so a plugin that can
    # (the GRU) reads each prompt once per batch; default: examples shuffled one by one.
    group_by_prompt: bool = False
    # Scheduled sampling (Bengio et al., 2015), against exposure bias: this share of the target
    # tokens the plugin reads (never the prompt's) is replaced by the token greedy decoding would
    # pick there (``train.own_inputs``), seeded; the base's log-probs and the labels stay the
    # reference's. 0: teacher forcing only.
    scheduled_sampling: float = 0.0
