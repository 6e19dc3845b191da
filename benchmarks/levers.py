"""The plugin's levers, each measured on the select split only (never on test).

    python -m benchmarks.levers --dataset e2e                       # every lever in LEVERS
    python -m benchmarks.levers --levers default,expert_penalty     # some of them

A lever is a way to train the plugin (``RunSpec`` / ``TrainConfig`` fields) and a way to decode
with it (processor arguments). For each lever this trains the plugin on the protocol's fit split
(or reuses a run with the same training: levers that differ only in decoding share one), decodes
a fixed random sample of the select inputs through vLLM with the processor (greedy, stop at a
newline, the quality benchmark's sample and prompts), and scores BLEU and ROUGE-L against the
select references, overall and (E2E) on select inputs whose venue the fit split saw or did not
see. The zero-shot base decodes the same inputs as the reference row (and the in-context base
beside a lever that prompts with an example, ``on_icl_1``). The table also carries
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
from typing import NamedTuple

from benchmarks.protocols import (DEFAULT_MAX_TOKENS, PROTOCOL_SPLITS, Protocol, grouped_test, held_out_slices,
                                  select_slices, slice_key, slice_names)
from benchmarks.quality import (DTYPE, RESULTS, check_inputs, engine, generate_jobs, icl_shots, read_generations,
                                score_sliced, scores_file, setting_label, start_from)


class Lever(NamedTuple):
    """One change from the default plugin: how it trains (``RunSpec`` fields, ``{"train": {...}}``
    for ``TrainConfig``), how it decodes (processor arguments) and what text the engine gets
    (``prompt``: a system of the quality benchmark, e.g. ``icl_1`` for one in-context example)."""
    what: str
    training: dict = {}
    decoding: dict = {}
    prompt: str = "zero_shot"


# The training of the levers behind icl_1's example, which the later levers vary; a lever's run
# folder is a hash of its training overrides (``train_key``), however the dict is built.
ICL1 = {"shortlist_min_count": 1, "copy": True, "shots": 1}
ICL1_GATE = {**ICL1, "gate": True}
ICL1_TASK = {**ICL1, "copy_task_only": True}
ICL1_TASK_GATE = {**ICL1_TASK, "gate": True}
ICL1_TASK_PENDING_GATE = {**ICL1_TASK_GATE, "copy_pending": True}
ICL1_TASK_NEAREST_GATE = {**ICL1_TASK_GATE, "nearest_shot": True}
ICL1_TASK_NEAREST_READ_GATE = {**ICL1_TASK_NEAREST_GATE, "read_task_only": True}
ICL1_TASK_NEAREST_EXAMPLE_GATE = {**ICL1_TASK_NEAREST_GATE, "copy_example": True}
ICL1_TASK_EXAMPLE_GATE = {**ICL1_TASK_GATE, "copy_example": True}
ICL1_TASK_CANDIDATES_GATE = {**ICL1_TASK_GATE, "base_candidates": 20}
ICL1_TASK_BAG_GATE = {**ICL1_TASK_GATE, "input_bag": True}
ICL1_TASK_SAMPLED_GATE = {**ICL1_TASK_GATE, "train": {"scheduled_sampling": 0.25}}
# The chosen recipe without the shortlist: the default trainer, exact softmax over the vocabulary.
FULL_ICL1_TASK_GATE = {k: v for k, v in ICL1_TASK_GATE.items() if k != "shortlist_min_count"}
LONG = {"train": {"epochs": 15, "patience": 3}}
# The paper's E2E schedule (its code: lr 5e-4, AdamW weight decay 10, up to 80 epochs, patience 5;
# batch 32 here, not its 8, to keep an epoch's cost); its plugin width (d=768) is a lever of its own.
PAPER_SCHEDULE = {"train": {"lr": 5e-4, "weight_decay": 10.0, "epochs": 80, "patience": 5}}

def with_fp_twin(name: str, lever: Lever) -> dict[str, Lever]:
    """The lever as ``name`` and, as ``<name>_fp0.5``, the same plugin decoded with vLLM's frequency
    penalty 0.5 (the quality grid's usual choice for plugin rows)."""
    return {name: lever, f"{name}_fp0.5": lever._replace(what=f"{name} decoded with frequency penalty 0.5",
                                                        decoding={**lever.decoding, "plugin_frequency_penalty": 0.5})}


LEVERS: dict[str, Lever] = {
    "default": Lever("the default plugin: GRU d=256, 5 epochs, exact softmax"),
    "frequency_penalty": Lever("decode with vLLM's frequency penalty 0.5 (plugin_frequency_penalty)",
                               decoding={"plugin_frequency_penalty": 0.5}),
    "expert_penalty": Lever("decode with the paper's penalty 1.1: each expert, generated tokens only",
                            decoding={"plugin_expert_repetition_penalty": 1.1}),
    "half_strength": Lever("the default plugin at strength 0.5", decoding={"plugin_weight": 0.5}),
    "on_icl_1": Lever("the default plugin on the base prompted with one in-context example", prompt="icl_1"),
    "sampled": Lever("train with a sampled softmax (1,024 negatives, the base's top 32 exact), 5 epochs",
                     training={"train": {"negatives": 1024}}),
    "converge": Lever("sampled softmax, batches by prompt, up to 40 epochs, patience 3",
                      training={"train": {"negatives": 1024, "group_by_prompt": True, "epochs": 40, "patience": 3}}),
    "converge_wd": Lever("converge, with AdamW weight decay 0.1",
                         training={"train": {"negatives": 1024, "group_by_prompt": True, "epochs": 40, "patience": 3,
                                             "weight_decay": 0.1}}),
    "name_swap": Lever("sampled, with invented venue names in half the fit inputs (training.data.swap_names)",
                       training={"name_swap": 0.5, "train": {"negatives": 1024}}),
    "gate": Lever("the default plugin with a per-position strength fitted on select (CombLM-style)",
                  training={"gate": True}),
    "copy": Lever("sampled, with copy scores: a learned per-position bonus on the prompt's tokens",
                  training={"copy": True, "train": {"negatives": 1024}}),
    "copy_name_swap": Lever("copy, with invented venue names in half the fit inputs",
                            training={"copy": True, "name_swap": 0.5, "train": {"negatives": 1024}}),
    "copy_gate": Lever("copy, with a per-position strength fitted on select",
                       training={"copy": True, "gate": True, "train": {"negatives": 1024}}),
    "shortlist": Lever("a shortlist: the plugin scores the fit split's tokens, one shared logit for the rest; "
                       "the exact loss at the shortlist's cost, 5 epochs",
                       training={"shortlist_min_count": 1}),
    "shortlist_copy": Lever("shortlist, with copy scores", training={"shortlist_min_count": 1, "copy": True}),
    "shortlist_copy_gate": Lever("shortlist_copy, with a per-position strength fitted on select",
                                 training={"shortlist_min_count": 1, "copy": True, "gate": True}),
    "shortlist_copy_converge": Lever("shortlist_copy, batches by prompt, up to 40 epochs, patience 3",
                                     training={"shortlist_min_count": 1, "copy": True,
                                               "train": {"group_by_prompt": True, "epochs": 40, "patience": 3}}),
    "shortlist_copy_converge_gate": Lever("shortlist_copy_converge, with a per-position strength fitted on select",
                                          training={"shortlist_min_count": 1, "copy": True, "gate": True,
                                                    "train": {"group_by_prompt": True, "epochs": 40, "patience": 3}}),
    "shortlist_copy_dropout": Lever("shortlist_copy with dropout 0.3 (default 0.1)",
                                    training={"shortlist_min_count": 1, "copy": True, "dropout": 0.3}),
    "shortlist_copy_wd": Lever("shortlist_copy with AdamW weight decay 1.0 (default 0.01)",
                               training={"shortlist_min_count": 1, "copy": True, "train": {"weight_decay": 1.0}}),
    "shortlist_copy_wide": Lever("shortlist_copy with d_model 512 (3.9x the GRU's parameters)",
                                 training={"shortlist_min_count": 1, "copy": True, "d_model": 512}),
    "shortlist_copy_icl1": Lever("shortlist_copy trained against the base prompted with one in-context example, "
                                 "decoded on that prompt", training=ICL1, prompt="icl_1"),
    "shortlist_copy_gate_icl1": Lever("shortlist_copy_icl1, with a per-position strength fitted on select",
                                      training=ICL1_GATE, prompt="icl_1"),
    "shortlist_copy_gate_icl1_w0.75": Lever("shortlist_copy_gate_icl1 at strength 0.75 (the gate's output times 0.75)",
                                            training=ICL1_GATE, decoding={"plugin_weight": 0.75}, prompt="icl_1"),
    "shortlist_copy_gate_icl1_w1.5": Lever("shortlist_copy_gate_icl1 at strength 1.5 (the gate's output times 1.5)",
                                           training=ICL1_GATE, decoding={"plugin_weight": 1.5}, prompt="icl_1"),
    "shortlist_copy_icl1_task": Lever("shortlist_copy_icl1 with copy scores on the task's input only, not the "
                                      "example's (--copy-task-only)", training=ICL1_TASK, prompt="icl_1"),
    "shortlist_copy_gate_icl1_task": Lever("shortlist_copy_icl1_task, with a per-position strength fitted on select",
                                           training=ICL1_TASK_GATE, prompt="icl_1"),
    "shortlist_copy_gate_icl1_task_long": Lever("shortlist_copy_gate_icl1_task, up to 15 epochs, patience 3",
                                                training={**ICL1_TASK_GATE, **LONG}, prompt="icl_1"),
    "shortlist_copy_gate_icl1_task_fp0.5": Lever("shortlist_copy_gate_icl1_task decoded with frequency penalty 0.5 "
                                                 "(the quality benchmark's choice for it on SmolLM2)",
                                                 training=ICL1_TASK_GATE, decoding={"plugin_frequency_penalty": 0.5},
                                                 prompt="icl_1"),
    "shortlist_copy_gate_icl1_task_pending": Lever("shortlist_copy_gate_icl1_task with pending-copy scores: a second "
                                                   "bonus on the task's tokens the output has not said yet "
                                                   "(--copy-pending)", training=ICL1_TASK_PENDING_GATE, prompt="icl_1"),
    "shortlist_copy_gate_icl1_task_pending_fp0.5": Lever("shortlist_copy_gate_icl1_task_pending decoded with frequency "
                                                         "penalty 0.5", training=ICL1_TASK_PENDING_GATE,
                                                         decoding={"plugin_frequency_penalty": 0.5}, prompt="icl_1"),
    "shortlist_copy_gate_icl1_task_nearest": Lever("shortlist_copy_gate_icl1_task with, per input, the fit example "
                                                   "most like it as the in-context example (--nearest-shot), in "
                                                   "training and decoding", training=ICL1_TASK_NEAREST_GATE,
                                                   prompt="icl_1_nearest"),
    "shortlist_copy_gate_icl1_task_nearest_fp0.5": Lever("shortlist_copy_gate_icl1_task_nearest decoded with frequency "
                                                         "penalty 0.5", training=ICL1_TASK_NEAREST_GATE,
                                                         decoding={"plugin_frequency_penalty": 0.5},
                                                         prompt="icl_1_nearest"),
    "shortlist_copy_gate_icl1_task_nearest_apart_fp0.5": Lever(
        "shortlist_copy_gate_icl1_task_nearest_fp0.5, each fit input's example from another venue "
        "(--nearest-apart venue), as far from it as a new input's", training={**ICL1_TASK_NEAREST_GATE,
                                                                             "nearest_apart": "venue"},
        decoding={"plugin_frequency_penalty": 0.5}, prompt="icl_1_nearest"),
    **with_fp_twin("shortlist_copy_gate_icl1_task_nearest_read", Lever(
        "shortlist_copy_gate_icl1_task_nearest, the plugin reading the task's segment only (--read-task-only): "
        "the base reads the example, the plugin what it reads on the plain prompt",
        training=ICL1_TASK_NEAREST_READ_GATE, prompt="icl_1_nearest")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_nearest_example", Lever(
        "shortlist_copy_gate_icl1_task_nearest with example scores (--copy-example): a learned bonus on the "
        "example's tokens that the task does not hold", training=ICL1_TASK_NEAREST_EXAMPLE_GATE,
        prompt="icl_1_nearest")),
    "shortlist_copy_gate_icl1_task_example_fp0.5": Lever(
        "shortlist_copy_gate_icl1_task_fp0.5 with example scores (--copy-example)", training=ICL1_TASK_EXAMPLE_GATE,
        decoding={"plugin_frequency_penalty": 0.5}, prompt="icl_1"),
    "shortlist_copy_gate_icl1_task_fp1": Lever("shortlist_copy_gate_icl1_task decoded with frequency penalty 1.0, "
                                               "past the quality benchmark's grid",
                                               training=ICL1_TASK_GATE, decoding={"plugin_frequency_penalty": 1.0},
                                               prompt="icl_1"),
    **with_fp_twin("shortlist_copy_gate_icl1_task_candidates", Lever(
        "shortlist_copy_gate_icl1_task with candidate scores (--base-candidates 20): a learned bonus on the base's "
        "20 most likely next tokens, by rank bucket", training=ICL1_TASK_CANDIDATES_GATE, prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_ss0.25", Lever(
        "shortlist_copy_gate_icl1_task with scheduled sampling (--scheduled-sampling 0.25): a quarter of the target "
        "tokens the plugin reads are its own greedy choices", training=ICL1_TASK_SAMPLED_GATE, prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_bag", Lever(
        "shortlist_copy_gate_icl1_task with an input bag (--input-bag): a learned vector per token, averaged over "
        "the task's input and added to the hidden state at every position", training=ICL1_TASK_BAG_GATE,
        prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_shot6", Lever(
        "shortlist_copy_gate_icl1_task behind seed 6's drawn example (--shot-seed 6), the one the base does best "
        "behind on select (benchmarks.shots)", training={**ICL1_TASK_GATE, "shot_seed": 6}, prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_value_swap", Lever(
        "shortlist_copy_gate_icl1_task with half the fit inputs' attribute values swapped for others of the same "
        "field, in input and references (--value-swap 0.5)", training={**ICL1_TASK_GATE, "value_swap": 0.5},
        prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_value_swap_gatev", Lever(
        "shortlist_copy_gate_icl1_task_value_swap with its gate fitted on select with the values redrawn "
        "(--gate-values)", training={**ICL1_TASK_GATE, "value_swap": 0.5, "gate_values": True}, prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_value_swap1", Lever(
        "shortlist_copy_gate_icl1_task_value_swap with every fit input's stated values swapped (--value-swap 1)",
        training={**ICL1_TASK_GATE, "value_swap": 1.0}, prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_value_name_swap", Lever(
        "shortlist_copy_gate_icl1_task_value_swap with invented venue names in half the fit inputs too "
        "(--name-swap 0.5)", training={**ICL1_TASK_GATE, "value_swap": 0.5, "name_swap": 0.5}, prompt="icl_1")),
    **with_fp_twin("copy_gate_icl1_task", Lever(
        "shortlist_copy_gate_icl1_task without the shortlist: the plugin scores the whole vocabulary, exact softmax "
        "(the default trainer)", training=FULL_ICL1_TASK_GATE, prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_paper_schedule", Lever(
        "shortlist_copy_gate_icl1_task trained on the paper's schedule: lr 5e-4, weight decay 10, up to 80 epochs, "
        "patience 5 (batch 32)", training={**ICL1_TASK_GATE, **PAPER_SCHEDULE}, prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_d768", Lever(
        "shortlist_copy_gate_icl1_task at the paper's plugin width, d_model 768", training={**ICL1_TASK_GATE,
                                                                                            "d_model": 768},
        prompt="icl_1")),
    **with_fp_twin("shortlist_copy_gate_icl1_task_d768_grouped", Lever(
        "shortlist_copy_gate_icl1_task_d768 with batches of whole prompt groups (--group-by-prompt: the GRU reads "
        "each prompt once per batch, packed)", training={**ICL1_TASK_GATE, "d_model": 768,
                                                          "train": {"group_by_prompt": True}}, prompt="icl_1")),
    "transformer_shortlist_copy_icl1": Lever("shortlist_copy_icl1 with the paper's plugin: a 1-layer GPT-2-style "
                                             "decoder (d=256, 4 heads) that attends over the prompt",
                                             training={**ICL1, "arch": "transformer"}, prompt="icl_1"),
    "transformer_shortlist_copy_gate_icl1": Lever("transformer_shortlist_copy_icl1, with a per-position strength "
                                                  "fitted on select",
                                                  training={**ICL1_GATE, "arch": "transformer"}, prompt="icl_1"),
    "transformer_shortlist_copy_gate_icl1_long": Lever("transformer_shortlist_copy_gate_icl1, up to 15 epochs, "
                                                       "patience 3",
                                                       training={**ICL1_GATE, "arch": "transformer", **LONG},
                                                       prompt="icl_1"),
}
# Base rows decoded beside the levers, from the quality benchmark's files where it made them.
REFERENCES = {"zero_shot": "the base alone, no plugin", "icl_1": "the base alone, one in-context example",
              "icl_1_nearest": "the base alone, one in-context example: per input, the fit example most like it"}
NO_PENALTY = {"repetition_penalty": 1.0, "frequency_penalty": 0.0}


def train_key(overrides: dict) -> str:
    """The run folder of a lever's training: ``recurrent`` (the quality benchmark's plugin) for
    the default, else ``lever-<hash of the overrides>``."""
    if not overrides:
        return "recurrent"
    return "lever-" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]


def decoding_key(extra: dict) -> str:
    """A lever's processor arguments in its generations' file name, so changing them regenerates."""
    return hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]


# RunSpec fields that act only after training (a gate fitted on the trained plugin): a lever that
# adds them starts from the training of the lever without them (the default's, for gate) instead
# of repeating it.
AFTER_TRAINING = {"gate", "gate_values"}


def train_lever(protocol, base_path: str, root: Path, overrides: dict) -> tuple[str, dict]:
    """Train (or reuse) a lever's plugin; (checkpoint folder, its metrics)."""
    from vllm_plugin.training.pipeline import RunSpec, run, run_finished
    from vllm_plugin.training.train import TrainConfig

    from vllm_plugin.checkpoint import read_config

    out = root / train_key(overrides)
    spec_fields = {k: v for k, v in overrides.items() if k != "train"}
    spec = RunSpec(dataset=protocol.dataset, base=base_path, split=protocol.split, out=str(out),
                   train=TrainConfig(**{"epochs": 5, **overrides.get("train", {})}), **spec_fields)
    if run_finished(spec):
        if read_config(out / "checkpoint").training.get("split", "input") != protocol.split:
            raise SystemExit(f"{out} was trained on another split than {protocol.split!r}: move it away "
                             f"(or pass another --runs) to retrain")
    else:
        trained_as = {k: v for k, v in overrides.items() if k not in AFTER_TRAINING}
        if trained_as != overrides:  # e.g. copy_gate starts from copy's finished training
            start_from(root / train_key(trained_as), out)
        print(f"training {out.name}: {overrides}")
        run(spec, examples=protocol.train_examples)
    return str(out / "checkpoint"), json.loads((out / "metrics.json").read_text())


def lever_params(name: str, extra: dict, max_tokens: int):
    from vllm import SamplingParams

    args = None if name in REFERENCES else {"plugin": name, **extra}
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["\n"], extra_args=args)


def run_summary(metrics: dict) -> dict:
    history = metrics.get("history", [])
    ce = (metrics.get("gate") or {}).get("select_loss_gated") or metrics.get("best_select_loss_exact")
    return {"select_ce": ce if ce is not None else metrics.get("best_select_loss"),
            "base_select_ce": metrics.get("base_select_loss"), "best_epoch": metrics.get("best_epoch"),
            "epochs_run": len(history),
            "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history) if history else None}


VIEWS = {"real": "", "values": " with their attribute values redrawn (values_view)"}


def write_report(result: dict, out_base: Path, sliced_by: str | None = None) -> None:
    """The JSON and a Markdown table; ``sliced_by``: the meta field select scores are sliced by
    (``protocols.slice_key``), if any."""
    out_base.with_name(out_base.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    slices = slice_names(result["rows"]["zero_shot"]["select"])
    lines = [f"**{result['protocol_name']}**, base `{result['base_model']}`: levers on {result['select_inputs']} "
             f"select inputs{VIEWS[result.get('select_view', 'real')]} (greedy, stop at a newline). BLEU / ROUGE-L" + (
                 f"; then on select inputs whose {sliced_by} the fit split saw / did not see" if slices else "")
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
    out_base.with_name(out_base.name + ".md").write_text("\n".join(lines) + "\n")


def select_parser(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that decodes the select sample (this one, ``benchmarks.shots``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="e2e", choices=["e2e", "webnlg"])
    parser.add_argument("--split", choices=PROTOCOL_SPLITS)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--base-name")
    parser.add_argument("--select-subset", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, help="output token limit (default per dataset, as the quality benchmark)")
    parser.add_argument("--eager", action="store_true")
    parser.add_argument("--dtype", default=DTYPE, help="the engine's dtype (default float32, as the quality benchmark)")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--runs", default="runs/quality")
    parser.add_argument("--results", default=str(RESULTS))
    return parser


class SelectSample(NamedTuple):
    """The select sample the quality benchmark decodes, with its base and where its files go:
    ``root`` is the protocol's runs folder and ``gen_dir`` the sample's generation folder, named as
    the quality benchmark names them, so each reuses the other's files."""
    protocol: Protocol
    base_path: Path
    base_config: dict
    base_name: str
    root: Path
    gen_dir: Path
    prompts: list[str]
    references: list[list[str]]
    slices: dict


def select_sample(args) -> SelectSample:
    """Check ``args`` (``select_parser``'s; fills in ``args.max_tokens``) and open the select sample.
    Raises SystemExit naming the missing data or base, as ``quality.check_inputs``."""
    args.max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS[args.dataset]
    protocol, base_path, base_config, base_name = check_inputs(args)
    root = Path(args.runs) / f"{protocol.name}-{base_name}"
    gen_dir = root / "generations" / f"select{args.select_subset or '-all'}" / f"max{args.max_tokens}-{args.dtype}"
    prompts, references = grouped_test(protocol.select, args.select_subset)
    return SelectSample(protocol, base_path, base_config, base_name, root, gen_dir, prompts, references,
                        select_slices(protocol))


def values_view(protocol, prompts: list[str]) -> tuple[list[str], list[list[str]], dict[str, set[str]]]:
    """The select sample ``prompts`` with their attribute values redrawn (E2E): every select input
    rewritten by ``data.swap_values`` (each value its references state word for word becomes another
    that field takes in fit or select, drawn uniformly), references alike. Select as it would read if
    its inputs named values as evenly as the fitting data's own values allow, not as ``devel`` happens
    to (84 % coffee shops): a view of select built without test. (prompts, references, venue slices)."""
    from vllm_plugin.training.data import swap_values

    if protocol.dataset != "e2e":
        raise SystemExit("--select-view values rewrites E2E attribute values: it is for --dataset e2e")
    keep = set(prompts)
    swapped = swap_values(protocol.select, 1.0, values_from=protocol.fit + protocol.select)
    view = [s for e, s in zip(protocol.select, swapped) if e.prompt in keep]
    prompts, references = grouped_test(view, None)
    return prompts, references, held_out_slices(view, {dict(e.meta).get("venue") for e in protocol.fit})


def main(argv=None) -> None:
    parser = select_parser(__doc__)
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of: {', '.join(LEVERS)}")
    parser.add_argument("--select-view", default="real", choices=["real", "values"],
                        help="values: decode and score the select sample with its attribute values redrawn "
                             "(values_view); results and generations apart from the real sample's")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.levers.split(",") if n.strip()]
    unknown = [n for n in names if n not in LEVERS]
    if unknown:
        parser.error(f"unknown lever(s) {unknown}; known: {', '.join(LEVERS)}")
    protocol, base_path, base_config, base_name, root, gen_dir, prompts, references, slices = select_sample(args)
    view = "" if args.select_view == "real" else f"_{args.select_view}"
    if view:
        prompts, references, slices = values_view(protocol, prompts)
        gen_dir = gen_dir.parent.with_name(gen_dir.parent.name + view) / gen_dir.name
    trained = {name: train_lever(protocol, str(base_path), root, LEVERS[name].training) for name in names}
    # The prompt style is in the stem only when it is not the default, so earlier files stay valid.
    stems = {**{r: f"{r}@{setting_label(NO_PENALTY)}" for r in REFERENCES if r == "zero_shot" or any(
                 LEVERS[n].prompt == r for n in names)},
             **{n: f"lever-{n}-{train_key(LEVERS[n].training)}-{decoding_key(LEVERS[n].decoding)}"
                   + ("" if LEVERS[n].prompt == "zero_shot" else f"-{LEVERS[n].prompt}") for n in names}}
    todo = {stem: (n if n in REFERENCES else LEVERS[n].prompt,
                   lever_params(n, LEVERS[n].decoding if n in LEVERS else {}, args.max_tokens))
            for n, stem in stems.items() if not (gen_dir / f"{stem}.jsonl").is_file()}
    # The quality benchmark's in-context examples (seed 0), so its icl files are reused as they
    # are; a lever trained behind another draw (``shot_seed``) is prompted with that draw's.
    seed_of = {stems[n]: (LEVERS[n].training.get("shot_seed") or 0) if n in LEVERS else 0 for n in stems}
    if todo:
        llm = engine(str(base_path), {n: trained[n][0] for n in names}, base_config, args)
        for seed in sorted({seed_of[stem] for stem in todo}):
            generate_jobs(llm, {stem: job for stem, job in todo.items() if seed_of[stem] == seed}, prompts,
                          icl_shots(protocol, seed), gen_dir, args.chunk, "select levers")
        del llm
    rows = {}
    for n, stem in stems.items():
        path = gen_dir / f"{stem}.jsonl"
        outputs = [r["output"] for r in read_generations(path, prompts)]
        rows[n] = {"what": REFERENCES[n] if n in REFERENCES else LEVERS[n].what,
                   "training": None if n in REFERENCES else {"overrides": LEVERS[n].training,
                                                             "decoding": LEVERS[n].decoding,
                                                             "prompt": LEVERS[n].prompt,
                                                             **run_summary(trained[n][1])},
                   "select": score_sliced(outputs, prompts, references, slices, ("bleu", "rouge_l"),
                                          cache=scores_file(path))}
    out = Path(args.results) / f"levers_{protocol.name}_{base_name}{view}"
    result = {"dataset": args.dataset, "protocol_name": protocol.name, "base_model": base_name,
              "protocol": protocol.description, "select_view": args.select_view, "select_inputs": len(prompts),
              "max_tokens": args.max_tokens, "dtype": args.dtype, "rows": rows}
    report = out.with_name(out.name + ".json")  # not with_suffix: base names hold dots (qwen2.5-...)
    if report.is_file():  # a run of some levers adds their rows to the table
        previous = json.loads(report.read_text())
        previous.setdefault("max_tokens", args.max_tokens)  # tables from before these were recorded:
        previous.setdefault("dtype", DTYPE)  # the defaults of then
        same = ("protocol", "select_inputs", "max_tokens", "dtype")
        if all(previous[k] == result[k] for k in same):
            order = list(REFERENCES) + list(LEVERS)
            merged = {**previous["rows"], **rows}  # rows of levers since renamed go last
            result["rows"] = dict(sorted(merged.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order
                                         else len(order)))
    write_report(result, out, slice_key(protocol))
    print(out.with_name(out.name + ".md").read_text())


if __name__ == "__main__":
    main()
