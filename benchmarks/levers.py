"""The plugin's levers, each measured on the select split only (never on test).

    python -m benchmarks.levers --dataset e2e                       # every lever in LEVERS
    python -m benchmarks.levers --levers default,expert_penalty     # some of them

A lever is a way to train the plugin (``RunSpec`` / ``TrainConfig`` fields) and a way to decode
with it (processor arguments). For each lever this trains the plugin on the protocol's fit split
(or reuses a run with the same training: levers that differ only in decoding share one), decodes
a fixed random sample of the select inputs through vLLM with the processor (greedy, stop at a
newline, the quality benchmark's sample and prompts), and scores BLEU and ROUGE-L against the
select references, overall and (E2E) on select inputs whose venue the fit split saw or did not
see. The zero-shot base decodes the same inputs as the reference row. The table also carries
each run's select cross-entropy (exact, nats per target token), its epochs, best epoch and
seconds per epoch.

Writes ``benchmarks/results/levers_<protocol>_<base>.json`` and ``.md``. Runs live beside the
quality benchmark's (``<runs>/<protocol>-<base>/``): the default lever's training is the quality
benchmark's ``recurrent`` plugin, reused as is.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from benchmarks.protocols import DEFAULT_MAX_TOKENS, grouped_test, venue_slices
from benchmarks.quality import RESULTS, check_inputs, engine, generate_jobs, read_generations, score_sliced

# name: (what it changes, training overrides ({"train": {...}} for TrainConfig), processor arguments)
LEVERS: dict[str, tuple[str, dict, dict]] = {
    "default": ("the default plugin: GRU d=256, 5 epochs, exact softmax", {}, {}),
    "frequency_penalty": ("decode with vLLM's frequency penalty 0.5 (plugin_frequency_penalty)", {},
                          {"plugin_frequency_penalty": 0.5}),
    "expert_penalty": ("decode with the paper's penalty 1.1: each expert, generated tokens only", {},
                       {"plugin_expert_repetition_penalty": 1.1}),
    "sampled": ("train with a sampled softmax (1,024 negatives, the base's top 32 exact), 5 epochs",
                {"train": {"negatives": 1024}}, {}),
    "converge": ("sampled softmax, batches by prompt, up to 40 epochs, patience 3",
                 {"train": {"negatives": 1024, "group_by_prompt": True, "epochs": 40, "patience": 3}}, {}),
    "converge_wd": ("converge, with AdamW weight decay 0.1",
                    {"train": {"negatives": 1024, "group_by_prompt": True, "epochs": 40, "patience": 3,
                               "weight_decay": 0.1}}, {}),
    "half_strength": ("the default plugin at strength 0.5", {}, {"plugin_weight": 0.5}),
    "name_swap": ("half the fit inputs with invented venue names (training.data.swap_names)",
                  {"name_swap": 0.5}, {}),
    "gate": ("the default plugin with a per-position strength fitted on select (CombLM-style)",
             {"gate": True}, {}),
}


def train_key(overrides: dict) -> str:
    """The run folder of a lever's training: ``recurrent`` (the quality benchmark's plugin) for
    the default, else ``lever-<hash of the overrides>``."""
    if not overrides:
        return "recurrent"
    return "lever-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]


def decoding_key(extra: dict) -> str:
    """A lever's processor arguments in its generations' file name, so changing them regenerates."""
    return hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]


def train_lever(protocol, base_path: str, root: Path, overrides: dict) -> tuple[str, dict]:
    """Train (or reuse) a lever's plugin; (checkpoint folder, its metrics)."""
    from vllm_plugin.training.pipeline import RunSpec, run
    from vllm_plugin.training.train import TrainConfig

    from vllm_plugin.checkpoint import read_config

    out = root / train_key(overrides)
    if (out / "metrics.json").is_file():
        if read_config(out / "checkpoint").training.get("split", "input") != protocol.split:
            raise SystemExit(f"{out} was trained on another split than {protocol.split!r}: move it away "
                             f"(or pass another --runs) to retrain")
    else:
        spec_fields = {k: v for k, v in overrides.items() if k != "train"}
        spec = RunSpec(dataset=protocol.dataset, base=base_path, split=protocol.split, arch="gru", out=str(out),
                       train=TrainConfig(**{"epochs": 5, **overrides.get("train", {})}), **spec_fields)
        print(f"training {out.name}: {overrides}")
        run(spec, examples=protocol.train_examples)
    return str(out / "checkpoint"), json.loads((out / "metrics.json").read_text())


def lever_params(name: str, extra: dict, max_tokens: int):
    from vllm import SamplingParams

    args = None if name == "zero_shot" else {"plugin": name, **extra}
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n"], extra_args=args)


def run_summary(metrics: dict) -> dict:
    history = metrics.get("history", [])
    ce = (metrics.get("gate") or {}).get("select_loss_gated") or metrics.get("best_select_loss_exact")
    return {"select_ce": ce if ce is not None else metrics.get("best_select_loss"),
            "base_select_ce": metrics.get("base_select_loss"), "best_epoch": metrics.get("best_epoch"),
            "epochs_run": len(history),
            "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history) if history else None}


def write_report(result: dict, out_base: Path) -> None:
    out_base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    slices = [k for k in ("venue_seen", "venue_unseen") if k in result["rows"]["zero_shot"]["select"]]
    lines = [f"**{result['protocol_name']}**, base `{result['base_model']}`: levers on {result['select_inputs']} "
             f"select inputs (greedy, stop at a newline). BLEU / ROUGE-L" + (
                 "; then on select inputs whose venue the fit split saw / did not see" if slices else "")
             + "; select cross-entropy (nats/token, exact) of the lever's plugin.", "",
             "| lever | what | BLEU / ROUGE-L" + "".join(f" | {k}" for k in slices) + " | select CE | epochs (best) | s/epoch |",
             "|---|---|---|" + "---|" * len(slices) + "---|---|---|"]
    for name, row in result["rows"].items():
        s = row["select"]
        cells = [f"{s['bleu']:.2f} / {s['rouge_l']:.3f}"]
        cells += [f"{s[k]['bleu']:.2f} / {s[k]['rouge_l']:.3f}" for k in slices]
        t = row.get("training") or {}
        cells += [f"{t['select_ce']:.3f}" if t.get("select_ce") is not None else "",
                  f"{t['epochs_run']} ({t['best_epoch']})" if t else "",
                  f"{t['seconds_per_epoch']:.0f}" if t.get("seconds_per_epoch") else ""]
        lines.append(f"| {name} | {row['what']} | " + " | ".join(cells) + " |")
    out_base.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="e2e", choices=["e2e", "webnlg"])
    parser.add_argument("--split", choices=["venue", "input"])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--base-name")
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of: {', '.join(LEVERS)}")
    parser.add_argument("--select-subset", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, help="output token limit (default per dataset, as the quality benchmark)")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--runs", default="runs/quality")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.levers.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {unknown}; known: {', '.join(LEVERS)}")
    from vllm_plugin.serving import fast_dtype

    args.dtype = fast_dtype()
    args.max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[args.dataset]
    protocol, base_path, base_config, base_name = check_inputs(args)
    root = Path(args.runs) / f"{protocol.name}-{base_name}"
    prompts, references = grouped_test(protocol.select, args.select_subset)
    slices = venue_slices(protocol.select, {dict(e.meta).get("venue") for e in protocol.fit}) \
        if protocol.dataset == "e2e" else {}
    trained = {name: train_lever(protocol, str(base_path), root, LEVERS[name][1]) for name in names}
    gen_dir = root / "generations" / f"select{args.select_subset or '-all'}" / f"max{args.max_tokens}-{args.dtype}"
    stems = {"zero_shot": "zero_shot@rp1-fp0", **{n: f"lever-{n}-{train_key(LEVERS[n][1])}-{decoding_key(LEVERS[n][2])}"
                                                  for n in names}}
    todo = {stems[n]: (n, lever_params(n, LEVERS[n][2] if n in LEVERS else {}, args.max_tokens))
            for n in stems if not (gen_dir / f"{stems[n]}.jsonl").is_file()}
    if todo:
        llm = engine(str(base_path), {n: trained[n][0] for n in names}, base_config, args)
        generate_jobs(llm, todo, prompts, [], gen_dir, args.chunk, "select levers")
        del llm
    rows = {}
    for n, stem in stems.items():
        outputs = [r["output"] for r in read_generations(gen_dir / f"{stem}.jsonl", prompts)]
        rows[n] = {"what": "the base alone, no plugin" if n == "zero_shot" else LEVERS[n][0],
                   "training": None if n == "zero_shot" else {"overrides": LEVERS[n][1], "decoding": LEVERS[n][2],
                                                              **run_summary(trained[n][1])},
                   "select": score_sliced(outputs, prompts, references, slices, ("bleu", "rouge_l"))}
    result = {"dataset": args.dataset, "protocol_name": protocol.name, "base_model": base_name,
              "protocol": protocol.description, "select_inputs": len(prompts), "rows": rows}
    out = Path(args.results) / f"levers_{protocol.name}_{base_name}"
    write_report(result, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
