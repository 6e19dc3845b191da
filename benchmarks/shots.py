"""Which drawn in-context example prompts the base best, chosen on the select split (never test).

    python -m benchmarks.shots --dataset e2e --split venue --seeds 8

``icl_1``'s example is the first of a seeded draw of fit examples (``data.in_context_shots``,
seed 0 in every table). For each seed below ``--seeds`` this decodes the levers' select sample
with the base alone behind that seed's example (greedy, no penalty, stop at a newline: the lever
table's ``icl_1`` row, which is seed 0's and is reused), scores BLEU and ROUGE-L overall and by
slice, and names the seed of the best select BLEU ``"chosen"``: the example a plugin trained
behind (``RunSpec.shot_seed``, the levers' ``_shot<seed>`` rows) and ``icl_1`` itself would
then prompt with.

Writes ``benchmarks/results/shots_<protocol>_<base>.json`` and ``.md``.
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.levers import NO_PENALTY, lever_params, select_parser, select_sample
from benchmarks.protocols import slice_names
from benchmarks.quality import (engine, generate_jobs, icl_shots, read_generations, score_sliced, scores_file,
                                setting_label)


def stem(seed: int) -> str:
    """The generation file of seed ``seed``'s example; seed 0's is the levers' ``icl_1`` file."""
    return f"icl_1{'' if seed == 0 else f'_shot{seed}'}@{setting_label(NO_PENALTY)}"


def main(argv=None) -> None:
    parser = select_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=8, help="try the examples of seeds 0 to SEEDS - 1")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    protocol, base_path, base_config, base_name, _, gen_dir, prompts, references, slices = select_sample(args)
    shots = {seed: icl_shots(protocol, seed) for seed in range(args.seeds)}
    todo = [seed for seed in shots if not (gen_dir / f"{stem(seed)}.jsonl").is_file()]
    if todo:
        llm = engine(str(base_path), {}, base_config, args)
        for seed in todo:
            generate_jobs(llm, {stem(seed): ("icl_1", lever_params("icl_1", {}, args.max_tokens))}, prompts,
                          shots[seed], gen_dir, args.chunk, f"icl_1, seed {seed}'s example")
        del llm
    rows = {}
    for seed, s in shots.items():
        path = gen_dir / f"{stem(seed)}.jsonl"
        outputs = [r["output"] for r in read_generations(path, prompts)]
        example = s.drawn[0]
        rows[str(seed)] = {"example": {"input": example.group, "prompt": example.prompt, "target": example.target},
                           "select": score_sliced(outputs, prompts, references, slices, ("bleu", "rouge_l"),
                                                  cache=scores_file(path))}
    chosen = max(rows, key=lambda k: rows[k]["select"]["bleu"])
    result = {"dataset": args.dataset, "protocol_name": protocol.name, "base_model": base_name,
              "protocol": protocol.description, "select_inputs": len(prompts), "max_tokens": args.max_tokens,
              "dtype": args.dtype, "decoding": NO_PENALTY, "chosen": int(chosen), "rows": rows}
    out = Path(args.results) / f"shots_{protocol.name}_{base_name}"
    out.with_name(out.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    names = slice_names(rows["0"]["select"])
    lines = [f"**{protocol.name}**, base `{base_name}`: the base behind one drawn example per seed, on "
             f"{len(prompts)} select inputs (greedy, no penalty). BLEU / ROUGE-L" + "".join(f"; {k}" for k in names)
             + f". Chosen: seed {chosen}.", "",
             "| seed | example (input) | BLEU / ROUGE-L" + "".join(f" | {k}" for k in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for seed, row in rows.items():
        s = row["select"]
        lines.append(f"| {seed} | {row['example']['input']} | {s['bleu']:.2f} / "
                     f"{s['rouge_l']:.3f}" + "".join(f" | {s[k]['bleu']:.2f} / {s[k]['rouge_l']:.3f}" for k in names)
                     + " |")
    out.with_name(out.name + ".md").write_text("\n".join(lines) + "\n")
    print(out.with_name(out.name + ".md").read_text())


if __name__ == "__main__":
    main()
