"""Training recipes: the ``RunSpec`` fields that make a plugin design, set together.

Torch-free, so that ``vllm-plugin --help`` stays fast.
"""
from __future__ import annotations

from .data import template_prefix

# ``RunSpec()`` itself is the paper's design; the command line starts from ``DEFAULT_RECIPE``
# (``--alone``, the paper's small-model baseline, from "paper").
RECIPES = {
    # What the lever search chose on E2E's select split (README, Levers; the quality tables'
    # "chosen" row, plugin_shortlist_copy_task_gate_icl1): a shortlisted plugin with copy scores
    # on the task's input, trained against (and served behind) one in-context example drawn from
    # the fit split, with a gate fitted on select. Its E2E epochs take 15 to 17 s here
    # (benchmarks/results/pipeline.json).
    "chosen": {"shortlist_min_count": 1, "copy": True, "copy_task_only": True, "shots": 1, "gate": True},
    # The paper's plugin: it scores the whole vocabulary, on the plain prompt, nothing added.
    "paper": {"shortlist_min_count": 0, "copy": False, "copy_task_only": False, "shots": 0, "gate": False},
}
DEFAULT_RECIPE = "chosen"


def recipe(name: str, dataset: str) -> dict:
    """The ``RunSpec`` fields of training recipe ``name`` (``RECIPES``) for ``dataset``.

    Copy scores on the task's input find the task by the template's text before ``{input}``; a
    dataset whose template has none (``jsonl``) gets copy scores on the whole prompt instead.

    Raises:
        ValueError: an unknown recipe, naming the known ones.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown training recipe {name!r}; expected one of {sorted(RECIPES)}")
    fields = dict(RECIPES[name])
    fields["copy_task_only"] = fields["copy_task_only"] and bool(template_prefix(dataset))
    return fields
