"""How strong should a plugin be? Teacher-forced cross-entropy of ``p_base * p_plugin^w`` on the
target tokens of a set of examples, for several strengths ``w``, for each plugin a quality run
trained (``benchmarks.quality``; run that first).

    python -m benchmarks.strength --dataset webnlg

The set is the protocol's ``select`` split, the one every plugin was selected on: the strength
is chosen there, with no data of the test set (for WebNLG, no data of the held-out categories).
``w = 0`` is the base alone. The top-20 plugin is combined with the base's top-20 view, as it
decodes. Writes ``benchmarks/results/<protocol>_<base>_strength.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
PLUGINS = ("recurrent", "transformer", "top20")


def evaluation_sets(dataset: str, split: str | None = None) -> tuple[str, dict]:
    """(protocol name, {set name: (examples, what they are)})."""
    from benchmarks.protocols import load_protocol

    protocol = load_protocol(dataset, split)
    return protocol.name, {"select": (protocol.select, f"the select split ({protocol.description})")}


def cross_entropies(data, plugin, weights, top_k: int | None) -> list[float]:
    """Mean per-token cross-entropy (nats) at each strength, in one pass over the data."""
    import torch
    import torch.nn.functional as F

    from vllm_plugin.experts import combine
    from vllm_plugin.training.train import with_copy_score

    totals, count = torch.zeros(len(weights), dtype=torch.float64), 0
    plugin.eval()
    with torch.no_grad():
        for i in range(0, len(data), 64):
            idx = list(range(i, min(i + 64, len(data))))
            ids, pos_b, pos_t, rows, targets = data.batch(idx)
            base = data.base.scores(rows)
            hidden = plugin(ids)[pos_b, pos_t]
            plugin_logits = with_copy_score(plugin, data, idx, hidden, plugin.head(hidden))
            for j, w in enumerate(weights):
                scores = combine(base, plugin_logits, weight=w, top_k=top_k)
                totals[j] += F.cross_entropy(scores, targets, reduction="sum").item()
            count += len(targets)
    return (totals / count).tolist()


def main(argv=None) -> None:
    from benchmarks.protocols import PROTOCOL_SPLITS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="webnlg", choices=["e2e", "webnlg"])
    parser.add_argument("--split", choices=PROTOCOL_SPLITS,
                        help="the protocol's fit/select split (see benchmarks.quality)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--weights", default=",".join(map(str, WEIGHTS)))
    parser.add_argument("--runs", default="runs/quality")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from benchmarks.protocols import base_name
    from vllm_plugin.training.base_logits import tokenize_examples
    from vllm_plugin.training.pipeline import LazyBase, RunSpec, base_logits_for
    from vllm_plugin.training.train import PairSet
    from vllm_plugin.base_model import resolve_base, tokenizer_fingerprint
    from vllm_plugin.checkpoint import load_plugin, read_config

    weights = [float(w) for w in args.weights.split(",")]
    short = base_name(args.base)
    protocol_name, sets = evaluation_sets(args.dataset, args.split)
    root = Path(args.runs) / f"{protocol_name}-{short}"
    plugins = {n: root / n / "checkpoint" for n in PLUGINS if (root / n / "checkpoint").is_dir()}
    if not plugins:
        raise SystemExit(f"no trained plugins under {root}: run python -m benchmarks.quality "
                         f"--dataset {args.dataset} --base {args.base} first")
    base_path = resolve_base(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    load_base = LazyBase(base_path)

    result = {"dataset": args.dataset, "base_model": short, "weights": weights, "sets": {},
              "cross_entropy": {n: {} for n in plugins}, "best_weight": {n: {} for n in plugins}}
    for set_name, (examples, description) in sets.items():
        ts = tokenize_examples(examples, tokenizer)
        data = PairSet(ts, base_logits_for(ts, RunSpec(), base_path, fingerprint, load_base))
        result["sets"][set_name] = {"description": description, "examples": len(examples),
                                    "target_tokens": ts.num_target_tokens}
        for name, ckpt in plugins.items():
            config = read_config(ckpt)
            if config.copy_tail_offset is not None or config.tail_prior is not None:  # combine's view: a flat tail
                raise SystemExit(f"{ckpt}: its top-k view's tail is not flat (copy_tail_offset or tail_prior); "
                                 f"this benchmark scores the plain view")
            ce = cross_entropies(data, load_plugin(ckpt), weights, config.training.get("top_k"))
            result["cross_entropy"][name][set_name] = dict(zip(map(str, weights), ce))
            result["best_weight"][name][set_name] = weights[min(range(len(ce)), key=ce.__getitem__)]
            print(set_name, name, {w: round(c, 3) for w, c in zip(weights, ce)})

    out = Path(args.results) / f"{protocol_name}_{short}_strength"
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"**{args.dataset}**, base `{short}`: teacher-forced cross-entropy (nats per target token) of "
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
