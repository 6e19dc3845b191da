"""How E2E's devel and test MRs differ, and what each system's outputs say that the MR does not.

    python -m benchmarks.e2e_slots                     # the quality benchmark's E2E generation files
    python -m benchmarks.e2e_slots --generations DIR [DIR ...]

Two tables, from files already written (no model runs):
  attributes  the share of distinct MRs that hold each attribute, in ``devel`` (which the
              protocols split into fit and select) and in ``test``;
  mentions    for each system's generation file at one decoding setting
              (``<system>@<decoding>.jsonl`` in each folder: the quality benchmark's
              ``generations/<inputs>/<limits>/``), per attribute, the share of outputs
              that mention it among MRs that lack it ("unasked") and that do not among MRs that
              have it ("missed").

A mention is a regular expression per attribute (``MENTIONS``), so the shares are approximate
(a paraphrase it does not know counts as missed); ``food`` and ``near`` are left out, since the
venue names (``Raja Indian Cuisine``) hold food words and ``near`` is in 99% of test MRs. It is a
reading aid for the quality tables, not a metric they use.

Writes ``benchmarks/results/e2e_slots.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from benchmarks.quality import RESULTS

MENTIONS = {
    "customer rating": r"\brat(?:ing|ings|ed|es)\b|\bstars?\b",
    "priceRange": r"\bpric|£|\bcheap|\bexpensive|\baffordabl|\bcosts?\b",
    "familyFriendly": r"famil|\bchild|\bkids?\b",
    "area": r"riverside|city cent|\briver\b",
}
DEFAULT_GENERATIONS = ("runs/quality/e2e-smollm2-135m/generations/select300/max64-float32",
                       "runs/quality/e2e-smollm2-135m/generations/test-all/max64-float32")


def attributes_of(examples) -> dict[str, dict[str, str]]:
    """Each distinct MR's attributes, keyed by the prompt the quality benchmark decodes."""
    from vllm_plugin.training.data import parse_mr

    return {e.prompt: dict(parse_mr(e.group)) for e in examples}


def attribute_shares(mrs: dict[str, dict[str, str]]) -> dict[str, float]:
    """Share (0 to 1) of the MRs in ``mrs`` (at least one) that hold each attribute."""
    names = sorted({k for attrs in mrs.values() for k in attrs})
    return {k: sum(k in attrs for attrs in mrs.values()) / len(mrs) for k in names}


def mention_shares(path: Path, mrs: dict[str, dict[str, str]]) -> dict:
    """Per attribute of ``MENTIONS``, in the generation file ``path`` (JSON lines with ``prompt``
    and ``output``): ``unasked``, the share (0 to 1) of outputs mentioning it among rows whose MR
    lacks it, and ``missed``, the share not mentioning it among rows whose MR holds it (None
    where no row is of that kind); ``rows_lacking`` and ``rows_having`` count those rows;
    ``words``: the outputs' mean length in words.

    Raises:
        ValueError: a row's prompt is not one of ``mrs``'s (another dataset or template).
    """
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head = os.path.commonprefix(list(mrs))  # the template's text before the MR
    for r in rows:  # a lever's file keeps its in-context examples before the task's MR
        if r["prompt"] not in mrs and head:
            r["prompt"] = r["prompt"][r["prompt"].rfind(head):]
    unknown = [r["prompt"] for r in rows if r["prompt"] not in mrs]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} prompts are not E2E devel or test MRs (first: {unknown[0][:80]!r})")
    out = {"outputs": len(rows), "words": sum(len(r["output"].split()) for r in rows) / max(len(rows), 1)}
    for attr, pattern in MENTIONS.items():
        said = [(attr in mrs[r["prompt"]], re.search(pattern, r["output"], re.I) is not None) for r in rows]
        lacking = [m for has, m in said if not has]
        having = [m for has, m in said if has]
        out[attr] = {"unasked": sum(lacking) / len(lacking) if lacking else None,
                     "missed": 1 - sum(having) / len(having) if having else None,
                     "rows_lacking": len(lacking), "rows_having": len(having)}
    return out


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def write_report(result: dict, out_base: Path) -> None:
    """``result`` as ``<out_base>.json`` and its two tables as ``<out_base>.md``."""
    out_base.parent.mkdir(parents=True, exist_ok=True)
    out_base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    shares = result["attributes"]
    lines = ["Share of distinct E2E MRs holding each attribute:", "",
             "| attribute | devel | test |", "|---|---|---|"]
    names = sorted(set(shares["devel"]) | set(shares["test"]))
    lines += [f"| {k} | {shares['devel'].get(k, 0):.2f} | {shares['test'].get(k, 0):.2f} |" for k in names]
    lines += ["", "Outputs that mention an attribute the MR lacks (unasked) / omit one it holds (missed); "
              "regular expressions, approximate (`benchmarks/e2e_slots.py`):", "",
              "| inputs | system | words | " + " | ".join(MENTIONS) + " |", "|---|---|---|" + "---|" * len(MENTIONS)]
    for inputs, files in result["mentions"].items():
        for name, row in files.items():
            cells = [f"{_share(row[a]['unasked'])} / {_share(row[a]['missed'])}" for a in MENTIONS]
            lines.append(f"| {inputs} | {name} | {row['words']:.1f} | " + " | ".join(cells) + " |")
    out_base.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    """Read E2E devel and test and the generation files, write the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", nargs="+", default=list(DEFAULT_GENERATIONS),
                        help="folders of <system>@<decoding>.jsonl generation files")
    parser.add_argument("--systems", default="zero_shot,icl_1,plugin_shortlist_copy_gate,plugin_shortlist_copy_gate_icl1,"
                                              "plugin_shortlist_copy_task_gate_icl1")
    parser.add_argument("--decoding", default="rp1-fp0.5", help="the files of this decoding setting (the file name's @ part)")
    parser.add_argument("--files", nargs="*", default=[],
                        help="more generation files (e.g. the levers', runs/quality/<run>/generations/select300/...), "
                             "each a row of its folder's inputs")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    from vllm_plugin.training.data import load_examples
    from vllm_plugin.training.pipeline import default_data_file

    splits = {name: attributes_of(load_examples("e2e", default_data_file("e2e", split)))
              for name, split in (("devel", "train"), ("test", "test"))}
    mrs = {**splits["devel"], **splits["test"]}
    mentions = {}
    for folder in map(Path, args.generations):
        files = [folder / f"{name}@{args.decoding}.jsonl" for name in args.systems.split(",")]
        files = [f for f in files if f.is_file()]
        if not files:
            raise SystemExit(f"none of {args.systems} at {args.decoding} in {folder}")
        if folder.parent.name in mentions:
            raise SystemExit(f"{folder}: two folders named {folder.parent.name!r} above their files; pass one")
        try:
            mentions[folder.parent.name] = {f.stem: mention_shares(f, mrs) for f in files}
        except ValueError as e:
            raise SystemExit(str(e)) from e
    for f in map(Path, args.files):
        if not f.is_file():
            raise SystemExit(f"{f}: no such generation file")
        try:
            mentions.setdefault(f.parent.parent.name, {})[f.stem] = mention_shares(f, mrs)
        except ValueError as e:
            raise SystemExit(str(e)) from e
    result = {"attributes": {s: attribute_shares(m) for s, m in splits.items()},
              "distinct_mrs": {s: len(m) for s, m in splits.items()}, "patterns": MENTIONS, "mentions": mentions}
    out = Path(args.results) / "e2e_slots"
    write_report(result, out)
    print(f"wrote {out}.json/.md")


if __name__ == "__main__":
    main()
