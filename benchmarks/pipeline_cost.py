"""Wall time and peak memory of the default E2E pipeline (base-logit extraction + training),
the default training recipe (``training.recipes.DEFAULT_RECIPE``) unless ``--recipe`` says.

Recomputes the base log-probs (refreshing their cache), trains from scratch into the default
run folder (so `vllm-plugin demo` afterwards finds the plugin trained), and measures the base model's plain forward throughput
(padded batches of whole prompt+reference sequences, every reference re-forwarding its prompt)
in the same run, so extraction can be held against it.

    python -m benchmarks.pipeline_cost            # writes benchmarks/results/pipeline.json
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from dataclasses import replace
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def plain_forward_throughput(base_path: str, shots: int, n_examples: int = 256, batch_size: int = 8) -> float:
    """Tokens/s of a plain batched forward (no head) over whole sequences of the fit split, behind
    the ``shots`` in-context examples the pipeline draws (so the sequences are as long as its)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_plugin.training.base_logits import tokenize_examples
    from vllm_plugin.training.data import in_context_shots, load_examples, split_by_input, with_shots
    from vllm_plugin.training.pipeline import default_data_file

    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    fit, _ = split_by_input(load_examples("e2e", default_data_file("e2e")))
    drawn = in_context_shots(fit, shots)
    ts = tokenize_examples([replace(e, prompt=with_shots(e.prompt, drawn)) for e in fit[:n_examples]], tok)
    seqs = [ts.prompts[p] + t for p, t in zip(ts.example_prompt, ts.targets)]
    tokens, t0 = 0, time.time()
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i:i + batch_size]
            ids = torch.zeros(len(batch), max(map(len, batch)), dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, :len(s)] = torch.tensor(s)
            model.get_decoder()(input_ids=ids)
            tokens += sum(map(len, batch))
    return tokens / (time.time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--recipe", default=None, help="a training recipe (default: the command line's default)")
    parser.add_argument("--out", default=str(RESULTS / "pipeline.json"))
    args = parser.parse_args()

    from vllm_plugin.base_model import resolve_base
    from vllm_plugin.training.pipeline import RunSpec
    from vllm_plugin.training.recipes import DEFAULT_RECIPE, recipe
    from vllm_plugin.training.pipeline import run as run_pipeline
    from vllm_plugin.training.train import TrainConfig

    base_path = resolve_base(None)
    name = args.recipe or DEFAULT_RECIPE
    spec = RunSpec(**recipe(name, "e2e"), train=TrainConfig(epochs=args.epochs))
    plain_tps = plain_forward_throughput(base_path, spec.shots)
    shutil.rmtree(spec.out_dir(), ignore_errors=True)  # train from scratch, no resume
    metrics = run_pipeline(spec, refresh_cache=True)
    forwarded = metrics["fit_tokens_forwarded"] + metrics["select_tokens_forwarded"]
    result = {
        "wall_s": round(metrics["wall_s"], 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "base_logits_s": round(metrics["base_logits_s"], 1),
        "train_s": round(metrics["train_s"], 1),
        "source": metrics["source"],
        "base_model": "smollm2-135m",
        "tokens_forwarded": forwarded,
        "extraction_tokens_per_s": round(forwarded / metrics["base_logits_s"], 1),
        "plain_forward_tokens_per_s": round(plain_tps, 1),
        "extraction_vs_plain": round(forwarded / metrics["base_logits_s"] / plain_tps, 3),
        "recipe": name,
        "design": {k: getattr(spec, k) for k in recipe(name, "e2e")},
        "epochs_run": len(metrics["history"]),
        "best_epoch": metrics["best_epoch"],
        # Each epoch's wall time includes its select-split evaluation.
        "epoch_s": [round(h["seconds"], 1) for h in metrics["history"]],
        "train_config": metrics["config"],
        "base_select_loss": round(metrics["base_select_loss"], 4),
        "best_select_loss": round(metrics["best_select_loss"], 4),
        # With a gate (fitted on select after the epochs, timed apart; train_s includes it).
        "gate_s": round(metrics["gate_s"], 1) if "gate_s" in metrics else None,
        "gated_select_loss": round(metrics["gate"]["select_loss_gated"], 4) if metrics.get("gate") else None,
        "cpu_threads": __import__("torch").get_num_threads(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
