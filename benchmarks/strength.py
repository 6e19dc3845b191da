"""How strong should a plugin be? Teacher-forced cross-entropy of ``p_base * p_plugin^w`` on the
target tokens of a set of examples, for several strengths ``w``, for each plugin a quality run
trained (``benchmarks.quality``; run that first).

    python -m benchmarks.strength --dataset webnlg

Sets: ``select``, the split every plugin was selected on (inputs like the fitting ones); and,
for WebNLG, ``heldout_train``: a fixed sample of ``train`` entries of the three held-out
categories (first reference each): inputs like the scored ``dev`` ones, but drawn from
``train``, so a strength chosen there is chosen without looking at the test set. ``w = 0`` is
the base alone. The top-20 plugin is combined with the base's top-20 view, as it decodes. Writes
``benchmarks/results/<dataset>_<base>_strength.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
PLUGINS = ("recurrent", "transformer", "top20")
HELDOUT_SAMPLE = 400


def evaluation_sets(dataset: str) -> dict:
    """name -> (examples, what they are)."""
    from benchmarks.quality import first_reference_each, load_protocol, split_webnlg
    from training.data import split_by_input
    from training.pipeline import data_dir

    train_examples, _, test, _ = load_protocol(dataset)
    _, select = split_by_input(train_examples)
    sets = {"select": (select, "the select split (inputs like the fitting ones)")}
    if dataset == "webnlg":
        from training.data import load_webnlg

        _, _, held_out = split_webnlg(data_dir())
        heldout = first_reference_each(load_webnlg(data_dir() / "webnlg" / "train.jsonl"), held_out)
        # A fixed sample keeps the base's forward to minutes on two cores (all of them: ~86k tokens).
        heldout = random.Random(0).sample(heldout, min(HELDOUT_SAMPLE, len(heldout)))
        scored = {e.prompt for e in test}  # a few inputs stand in both train and dev
        heldout = [e for e in heldout if e.prompt not in scored]
        sets["heldout_train"] = (heldout, f"{len(heldout)} random train entries (seed 0) of the held-out "
                                          f"categories {held_out}, first reference each; the scored dev "
                                          f"entries are not among them")
    return sets


def cross_entropies(data, plugin, weights, top_k: int | None) -> list[float]:
    """Mean per-token cross-entropy (nats) at each strength, in one pass over the data."""
    import torch
    import torch.nn.functional as F

    from vllm_plugin.decode import combine

    totals, count = torch.zeros(len(weights), dtype=torch.float64), 0
    plugin.eval()
    with torch.no_grad():
        for i in range(0, len(data), 64):
            ids, pos_b, pos_t, rows, targets = data.batch(list(range(i, min(i + 64, len(data)))))
            base = data.base.scores(rows)
            plugin_logits = plugin.head(plugin(ids)[pos_b, pos_t])
            for j, w in enumerate(weights):
                scores = combine(base, plugin_logits, weight=w, top_k=top_k)
                totals[j] += F.cross_entropy(scores, targets, reduction="sum").item()
            count += len(targets)
    return (totals / count).tolist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="webnlg", choices=["e2e", "webnlg"])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--weights", default=",".join(map(str, WEIGHTS)))
    parser.add_argument("--runs", default="runs/quality")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from benchmarks.quality import SHORT_BASE_NAMES
    from training.base_logits import tokenize_examples
    from training.pipeline import LazyBase, RunSpec, base_logits_for
    from training.train import PairSet
    from vllm_plugin.base_model import resolve_base, tokenizer_fingerprint
    from vllm_plugin.checkpoint import load_plugin, read_config

    weights = [float(w) for w in args.weights.split(",")]
    base_name = SHORT_BASE_NAMES.get(args.base, Path(args.base).name.lower())
    root = Path(args.runs) / f"{args.dataset}-{base_name}"
    plugins = {n: root / n / "checkpoint" for n in PLUGINS if (root / n / "checkpoint").is_dir()}
    if not plugins:
        raise SystemExit(f"no trained plugins under {root}: run python -m benchmarks.quality "
                         f"--dataset {args.dataset} --base {args.base} first")
    base_path = resolve_base(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    load_base = LazyBase(base_path)

    result = {"dataset": args.dataset, "base_model": base_name, "weights": weights, "sets": {},
              "cross_entropy": {n: {} for n in plugins}, "best_weight": {n: {} for n in plugins}}
    for set_name, (examples, description) in evaluation_sets(args.dataset).items():
        ts = tokenize_examples(examples, tokenizer)
        data = PairSet(ts, base_logits_for(ts, RunSpec(), base_path, fingerprint, load_base))
        result["sets"][set_name] = {"description": description, "examples": len(examples),
                                    "target_tokens": ts.num_target_tokens}
        for name, ckpt in plugins.items():
            top_k = read_config(ckpt).training.get("top_k")
            ce = cross_entropies(data, load_plugin(ckpt), weights, top_k)
            result["cross_entropy"][name][set_name] = dict(zip(map(str, weights), ce))
            result["best_weight"][name][set_name] = weights[min(range(len(ce)), key=ce.__getitem__)]
            print(set_name, name, {w: round(c, 3) for w, c in zip(weights, ce)})

    out = Path(args.results) / f"{args.dataset}_{base_name}_strength"
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"**{args.dataset}**, base `{base_name}`: teacher-forced cross-entropy (nats per target token) of "
             f"base x plugin^w; w = 0 is the base alone (for top20: the base's top-20 view).", ""]
    for set_name, info in result["sets"].items():
        lines += [f"`{set_name}`: {info['description']}; {info['examples']} examples, "
                  f"{info['target_tokens']} target tokens.", "",
                  "| plugin | " + " | ".join(f"w={w:g}" for w in weights) + " | best w |",
                  "|---|" + "---|" * (len(weights) + 1)]
        for name in plugins:
            ce = result["cross_entropy"][name][set_name]
            lines.append(f"| {name} | " + " | ".join(f"{ce[str(w)]:.3f}" for w in weights)
                         + f" | {result['best_weight'][name][set_name]:g} |")
        lines.append("")
    out.with_name(out.name + ".md").write_text("\n".join(lines))
    print(f"wrote {out}.json/.md")


if __name__ == "__main__":
    main()
