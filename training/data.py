"""Task data: (prompt, target) examples grouped by distinct input, with per-dataset prompts.

Datasets: E2E (CSV; references grouped by meaning representation), WebNLG (JSON Lines of
triples and references), and a generic JSON Lines of ``{"prompt", "completion"}`` for users'
own tasks. Splits follow the paper: distinct inputs, shuffled with a seed, 60% to fit and
40% to select.
"""
from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

DATASETS = ("e2e", "webnlg", "jsonl")

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
                prompt = format_prompt("e2e", mr, template)
            except ValueError as e:
                raise DataError(f"{path}:{line}: {e}") from e
            examples.append(Example(group=mr, prompt=prompt, target=ref))
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


def group_references(examples: list[Example]) -> dict[str, list[str]]:
    """Distinct prompt -> all its references, in first-seen order (for multi-reference scoring)."""
    refs: dict[str, list[str]] = {}
    for e in examples:
        refs.setdefault(e.prompt, []).append(e.target)
    return refs
