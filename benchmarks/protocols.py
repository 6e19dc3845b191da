"""What a quality run fits, selects and scores on: the protocols shared by ``benchmarks.quality``
and ``benchmarks.strength``.

- e2e (``split="venue"``, default): fit 60% / select 40% of the distinct MRs of E2E-cleaned
  ``devel``, about a third of the select MRs naming venues the fit split never saw
  (``training.data.split_by_held_out``), as test does; scored on all ``test`` MRs.
- e2e_by_origin (``split="origin"``): ``e2e``'s, with the cleaned MRs that E2E-cleaned made from
  one original crowdsourced MR (its ``orig_mr``) kept on one side. In ``e2e``'s split 348 of the
  594 select MRs (59 %; 82 % in the paper's by-MR split) share an original MR with a fit MR:
  near-twins whose references were written for the same prompt, which test's MRs never are
  (no original MR of ``test`` occurs in ``devel``).
- e2e_by_mr (``split="input"``): the paper's split, 60/40 by distinct MR.
- webnlg (``split="category"``, default): category shift: fit/select on ``train`` entries of
  seven categories (first reference each), scored on ``dev`` entries of the three others (every
  third by sorted name). Select mirrors test: whole seen categories go to it
  (``training.data.split_by_held_out``), so what is chosen on select (decoding, strength, gate,
  early stopping) is chosen on categories the plugin never saw, and none of the held-out ones.
- webnlg_by_entry (``split="input"``): the same, fit/select split by entry (every select
  category is also a fit category).
- webnlg_target (``split="target"``): the paper's own protocol as closely as our data allows:
  the entries (``train`` and ``dev`` pooled) of the person-like categories we have (Astronaut,
  ComicsCharacter, SportsTeam; the paper's also had Artist, Politician and Athlete) halved by
  entry, seeded: one half is the plugin's (fit/select 60/40, first reference each), the other
  half is scored (all references). The plugin sees the target categories; only the base's
  prior is shifted.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from vllm_plugin.base_model import PACKAGED_BASES

# --split of the benchmarks: training.data.SPLITS, and WebNLG's "target" protocol.
PROTOCOL_SPLITS = ("venue", "origin", "input", "category", "target")


def base_name(base: str) -> str:
    """A base's short name for results and run folders: a packaged base's own name, else the
    folder's name, lower-cased."""
    return base if base in PACKAGED_BASES else Path(base).name.lower()


# WebNLG's held-out references run longer (95th percentile 66 SmolLM2 tokens, E2E's well under 64).
DEFAULT_MAX_TOKENS = {"e2e": 64, "webnlg": 96}


def first_reference_each(examples, categories) -> list:
    """One example per WebNLG entry of ``categories``: its first reference, in file order."""
    entries, out = set(), []
    for e in examples:
        if dict(e.meta)["category"] in categories and e.group not in entries:
            entries.add(e.group)
            out.append(e)
    return out


def webnlg_held_out(data_dir: Path) -> list[str]:
    """The held-out categories: of the ten, sorted by name, every third (index 2, 5, 8)."""
    from vllm_plugin.training.data import load_webnlg

    categories = sorted({dict(e.meta)["category"] for e in load_webnlg(data_dir / "webnlg" / "train.jsonl")})
    return categories[2::3]


# The paper's target categories (person-like) that WebNLG v1.6's ten include.
WEBNLG_TARGET_CATEGORIES = ("Astronaut", "ComicsCharacter", "SportsTeam")


def webnlg_target_halves(data_dir: Path, seed: int = 0) -> tuple[list, list]:
    """(the plugin's half, first reference of each entry; the scored half, every reference) of
    the ``train`` + ``dev`` entries of ``WEBNLG_TARGET_CATEGORIES``, halved by entry, seeded."""
    from vllm_plugin.training.data import load_webnlg

    pooled = [e for split in ("train", "dev") for e in load_webnlg(data_dir / "webnlg" / f"{split}.jsonl")
              if dict(e.meta)["category"] in WEBNLG_TARGET_CATEGORIES]
    entries = sorted({e.group for e in pooled})
    random.Random(seed).shuffle(entries)
    plugin_side = set(entries[:len(entries) // 2])
    return (first_reference_each([e for e in pooled if e.group in plugin_side], WEBNLG_TARGET_CATEGORIES),
            [e for e in pooled if e.group not in plugin_side])


def split_webnlg_train(data_dir: Path):
    """(fit+select examples: ``train`` entries of the seen categories, first reference each;
    the held-out categories)."""
    from vllm_plugin.training.data import load_webnlg

    train = load_webnlg(data_dir / "webnlg" / "train.jsonl")
    held_out = webnlg_held_out(data_dir)
    seen = {dict(e.meta)["category"] for e in train} - set(held_out)
    # One reference per training entry (the first): fitting then costs about what E2E's does
    # (2,483 fit / 1,655 select examples instead of 6,579 / 4,387 with every reference) on two CPU cores.
    return first_reference_each(train, seen), held_out


@dataclass
class Protocol:
    """What a quality run fits, selects and scores on."""

    name: str  # results and run folders: e2e, e2e_by_mr, webnlg, webnlg_by_entry, webnlg_target
    dataset: str
    split: str  # training.data.split_examples kind the plugins (and LoRA) train with
    train_examples: list  # fit + select
    fit: list
    select: list
    description: str


def load_protocol(dataset: str, split: str | None = None) -> Protocol:
    """The fitting side of a protocol (see the module docstring); the test set is ``load_test``'s.

    Raises:
        training.data.DataError: missing or malformed data; a split the dataset has no field for
            (``venue`` for WebNLG, ``category`` for E2E).
        ValueError: an unknown dataset.
    """
    from vllm_plugin.training.data import DataError, load_examples, split_examples
    from vllm_plugin.training.pipeline import data_dir, default_data_file

    if dataset == "e2e":
        split = split or "venue"
        train_examples = load_examples("e2e", default_data_file("e2e"))
        name = "e2e" if split == "venue" else f"e2e_by_{'mr' if split == 'input' else split}"
        how = {"venue": "about a third of the select MRs name venues absent from the fit split",
               "origin": "about a third of the select MRs name venues absent from the fit split, and no "
                         "original crowdsourced MR is on both sides"}.get(split, "by distinct MR, the paper's")
        description = (f"fit 60% / select 40% of devel MRs (seed 0; {how}); score on all test MRs, "
                       f"grouped references")
    elif dataset == "webnlg" and split == "target":
        train_examples = webnlg_target_halves(data_dir("webnlg"))[0]
        name, split = "webnlg_target", "input"
        description = (f"the paper's: train+dev entries of {', '.join(WEBNLG_TARGET_CATEGORIES)} halved by entry "
                       f"(seed 0); fit/select 60/40 by entry on one half (first reference of each), score on "
                       f"the other half, all references")
    elif dataset == "webnlg":
        split = split or "category"
        if split not in ("category", "input"):
            raise DataError(f"split {split!r} is for E2E; WebNLG's category-shift protocol splits its seen "
                            f"categories by category (default) or by entry ('input'), or use 'target' (the "
                            f"paper's protocol)")
        train_examples, held_out = split_webnlg_train(data_dir("webnlg"))
        name = "webnlg" if split == "category" else "webnlg_by_entry"
        how = ("by category: whole seen categories, which the fit split never sees, fill most of select"
               if split == "category" else "by entry")
        description = (f"category shift: fit/select 60/40 on train entries of the 7 other categories ({how}; "
                       f"first reference of each); score on dev entries of held-out categories {held_out}, "
                       f"all references")
    else:
        raise ValueError(f"unknown dataset {dataset!r}; expected e2e or webnlg")
    fit, select = split_examples(train_examples, split)
    return Protocol(name, dataset, split, train_examples, fit, select, description)


def slice_key(protocol: Protocol) -> str | None:
    """The meta field by which select inputs are new to the fit split or not, as test inputs are
    to training: E2E's venue; WebNLG's category under the ``category`` split; else None."""
    return "venue" if protocol.dataset == "e2e" else ("category" if protocol.split == "category" else None)


def split_sizes(protocol: Protocol) -> dict:
    """Distinct inputs in fit and select; select inputs whose venue (E2E) or category (WebNLG,
    ``category`` split) fit never saw; and (E2E) select inputs that share an original
    crowdsourced MR (``origin``) with a fit input."""
    out = {"fit_inputs": len({e.group for e in protocol.fit}), "select_inputs": len({e.group for e in protocol.select})}
    key = slice_key(protocol)
    if key:
        fit_values = {dict(e.meta)[key] for e in protocol.fit}
        out[f"select_inputs_{key}_unseen"] = len({e.group for e in protocol.select
                                                  if dict(e.meta)[key] not in fit_values})
    fit_origins = {dict(e.meta).get("origin") for e in protocol.fit} - {None}
    if fit_origins:
        out["select_inputs_sharing_an_origin_with_fit"] = len({e.group for e in protocol.select
                                                               if dict(e.meta).get("origin") in fit_origins})
    return out


def value_counts(examples) -> dict[str, dict[str, int]]:
    """{field: {value: distinct E2E MRs naming it}, most named first}, every field but the venue's name."""
    from collections import Counter

    from vllm_plugin.training.data import parse_mr

    counts: dict[str, Counter] = {}
    for group in sorted({e.group for e in examples}):
        for k, v in parse_mr(group):
            if k != "name":
                counts.setdefault(k, Counter())[v] += 1
    return {k: dict(c.most_common()) for k, c in sorted(counts.items())}


def main(argv=None) -> None:
    """Print each E2E protocol's split sizes as JSON (``--out``: also save them there)."""
    import argparse

    parser = argparse.ArgumentParser(description="split sizes of the E2E protocols (fit/select of devel)")
    parser.add_argument("--out", help="also write the JSON to this file")
    args = parser.parse_args(argv)
    sizes = {}
    for split in ("input", "venue", "origin"):
        protocol = load_protocol("e2e", split)
        sizes[protocol.name] = {"split": split, "description": protocol.description, **split_sizes(protocol)}
    devel_origins = {dict(e.meta)["origin"] for e in protocol.train_examples}
    test = load_test(protocol)
    sizes["test"] = {"inputs": len({e.group for e in test}),
                     "inputs_sharing_an_origin_with_devel": len({e.group for e in test
                                                                 if dict(e.meta)["origin"] in devel_origins})}
    # What the MRs name, not how they are split: training.data.swap_values is for this difference.
    sizes["values"] = {"devel": value_counts(protocol.train_examples), "test": value_counts(test)}
    text = json.dumps(sizes, indent=2) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)


def select_slices(protocol: Protocol) -> dict[str, set[str]]:
    """Select inputs by whether the fit split saw their venue or category (``slice_key``); {} for
    protocols without one."""
    key = slice_key(protocol)
    return held_out_slices(protocol.select, {dict(e.meta).get(key) for e in protocol.fit}, key) if key else {}


def load_test(protocol: Protocol) -> list:
    """The scored examples: E2E ``test``; WebNLG ``dev`` entries of the held-out categories, or
    (``webnlg_target``) the scored half of the target categories' entries."""
    from vllm_plugin.training.data import load_examples
    from vllm_plugin.training.pipeline import data_dir, default_data_file

    if protocol.dataset == "e2e":
        return load_examples("e2e", default_data_file("e2e", "test"))
    if protocol.name == "webnlg_target":
        return webnlg_target_halves(data_dir("webnlg"))[1]
    from vllm_plugin.training.data import load_webnlg

    held_out = webnlg_held_out(data_dir("webnlg"))
    return [e for e in load_webnlg(data_dir("webnlg") / "webnlg" / "dev.jsonl") if dict(e.meta)["category"] in held_out]


def held_out_slices(examples, known, key: str = "venue") -> dict[str, set[str]]:
    """Inputs by whether their ``key`` value (E2E venue, WebNLG category) is among ``known``:
    {``<key>_seen``: prompts, ``<key>_unseen``: prompts}."""
    inside = {e.prompt for e in examples if dict(e.meta).get(key) in known}
    return {f"{key}_seen": inside, f"{key}_unseen": {e.prompt for e in examples} - inside}


def slice_names(keys) -> list[str]:
    """The slice names (``*_seen``, ``*_unseen``) among a score row's keys, seen first."""
    return sorted((k for k in keys if k.endswith(("_seen", "_unseen"))), key=lambda k: (k.rsplit("_", 1)[0], k.endswith("_unseen")))


def grouped_test(test, subset: int | None, seed: int = 0):
    """(distinct prompts in file order, or a fixed random ``subset`` of them; their references)."""
    from vllm_plugin.training.data import group_references

    refs = group_references(test)
    prompts = list(refs)
    if subset and subset < len(prompts):
        prompts = sorted(random.Random(seed).sample(prompts, subset), key=prompts.index)
    return prompts, [refs[p] for p in prompts]


if __name__ == "__main__":
    main()
