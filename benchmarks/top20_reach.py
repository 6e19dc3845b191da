"""What a closed API's top-k view hides of the references: the base's rank of each reference token.

A plugin trained from top-k log-probs sees the base's k most likely tokens exactly and every other
token at one flat log-prob, the mass left over spread evenly over the rest of the vocabulary
(``experts.top_k_with_flat_tail``); the processor decodes against the same view. A reference token
the base ranks below k is then scored far below its true log-prob, and only the plugin can lift it.
This script measures, teacher-forced on the chosen recipe's select split (the prompts behind its
in-context example, from the full-logit cache the quality benchmark trains from), how often that
happens and by how much, for the tokens the reference copies from the task's input (names and
values: ``copied``) and the others, on select inputs whose venue the fit split saw and the others.

    python -m benchmarks.top20_reach --base qwen2.5-coder-0.5b
    -> benchmarks/results/top20_reach_e2e_<base>.json

``chosen_offset``: of the offsets tried for ``PluginConfig.copy_tail_offset`` (the view with the
task's tokens outside the top k at the k-th log-prob plus the offset), the one under which the base
alone predicts every select target token but EOS best (``classes.all.base_ce``); ``chosen_tail_prior``:
likewise, of the smoothings tried for ``PluginConfig.tail_prior`` (the view whose tail follows the
fit split's target unigram frequencies instead of spreading evenly).
Per class: ``tokens``; ``outside_top_k`` (share of them the base ranks below k);
``rank_quantiles`` (the 50th, 90th and 99th percentiles of their 1-based rank; a mean would be
dominated by a handful of tail tokens); ``base_ce`` (the base alone's cross-entropy on them, nats
per token: full, in the flat-tail view, in the lifted view at each offset, in the prior-tail view at
each smoothing); for the tokens outside
the top k, ``mean_log_prob`` (their exact base log-prob), ``mean_view_log_prob`` (the flat tail's
value there), ``mean_shortfall`` (the difference: how much the view understates them; ``mean_shortfall_tail_prior``
in the prior-tail view) and
``median_below_kth`` (their median distance below the k-th log-prob). No test data is read.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.protocols import base_name, load_protocol

RESULTS = Path(__file__).resolve().parent / "results"
RECIPE = "shortlist_copy_task_icl1"  # the chosen recipe's data: behind icl_1's drawn example


def task_input(prompt: list[int], marker: list[int]) -> set[int]:
    """The task's input tokens: ``prompt`` after its last ``marker`` (``model.copy_start``), what a
    reference copies."""
    from vllm_plugin.model import copy_start

    return set(prompt[copy_start(prompt, marker) + len(marker):])


def classify(splits, marker, eos: int):
    """Per flat target row of ``splits.select_ts``: whether the token is copied from the task's
    input (bool [N]) and the row's slice index ([N] into the returned names; -1 for EOS rows, left
    out)."""
    ts = splits.select_ts
    names = ["venue_seen", "venue_unseen"]
    fit_venues = {dict(e.meta).get("venue") for e in splits.fit_ex}
    copied, where = [], []
    for ex, prompt_index, target in zip(splits.select_ex, ts.example_prompt, ts.targets):
        copy_from = task_input(ts.prompts[prompt_index], marker)
        slice_index = int(dict(ex.meta).get("venue") not in fit_venues)
        for tok in target:
            copied.append(tok in copy_from)
            where.append(-1 if tok == eos else slice_index)
    return torch.tensor(copied), torch.tensor(where), names


OFFSETS = (0.0, -1.0, -2.0, -3.0, -4.0)
SMOOTHINGS = (0.001, 0.01, 0.1, 1.0)


def ranks_and_view(bl, ts, marker: list[int], k: int, fit_ts, rows_per_batch: int = 256):
    """For each target of ``ts`` (the full cache ``bl``'s rows): [N] its 1-based rank under the
    base, its exact log-prob, its log-prob in the top-k view with a flat tail, the k-th log-prob of
    its row, [N, len(OFFSETS)] its log-prob in the lifted view at each offset and [N,
    len(SMOOTHINGS)] in the view whose tail follows ``fit_ts``'s unigram prior at each smoothing:
    the very views a plugin trains against (``topk_view``, ``BaseLogits.with_lift``,
    ``BaseLogits.with_tail_prior``)."""
    from vllm_plugin.training.base_logits import topk_view, unigram_log_prior

    targets = ts.flat_targets()
    view = topk_view(bl, ts, k, progress=False)  # one pass over the vocabulary: top k and the exact target log-prob
    rank = torch.empty(len(targets), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(targets), rows_per_batch):  # the second: ranks past k
            rows = torch.arange(start, min(start + rows_per_batch, len(targets)))
            lp = bl.log_probs(rows)
            rank[rows] = (lp > lp.gather(1, targets[rows, None])).sum(-1) + 1
    rows = torch.arange(len(targets))
    lifted = torch.stack([view.with_lift(ts, marker, o).target_log_probs(rows, targets) for o in OFFSETS], -1)
    priored = torch.stack([view.with_tail_prior(unigram_log_prior(fit_ts, bl.vocab_size, a)).target_log_probs(
        rows, targets) for a in SMOOTHINGS], -1)
    return rank, view.target_logprobs, view.target_log_probs(rows, targets), view.topk_logprobs[:, -1], lifted, priored


def summarise(rank, exact, view, kth, aware, priored, k: int) -> dict:
    outside = rank > k
    if not len(rank):
        return {"tokens": 0}
    q = torch.quantile(rank.float(), torch.tensor([0.5, 0.9, 0.99])).tolist()
    summary = {"tokens": int(len(rank)), "outside_top_k": round(outside.float().mean().item(), 4),
               "rank_quantiles": {"p50": q[0], "p90": q[1], "p99": q[2]},
               "base_ce": {"full": round(-exact.mean().item(), 3), "top_k_flat_tail": round(-view.mean().item(), 3),
                           **{f"copy_aware_offset{o:g}": round(-aware[:, j].mean().item(), 3)
                              for j, o in enumerate(OFFSETS)},
                           **{f"tail_prior{a:g}": round(-priored[:, j].mean().item(), 3)
                              for j, a in enumerate(SMOOTHINGS)}}}
    if outside.any():
        summary.update(mean_log_prob=round(exact[outside].mean().item(), 3),
                       mean_view_log_prob=round(view[outside].mean().item(), 3),
                       mean_shortfall=round((exact - view)[outside].mean().item(), 3),
                       mean_shortfall_tail_prior={f"{a:g}": round((exact - priored[:, j])[outside].mean().item(), 3)
                                                  for j, a in enumerate(SMOOTHINGS)},
                       median_below_kth=round(torch.median(exact[outside] - kth[outside]).item(), 3))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--k", type=int, default=20, help="how many log-probs the closed API returns")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)

    from benchmarks.quality import plugin_specs
    from vllm_plugin.base_model import resolve_base
    from vllm_plugin.training.pipeline import LazyBase, base_logits_for, task_marker, tokenized_splits

    protocol = load_protocol("e2e")
    base_path = resolve_base(args.base)
    spec = plugin_specs(protocol.dataset, base_path, protocol.split)[RECIPE]
    splits = tokenized_splits(spec, protocol.train_examples, make_out=False)
    ts = splits.select_ts
    bl = base_logits_for(ts, spec, splits.base_path, splits.fingerprint, LazyBase(splits.base_path))
    marker = task_marker(splits.tokenizer, protocol.dataset, ts.prompts, spec.shots + 1)
    copied, where, names = classify(splits, marker, splits.tokenizer.eos_token_id)
    rank, exact, view, kth, aware, priored = ranks_and_view(bl, ts, marker, args.k, splits.fit_ts)
    every = where >= 0  # every target token but EOS, which no prompt holds
    classes = {"all": summarise(rank[every], exact[every], view[every], kth[every], aware[every], priored[every],
                                  args.k)}
    for i, name in [(None, "all")] + list(enumerate(names)):
        rows = where >= 0 if i is None else where == i
        for kind, mask in (("copied", copied), ("other", ~copied)):
            pick = rows & mask
            classes[f"{name}/{kind}"] = summarise(rank[pick], exact[pick], view[pick], kth[pick], aware[pick],
                                                          priored[pick], args.k)
    result = {"base": splits.base_path, "dataset": "e2e", "split": protocol.split, "recipe": RECIPE, "k": args.k,
              "vocab_size": bl.vocab_size, "select_examples": len(ts.targets),
              "note": "select split, teacher-forced on its references behind the recipe's in-context example; "
                      "EOS rows left out; copied = the token occurs in the task's input segment of the prompt",
              # The offset whose view gives the base alone its lowest cross-entropy on the select
              # targets: the lift that best describes the base, chosen on select.
              "chosen_offset": min(OFFSETS, key=lambda o: classes["all"]["base_ce"][f"copy_aware_offset{o:g}"]),
              # Likewise the smoothing of the fit targets' unigram prior that the tail follows.
              "chosen_tail_prior": min(SMOOTHINGS, key=lambda a: classes["all"]["base_ce"][f"tail_prior{a:g}"]),
              "classes": classes}
    out = Path(args.results) / f"top20_reach_e2e_{base_name(args.base)}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(classes, indent=2))
    print(f"chosen offset: {result['chosen_offset']}, chosen tail prior smoothing: {result['chosen_tail_prior']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
