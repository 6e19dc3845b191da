"""Task data: (prompt, target) examples grouped by distinct input, with per-dataset prompts.

Datasets: E2E (CSV; references grouped by meaning representation), WebNLG (JSON Lines of
triples and references), and a generic JSON Lines of ``{"prompt", "completion"}`` for users'
own tasks. Splits (``split_examples``): ``input``, the paper's: distinct inputs, shuffled with a
seed, 60% to fit and 40% to select; ``venue`` (E2E): the same sizes, but about a third of the
select inputs name venues that the fit split never sees, as about a third of E2E's test MRs name
venues that never occur in ``devel``; ``origin`` (E2E): ``venue``, with the MRs that E2E-cleaned
made from one original crowdsourced MR kept on one side, as test's original MRs are all new;
``category`` (WebNLG): whole categories the fit split never sees fill most of select, as they
fill the category-shift test set.
"""
from __future__ import annotations

import csv
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("e2e", "webnlg", "jsonl")
SPLITS = ("input", "venue", "origin", "category")

# The paper's E2E prompt (its Llama-3.1 experiments), and the same shape for WebNLG.
PROMPT_TEMPLATES = {
    "e2e": ("Please convert the following attributes into a coherent sentence. "
            "Do not provide explanation.\n\nAttributes:\n{input}\n\nSentence:\n"),
    "webnlg": ("Please convert the following triples into a coherent sentence. "
               "Do not provide explanation.\n\nTriples:\n{input}\n\nSentence:\n"),
    "jsonl": "{input}",
}

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


class DataError(ValueError):
    """Task data that cannot be used, naming the file and the row."""


@dataclass(frozen=True)
class Example:
    group: str  # the distinct input; references of one input share it
    prompt: str
    target: str
    meta: tuple = ()  # dataset-specific extras, e.g. the WebNLG category


def parse_mr(mr: str) -> list[tuple[str, str]]:
    """``name[Alimentum], area[city centre]`` -> ``[("name", "Alimentum"), ("area", "city centre")]``."""
    items = _MR_ITEM.findall(mr)
    if not items:
        raise ValueError(f"not a meaning representation: {mr!r}")
    return [(k.strip(), v.strip()) for k, v in items]


def venue_of(mr: str) -> str:
    """The venue an E2E MR describes, its ``name[...]`` value; ``""`` for the few MRs without one."""
    return dict(parse_mr(mr)).get("name", "")


def template_prefix(dataset: str) -> str:
    """The text of ``dataset``'s prompt template before ``{input}``, stripped ("" for none): where
    each task begins in a prompt, in-context examples or not (``--copy-task-only``'s marker)."""
    return PROMPT_TEMPLATES.get(dataset, "{input}").split("{input}")[0].strip()


def format_prompt(dataset: str, raw_input: str, template: str | None = None) -> str:
    template = template or PROMPT_TEMPLATES[dataset]
    if dataset == "e2e":
        raw_input = "\n".join(f"{k} -- {v}" for k, v in parse_mr(raw_input))
    return template.replace("{input}", raw_input)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"dataset file {path} is empty")


def load_e2e(path: str | Path, template: str | None = None) -> list[Example]:
    path = Path(path)
    _require_file(path)
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"mr", "ref"} <= set(reader.fieldnames):
            raise DataError(f"{path}: expected CSV columns 'mr' and 'ref', found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            mr, ref = (row.get("mr") or "").strip(), (row.get("ref") or "").strip()
            if not mr or not ref:
                raise DataError(f"{path}:{line}: empty 'mr' or 'ref'")
            try:
                prompt, venue = format_prompt("e2e", mr, template), venue_of(mr)
            except ValueError as e:
                raise DataError(f"{path}:{line}: {e}") from e
            # E2E-cleaned re-annotated each reference's MR: the CSV's orig_mr is the MR the crowd
            # wrote it for, which several cleaned MRs share (split "origin" keeps them together).
            origin = (row.get("orig_mr") or "").strip()
            meta = (("venue", venue),) + ((("origin", origin),) if origin else ())
            examples.append(Example(group=mr, prompt=prompt, target=ref, meta=meta))
    if not examples:
        raise DataError(f"{path} has no rows")
    return examples


def _read_jsonl(path: Path):
    _require_file(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, obj


def load_webnlg(path: str | Path, template: str | None = None) -> list[Example]:
    path = Path(path)
    examples = []
    for line_no, obj in _read_jsonl(path):
        triples, refs = obj.get("triples"), obj.get("refs")
        if (not isinstance(triples, list) or not triples or not all(isinstance(t, str) and t.strip() for t in triples)
                or not isinstance(refs, list)):
            raise DataError(f"{path}:{line_no}: expected non-empty 'triples' (strings) and a 'refs' list")
        raw = "\n".join(t.strip() for t in triples)
        prompt = format_prompt("webnlg", raw, template)
        category = str(obj.get("category", ""))
        # WebNLG numbers entries per (category, size) file: "Id1" recurs across both.
        group = f"{category}/{obj.get('size', '')}/{obj['eid']}" if "eid" in obj else raw
        for ref in refs:
            if isinstance(ref, str) and ref.strip():
                examples.append(Example(group=group, prompt=prompt, target=ref.strip(),
                                        meta=(("category", category),)))
    if not examples:
        raise DataError(f"{path} has no entries with references")
    return examples


def load_jsonl(path: str | Path, template: str | None = None) -> list[Example]:
    path = Path(path)
    examples = []
    for line_no, obj in _read_jsonl(path):
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not prompt or not completion.strip():
            raise DataError(f"{path}:{line_no}: expected non-empty string fields 'prompt' and 'completion'")
        examples.append(Example(group=prompt, prompt=format_prompt("jsonl", prompt, template),
                                target=completion.strip()))
    if not examples:
        raise DataError(f"{path} has no rows")
    return examples


LOADERS = {"e2e": load_e2e, "webnlg": load_webnlg, "jsonl": load_jsonl}


def load_examples(dataset: str, path: str | Path, template: str | None = None) -> list[Example]:
    if dataset not in LOADERS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    return LOADERS[dataset](path, template)


# Invented venue names for ``swap_names``: two-word names like "The Golden Lantern" and single
# made-up words like "Calorino", so a plugin meets names its base must copy from the input.
_NAME_WORDS = (("Golden", "Silver", "Red", "Blue", "Green", "Old", "Royal", "Little", "Copper", "Velvet",
                "Rustic", "Grand", "Wild", "Quiet", "Olive", "Amber", "Cedar", "Maple", "Ivory", "Crimson"),
               ("Lantern", "Oak", "Harbour", "Kettle", "Garden", "Table", "Lion", "Rose", "Anchor", "Mill",
                "Bridge", "Fox", "Spoon", "Orchard", "Barrel", "Feather", "Pebble", "Willow", "Hearth", "Plate"))
_SYLLABLES = ("ca", "lo", "ri", "na", "ve", "to", "za", "mi", "bru", "sel", "dor", "fi", "gan", "tes", "quo", "ber")


def invented_name(rng: random.Random) -> str:
    """A venue name no E2E split uses (seeded by ``rng``)."""
    if rng.random() < 0.5:
        first, second = (rng.choice(words) for words in _NAME_WORDS)
        return f"{'The ' if rng.random() < 0.5 else ''}{first} {second}"
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3)))
    return word.capitalize()


def swap_names(examples: list[Example], share: float, seed: int = 0) -> list[Example]:
    """E2E examples where a seeded ``share`` of the inputs (all their references alike) have their
    venue (``name[...]``) and ``near[...]`` values replaced by invented names, in the prompt and
    in the references. A plugin fitted on them cannot memorise the venue as a vocabulary item; it
    must learn to leave names to the base, which copies them from the input, as it must on test
    inputs naming venues it never saw. Examples without such values are kept as they are."""
    rng = random.Random(seed)
    mappings = {}
    for group in sorted({e.group for e in examples}):
        if rng.random() < share:
            mappings[group] = {v: invented_name(rng) for v in sorted({v for k, v in parse_mr(group)
                                                                      if k in ("name", "near") and v})}
    return _rewrite_values(examples, mappings)


# Fields whose values E2E references mostly state word for word ("coffee shop", "Chinese", "5 out
# of 5"); familyFriendly[yes] reads "family friendly", "kid-friendly" and so on.
SWAP_FIELDS = ("eatType", "food", "area", "customer rating", "priceRange", "near")


def swap_values(examples: list[Example], share: float, seed: int = 0,
                values_from: list[Example] | None = None) -> list[Example]:
    """E2E examples where a seeded ``share`` of the inputs have their attribute values (``SWAP_FIELDS``)
    replaced, each by another value that field takes in ``values_from`` (default: ``examples``),
    drawn uniformly, in the prompt and in every reference. A value is swapped only where every
    reference of its input states it word for word (whole words, any case) and no other field of the
    input shares it, so the rewritten references stay true to the rewritten input. A plugin fitted on
    them cannot learn the fit split's value frequencies (E2E ``devel`` names a coffee shop in 84 % of
    its inputs, Chinese or English food in 99 % of those with food) as what to write; it must follow
    the input's values, as it must on inputs that name others (``test`` names a pub in 49 %)."""
    references: dict[str, list[str]] = {}
    for e in examples:
        references.setdefault(e.group, []).append(e.target)
    values: dict[str, set[str]] = {}
    for group in {e.group for e in (examples if values_from is None else values_from)}:
        for k, v in parse_mr(group):
            if v:
                values.setdefault(k, set()).add(v)
    rng = random.Random(seed)
    mappings = {}
    for group in sorted(references):
        if rng.random() >= share:
            continue
        fields = parse_mr(group)
        counts = Counter(v for _, v in fields)
        mapping = {v: rng.choice(sorted(values.get(k, set()) - {v})) for k, v in fields
                   if k in SWAP_FIELDS and v and counts[v] == 1 and values.get(k, set()) - {v}
                   and all(_mentions(r, v) for r in references[group])}
        if mapping:
            mappings[group] = mapping
    return _rewrite_values(examples, mappings)


def _whole_words(values) -> re.Pattern:
    # Longest first, so "The Portland Arms" is not read as "The Portland" and a word.
    return re.compile("|".join(rf"(?<!\w){re.escape(v)}(?!\w)" for v in sorted(values, key=len, reverse=True)), re.I)


def _mentions(text: str, value: str) -> bool:
    return _whole_words([value]).search(text) is not None


def _rewrite_values(examples: list[Example], mappings: dict[str, dict[str, str]]) -> list[Example]:
    """``examples`` with each input in ``mappings`` (MR -> old value -> new) rewritten: its MR (every
    field holding an old value), its prompt, its references (every whole-word mention, any case, in
    one pass, so a new value is never rewritten again) and its venue. Two inputs may become one."""
    out = []
    for e in examples:
        mapping = mappings.get(e.group)
        if not mapping:
            out.append(e)
            continue
        group = ", ".join(f"{k}[{mapping.get(v, v)}]" for k, v in parse_mr(e.group))
        lower = {old.lower(): new for old, new in mapping.items()}
        target = _whole_words(mapping).sub(lambda m: lower[m.group(0).lower()], e.target)
        meta = tuple((k, mapping.get(v, v) if k == "venue" else v) for k, v in e.meta)
        # The input as the prompt renders it (whatever the template around it), old and new.
        rendered = format_prompt("e2e", e.group, "{input}"), format_prompt("e2e", group, "{input}")
        out.append(Example(group=group, prompt=e.prompt.replace(*rendered), target=target, meta=meta))
    return out


# In-context examples are drawn as a seeded sample of this many fit examples; k shots are its
# first k, so one shot is the first of three (the quality benchmark's icl_1 and icl_3).
MAX_SHOTS = 3


def in_context_shots(fit: list[Example], k: int, seed: int = 0) -> list[Example]:
    """The ``k`` (at most ``MAX_SHOTS``) in-context examples drawn from the fit split ``fit``."""
    if not 0 <= k <= MAX_SHOTS:
        raise ValueError(f"in-context examples: 0 to {MAX_SHOTS}, got {k}")
    return random.Random(seed).sample(fit, min(MAX_SHOTS, len(fit)))[:k]


def with_shots(prompt: str, shots: list[Example]) -> str:
    """``prompt`` after the in-context examples ``shots``, each its prompt, its reference and a
    blank line."""
    return "".join(f"{e.prompt}{e.target}\n\n" for e in shots) + prompt


def input_features(example: Example) -> frozenset[str]:
    """What ``NearestShot`` compares two inputs by: the lines of the input as its prompt lists
    them (an E2E attribute with its value, a WebNLG triple) and each line's field (the
    attribute; the triple's predicate); the prompt's lower-cased words for other data."""
    items = [line.strip() for line in example.prompt.splitlines() if " -- " in line or line.count(" | ") == 2]
    fields = ["field:" + (i.split(" -- ")[0] if " -- " in i else i.split(" | ")[1]) for i in items]
    return frozenset(items + fields) or frozenset(re.findall(r"\w+", example.prompt.lower()))


class NearestShot:
    """The in-context example for an input, chosen per input by similarity, as kNN prompting
    does (Liu et al., 2022, "What Makes Good In-Context Examples for GPT-3?"): of the examples in
    ``pool`` (the fit split), the one whose input shares the largest Jaccard overlap of
    ``input_features`` with it, from another input (``group``), its first reference; ties go to
    the earlier input in ``pool``. So the example shows the attributes the task holds. ``apart``:
    a meta field (E2E ``venue``) the example must not share with the input either, so that a fit
    input's example is no closer to it than a new input's would be.

    Raises (on a call):
        ValueError: ``pool`` holds no input other than the example's (of another ``apart``).
    """

    def __init__(self, pool: list[Example], apart: str | None = None):
        self.apart = apart
        firsts: dict[str, Example] = {}
        for e in pool:
            firsts.setdefault(e.group, e)
        self.candidates = [(e, input_features(e)) for e in firsts.values()]
        self._chosen: dict[str, Example] = {}

    def __call__(self, example: Example) -> Example:
        if example.group not in self._chosen:
            want = input_features(example)
            away = dict(example.meta).get(self.apart) if self.apart else None
            best, best_score = None, -1.0
            for c, have in self.candidates:
                score = len(want & have) / max(1, len(want | have))
                if score > best_score and c.group != example.group and (away is None or dict(c.meta).get(self.apart) != away):
                    best, best_score = c, score
            if best is None:
                raise ValueError(f"no in-context example for {example.group!r}: the fit split holds no other input"
                                 + (f" of another {self.apart}" if self.apart else ""))
            self._chosen[example.group] = best
        return self._chosen[example.group]


def split_by_input(examples: list[Example], fit_fraction: float = 0.6, seed: int = 0):
    """Split so that no input has references on both sides (the paper's 60/40)."""
    groups = sorted({e.group for e in examples})
    if len(groups) < 2:
        raise DataError(f"need at least 2 distinct inputs to split, found {len(groups)}")
    random.Random(seed).shuffle(groups)
    n_fit = min(max(1, round(fit_fraction * len(groups))), len(groups) - 1)
    fit_groups = set(groups[:n_fit])
    fit = [e for e in examples if e.group in fit_groups]
    select = [e for e in examples if e.group not in fit_groups]
    return fit, select


# The share of select inputs whose key (E2E venue, WebNLG category) the fit split never sees,
# as in the test set (596 of E2E's 1,847 test MRs, 32%, name a venue no devel MR names; every
# test input of WebNLG's category-shift protocol is of a category training never sees), and how
# far a whole value may overshoot it: venues are small, but a WebNLG category holds up to a
# quarter of the inputs, and overshooting would take the fit split's 60%.
HELD_OUT_SHARE = {"venue": (1 / 3, 1.5), "category": (1.0, 1.0)}


def _units(examples: list[Example], together: str | None) -> dict[str, str]:
    """Input (``group``) -> its unit: the inputs tied, directly or through others, by sharing a
    value of the meta field ``together``, named by their first input in sorted order; each input
    its own unit when ``together`` is None."""
    parent = {e.group: e.group for e in examples}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = g = parent[parent[g]]
        return g

    if together is not None:
        first: dict[str, str] = {}
        for e in examples:
            value = dict(e.meta).get(together)
            if value is None:
                raise DataError(f"splitting with {together!r} kept together needs examples with their {together} "
                                f"(E2E: the CSV's orig_mr column); {e.group!r} has none")
            a, b = root(e.group), root(first.setdefault(value, e.group))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {g: root(g) for g in parent}


def split_by_held_out(examples: list[Example], key: str, fit_fraction: float = 0.6, seed: int = 0,
                      together: str | None = None):
    """The paper's sizes (``fit_fraction`` of the distinct inputs to fit), but the select split
    mirrors a test set whose ``key`` values (``venue`` or ``category``, from ``Example.meta``) are
    partly or wholly new: whole values, drawn in a seeded order, go to select until they hold
    about ``HELD_OUT_SHARE[key]``'s share of its inputs (a value that would overshoot that
    share by its factor is passed over); the rest of select is drawn by input from the remaining
    values (and the inputs without one). ``together``: a meta field (E2E ``origin``) whose
    shared values tie inputs into units that go to one side whole (``_units``); a held-out
    value's units go to select whole, so the few units that span two values take the other's
    inputs with them.

    Raises:
        DataError: an example without ``key`` (or ``together``) in its meta (E2E examples have a
            venue and an origin, WebNLG examples a category).
    """
    unseen_share, overshoot = HELD_OUT_SHARE[key]
    unit_of = _units(examples, together)
    members: dict[str, set[str]] = {}
    value_units: dict[str, set[str]] = {}
    for e in examples:
        if key not in dict(e.meta):
            raise DataError(f"split {key!r} needs examples with a {key} (E2E: venue, WebNLG: category); "
                            f"{e.group!r} has none")
        members.setdefault(unit_of[e.group], set()).add(e.group)
        value_units.setdefault(dict(e.meta)[key], set()).add(unit_of[e.group])
    n_inputs = len(unit_of)
    n_select = n_inputs - min(max(1, round(fit_fraction * n_inputs)), n_inputs - 1)
    target = unseen_share * n_select
    rng = random.Random(seed)
    values = sorted(v for v in value_units if v)
    rng.shuffle(values)
    held_units: set[str] = set()
    held = 0
    for v in values:
        if held >= target:
            break
        new = value_units[v] - held_units
        size = sum(len(members[u]) for u in new)
        if held + size <= overshoot * target:
            held_units |= new
            held += size
    rest = sorted(set(members) - held_units)
    rng.shuffle(rest)
    select_groups = {g for u in held_units for g in members[u]}
    for u in rest:
        if len(select_groups) >= n_select:
            break
        select_groups |= members[u]
    fit = [e for e in examples if e.group not in select_groups]
    select = [e for e in examples if e.group in select_groups]
    return fit, select


def split_examples(examples: list[Example], split: str = "input", fit_fraction: float = 0.6, seed: int = 0):
    """(fit, select) examples: ``split`` is ``input`` (``split_by_input``, the paper's), ``venue``
    or ``origin`` (E2E) or ``category`` (WebNLG; all ``split_by_held_out``). No input has
    references on both sides; with ``origin``, no original crowdsourced MR either.

    Raises:
        DataError: an unknown split, or too few inputs.
    """
    if split == "input":
        return split_by_input(examples, fit_fraction, seed)
    if split == "origin":
        return split_by_held_out(examples, "venue", fit_fraction, seed, together="origin")
    if split in HELD_OUT_SHARE:
        return split_by_held_out(examples, split, fit_fraction, seed)
    raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")


def group_references(examples: list[Example]) -> dict[str, list[str]]:
    """Distinct prompt -> all its references, in first-seen order (for multi-reference scoring)."""
    refs: dict[str, list[str]] = {}
    for e in examples:
        refs.setdefault(e.prompt, []).append(e.target)
    return refs
