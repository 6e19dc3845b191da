"""Time the processor core (state step + head + log-softmax + add) against `logits + bias`.

Prepared for a lent GPU (`device` tool): one short run, a few minutes at most.

    python -m benchmarks.processor_core --device cuda --vocab 128256      # 8B-class vocabulary
    python -m benchmarks.processor_core --device cpu --vocab 49152 --batches 1,8,32

It first checks, on the same device, that the core adds exactly the plugin's log-probs of each
row's whole sequence (the reference), then times decode steps driven the way Model Runner V2
drives a processor (device token ids, host-side lengths). Writes JSON (default
benchmarks/results/processor_core_<device>.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from vllm_plugin.model import PluginConfig, build_plugin
from vllm_plugin.bank import PluginBank


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_against_reference(plugin, device, vocab: int, rows: int = 4, prompt_len: int = 12, steps: int = 5) -> float:
    """Max |log_softmax(core delta) - log_softmax(plugin(whole sequence))| over a few decode steps."""
    bank = PluginBank({"p": plugin}, rows, device)
    for s in range(rows):
        bank.assign(s, "p", 1.0)
    seqs = torch.randint(0, vocab, (rows, prompt_len + steps), device=device)
    slots = np.arange(rows)
    worst = 0.0
    for n in range(prompt_len, prompt_len + steps + 1):
        logits = torch.zeros(rows, vocab, device=device)

        def last_tokens(sel, _rows, n=n):
            return seqs[torch.as_tensor(sel, device=device), n - 1]

        def token_range(sel, start, length):
            width = int(length.max())
            return seqs[torch.as_tensor(sel, device=device)][:, int(start[0]):int(start[0]) + width]

        bank.apply(logits, slots, slots, np.full(rows, n), last_tokens, token_range)
        with torch.no_grad():
            want = torch.log_softmax(plugin.head(plugin(seqs[:, :n]))[:, -1].float(), -1)
        # Without a penalty the added scores are the log-probs up to a per-row constant.
        worst = max(worst, (torch.log_softmax(logits, -1) - want).abs().max().item())
    return worst


def time_core(plugin, device, vocab: int, batch: int, steps: int, prompt_len: int = 32):
    bank = PluginBank({"p": plugin}, batch, device)
    slots = np.arange(batch)
    for s in slots:
        bank.assign(int(s), "p", 1.0)
    prompts = torch.randint(0, vocab, (batch, prompt_len), device=device)
    logits = torch.randn(batch, vocab, device=device)
    bias = torch.randn(vocab, device=device)
    new_tokens = torch.randint(0, vocab, (batch,), device=device)
    bank.apply(logits, slots, slots, np.full(batch, prompt_len), lambda sel, _rows: new_tokens[sel],
               lambda sel, start, length: prompts)
    core, base = [], []
    for i in range(steps):
        seq_lens = np.full(batch, prompt_len + 1 + i)
        _sync(device)
        t0 = time.perf_counter()
        bank.apply(logits, slots, slots, seq_lens, lambda sel, _rows: new_tokens, None)
        _sync(device)
        t1 = time.perf_counter()
        logits.add_(bias)
        _sync(device)
        t2 = time.perf_counter()
        core.append(t1 - t0)
        base.append(t2 - t1)
    return statistics.median(core), statistics.median(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--arch", default="gru", choices=["gru", "transformer"])
    parser.add_argument("--batches", default="1,8,32,64,128,256")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    config = PluginConfig(vocab_size=args.vocab, architecture=args.arch, d_model=args.d_model, dropout=0.0,
                          max_len=512)
    plugin = build_plugin(config).to(device).eval()
    max_err = check_against_reference(plugin, device, args.vocab)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        core_s, base_s = time_core(plugin, device, args.vocab, batch, args.steps)
        rows.append({"batch_size": batch, "core_ms": round(core_s * 1e3, 4), "logits_plus_bias_ms": round(base_s * 1e3, 4),
                     "core_us_per_row": round(core_s * 1e6 / batch, 2)})
        print(rows[-1], flush=True)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "vocab_size": args.vocab, "d_model": args.d_model, "architecture": args.arch,
        "plugin_flops_per_token": plugin.flops_per_token(),
        "max_abs_error_vs_reference": max_err, "rows": rows,
    }
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"processor_core_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
