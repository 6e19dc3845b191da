"""data -> base logits (cached) -> training -> checkpoint, as one call."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from vllm_plugin.base_model import DEFAULT_BASE, resolve_base, tokenizer_fingerprint
from vllm_plugin.checkpoint import read_config
from vllm_plugin.model import MAX_CANDIDATES, PluginConfig, build_plugin, count_parameters, read_start
from vllm_plugin.paths import cache_root

from .base_logits import (BaseLogits, cache_key, cached, extract_full, extract_topk_openai,
                          TokenizedSet, extract_topk_vllm, tokenize_examples, topk_view,
                          unigram_log_prior)
from .config import SOURCES, TrainConfig
from .recipes import RECIPES, recipe
from .data import (MAX_SHOTS, PROMPT_TEMPLATES, DataError, NearestShot, in_context_shots, load_examples,
                   split_examples, swap_names, swap_values, template_prefix, with_shots)
from .fetch import data_root
from .train import PairSet, task_shortlist, train

# Files each dataset trains on (the paper fits and selects on E2E's validation split).
TRAIN_FILES = {"e2e": "e2e/devel.csv", "webnlg": "webnlg/train.jsonl"}
TEST_FILES = {"e2e": "e2e/test.csv", "webnlg": "webnlg/dev.jsonl"}


def data_dir(dataset: str | None = None) -> Path:
    """The folder holding the default files of ``dataset`` (every default dataset when None):
    ``$VLLM_PLUGIN_DATA``, else the ``shared/data`` folder beside this checkout when it holds
    them, else the download cache, filled on first use (``training.fetch.data_root``).

    Raises:
        training.fetch.FetchError: the download failed or a checksum differs (nothing cached).
    """
    return data_root(dataset)


def default_data_file(dataset: str, split: str = "train") -> Path:
    """The default file of ``dataset`` (``e2e``/``webnlg``) for ``split`` (``train``, else test),
    in ``data_dir(dataset)`` (downloaded on first use).

    Raises:
        DataError: a dataset without a default file (``jsonl``: pass ``--data``).
        training.fetch.FetchError: the download failed or a checksum differs.
    """
    files = TRAIN_FILES if split == "train" else TEST_FILES
    if dataset not in files:
        raise DataError(f"dataset {dataset!r} has no default file; pass --data")
    return data_dir(dataset) / files[dataset]


@dataclass
class RunSpec:
    dataset: str = "e2e"
    data: str | None = None
    base: str = DEFAULT_BASE
    source: str = "full"
    top_k: int = 20
    endpoint: str | None = None
    endpoint_model: str | None = None
    arch: str = "gru"
    d_model: int = 256
    n_layers: int = 1
    dropout: float = 0.1  # the plugin's (PluginConfig.dropout)
    max_target_tokens: int = 256
    fit_fraction: float = 0.6
    split: str = "input"  # training.data.split_examples: input (the paper's) or venue (E2E)
    alone: bool = False  # train the small model on its own (the paper's "small model alone" baseline)
    name_swap: float = 0.0  # E2E: share of fit inputs whose venue names are invented (data.swap_names)
    value_swap: float = 0.0  # E2E: share of fit inputs whose attribute values are swapped (data.swap_values)
    gate: bool = False  # after training, fit a per-position strength on the select split (train.fit_gate)
    # E2E: fit that gate on select with its values redrawn (data.swap_values), not on select as it
    # is, so it learns where to defer to the base when an input's values are not the fit split's.
    gate_values: bool = False
    copy: bool = False  # the plugin learns copy scores for the prompt's tokens (PluginLM.add_copy_score)
    # Copy scores read the task's own input only: the prompt from the last occurrence of the
    # template's text before {input} (PluginConfig.copy_after), not the in-context examples.
    copy_task_only: bool = False
    # The plugin reads the prompt from that marker on too, not the in-context examples
    # (PluginConfig.read_task_only); the base still reads the whole prompt.
    read_task_only: bool = False
    # Example scores (PluginConfig.copy_example): a learned bonus on the in-context examples'
    # tokens that the task's segment does not hold.
    copy_example: bool = False
    # A second copy score on the copied tokens the output has not generated yet (coverage;
    # PluginConfig.copy_pending).
    copy_pending: bool = False
    # An input bag of the task's tokens added to the plugin's hidden state (PluginConfig.input_bag).
    input_bag: bool = False
    # > 0: candidate scores on the base's top tokens (PluginConfig.base_candidates), up to 20.
    base_candidates: int = 0
    # A top-k source: the prompt's copied tokens sit this many nats below the k-th log-prob in the
    # base's view, not in its flat tail (PluginConfig.copy_tail_offset); None: the flat tail.
    copy_tail_offset: float | None = None
    # A top-k source: the base's view shares the mass its top k leave by the fit targets' unigram
    # frequencies, add-this smoothed (PluginConfig.tail_prior); None: evenly (the flat tail).
    tail_prior: float | None = None
    # The power of that prior (PluginConfig.tail_prior_power): 1 the unigram frequencies, 0 flat.
    tail_prior_power: float = 1.0
    # > 0: a shortlisted plugin scoring the tokens that occur at least this often in the fit
    # split's prompts and targets (train.task_shortlist), one shared logit for the rest; 0: all.
    shortlist_min_count: int = 0
    # > 0: every prompt (fit and select) follows this many in-context examples drawn from the fit
    # split (data.in_context_shots): a plugin for a base that will be prompted with them.
    shots: int = 0
    # Which seeded draw of fit examples those are (data.in_context_shots; None: train.seed), so
    # that the example can be chosen on select (benchmarks/shots.py) without moving the split.
    shot_seed: int | None = None
    # With shots=1: the example is, per input, the fit example whose input is most like it
    # (data.NearestShot) instead of one drawn for all; send prompts built the same way.
    nearest_shot: bool = False
    # A meta field (E2E: venue) a fit input's nearest example must not share with it, so that
    # training sees examples as far from the input as new inputs get; "" for none.
    nearest_apart: str = ""
    out: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def out_dir(self) -> Path:
        tag = "alone" if self.alone else self.source
        return Path(self.out or f"runs/{self.dataset}-{self.arch}-{tag}")


def check_spec(spec: RunSpec, need_data: bool = True, make_out: bool = True) -> Path:
    """Fail before any long work: unknown source, missing data, unwritable output (``make_out``:
    created if missing; else not checked)."""
    if spec.source not in SOURCES:
        raise ValueError(f"unknown base-logit source {spec.source!r}; expected one of {SOURCES}")
    if spec.source == "openai" and not spec.endpoint:
        raise ValueError("source 'openai' needs --endpoint (an OpenAI-compatible base URL)")
    if spec.name_swap and spec.dataset != "e2e":
        raise ValueError(f"--name-swap is for E2E (it rewrites name[...] and near[...] values), not {spec.dataset!r}")
    if not 0.0 <= spec.name_swap <= 1.0:
        raise ValueError(f"--name-swap is a share of the fit inputs, in [0, 1]; got {spec.name_swap}")
    if spec.value_swap and spec.dataset != "e2e":
        raise ValueError(f"--value-swap is for E2E (it rewrites attribute values), not {spec.dataset!r}")
    if not 0.0 <= spec.value_swap <= 1.0:
        raise ValueError(f"--value-swap is a share of the fit inputs, in [0, 1]; got {spec.value_swap}")
    if spec.gate_values and (not spec.gate or spec.dataset != "e2e" or spec.nearest_shot or spec.alone):
        raise ValueError("--gate-values fits the gate on E2E select inputs with their values redrawn: it needs "
                         "--gate and --dataset e2e (and not --nearest-shot or --alone)")
    if not 0.0 <= spec.dropout < 1.0:
        raise ValueError(f"--dropout is a probability in [0, 1); got {spec.dropout}")
    if not 0 <= spec.shots <= MAX_SHOTS:
        raise ValueError(f"--shots is a number of in-context examples, 0 to {MAX_SHOTS}; got {spec.shots}")
    if spec.copy_task_only and not spec.copy:
        raise ValueError("--copy-task-only restricts copy scores: it needs --copy")
    if spec.copy_task_only and not template_prefix(spec.dataset):
        raise ValueError(f"--copy-task-only needs a prompt template with text before {{input}}; {spec.dataset!r}'s "
                         f"has none")
    if spec.read_task_only and not spec.copy_task_only:
        raise ValueError("--read-task-only reads the prompt from --copy-task-only's marker on: it needs --copy-task-only")
    if spec.copy_example and (not spec.copy_task_only or spec.read_task_only):
        raise ValueError("--copy-example scores the examples before --copy-task-only's marker: it needs "
                         "--copy-task-only, and not --read-task-only (the plugin must read the examples)")
    if spec.read_task_only and spec.arch != "gru":
        raise ValueError(f"--read-task-only is for the gru plugin, not --arch {spec.arch}")
    if spec.copy_pending and not spec.copy:
        raise ValueError("--copy-pending adds to copy scores: it needs --copy")
    if spec.input_bag and (not spec.copy_task_only or spec.arch != "gru"):
        raise ValueError("--input-bag averages the task's tokens from --copy-task-only's marker on: it needs "
                         f"--copy-task-only and the gru plugin (got --arch {spec.arch})")
    if not 0 <= spec.base_candidates <= MAX_CANDIDATES:
        raise ValueError(f"--base-candidates is a number of the base's top tokens, 0 to {MAX_CANDIDATES}; "
                         f"got {spec.base_candidates}")
    if not 0.0 <= spec.train.scheduled_sampling < 1.0:
        raise ValueError(f"--scheduled-sampling is a share of the target tokens, in [0, 1); got "
                         f"{spec.train.scheduled_sampling}")
    if spec.train.scheduled_sampling and spec.train.negatives:
        raise ValueError(f"--scheduled-sampling picks its tokens with the exact loss: drop --negatives "
                         f"{spec.train.negatives} (or --scheduled-sampling)")
    if spec.train.scheduled_sampling and spec.copy_pending:
        raise ValueError("--scheduled-sampling feeds the plugin tokens the reference does not hold, which "
                         "--copy-pending's training mask does not follow: drop one of them")
    if spec.base_candidates and spec.alone:
        raise ValueError("--base-candidates reads the base's top tokens: not with --alone")
    if spec.base_candidates and spec.train.negatives:
        raise ValueError("--base-candidates trains with the exact loss: not with --negatives")
    if spec.base_candidates and spec.top_k and spec.source != "full" and spec.base_candidates > spec.top_k:
        raise ValueError(f"--base-candidates {spec.base_candidates} is more than the {spec.top_k} top log-probs "
                         f"the source gives (--top-k)")
    if spec.copy_tail_offset is not None and (not spec.copy or spec.source == "full" or spec.alone
                                              or not -50 <= spec.copy_tail_offset <= 0):
        raise ValueError(f"--copy-tail-offset {spec.copy_tail_offset} lifts copied tokens out of a top-k view's "
                         f"flat tail: it needs --copy and a top-k --source (not 'full'), and nats in [-50, 0]")
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (spec.tail_prior or 1.0,
                                                                                   spec.tail_prior_power))
    if spec.tail_prior is not None and (spec.source == "full" or spec.alone or spec.copy_tail_offset is not None
                                        or not numbers or not 0 < spec.tail_prior <= 1e6
                                        or not 0 <= spec.tail_prior_power <= 1):
        raise ValueError(f"--tail-prior {spec.tail_prior} shares a top-k view's tail by the fit targets' unigram "
                         f"frequencies: it needs a top-k --source (not 'full'), a positive smoothing count, a power in "
                         f"[0, 1], and not --copy-tail-offset or --alone")
    if spec.tail_prior is None and spec.tail_prior_power != 1.0:
        raise ValueError("--tail-prior-power tempers the tail prior: it needs --tail-prior")
    if spec.shot_seed is not None and (not spec.shots or spec.nearest_shot):
        raise ValueError("--shot-seed chooses the drawn in-context examples: it needs --shots (and not --nearest-shot)")
    if spec.nearest_shot and spec.shots != 1:
        raise ValueError(f"--nearest-shot chooses one in-context example per input: it needs --shots 1, got {spec.shots}")
    if spec.nearest_apart and not spec.nearest_shot:
        raise ValueError("--nearest-apart is for --nearest-shot")
    if spec.nearest_shot and (spec.name_swap or spec.value_swap):
        raise ValueError("--nearest-shot and --name-swap / --value-swap: the examples are chosen among the fit inputs "
                         "before any values are rewritten; use one of them")
    if spec.copy_task_only and not spec.shots:
        raise ValueError("--copy-task-only keeps copy scores off the in-context examples: it needs --shots "
                         "(without examples the task's input is the whole prompt; use --copy alone)")
    if spec.shortlist_min_count < 0:
        raise ValueError(f"--shortlist-min-count must be >= 0 (0: the whole vocabulary); got {spec.shortlist_min_count}")
    if spec.shortlist_min_count and spec.train.negatives:
        raise ValueError("--negatives samples the vocabulary a shortlisted plugin does not score: a shortlist's "
                         "loss is exact at its own cost; drop --negatives, or pass --shortlist-min-count 0 (the "
                         "whole vocabulary; the default recipe shortlists)")
    if spec.train.negatives < 0 or spec.train.candidate_k < 1:
        raise ValueError(f"--negatives must be >= 0 and --candidate-k >= 1; got {spec.train.negatives}, "
                         f"{spec.train.candidate_k}")
    data = Path(spec.data) if spec.data else default_data_file(spec.dataset)
    if need_data and not data.is_file():
        raise DataError(f"dataset file {data} does not exist")
    if not make_out:
        return data
    out = spec.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"output folder {out} is not writable")
    return data


def base_logits_for(ts, spec: RunSpec, base_path: str, fingerprint: str, model_loader, progress=True,
                    refresh: bool = False):
    key = cache_key(ts, base_path, fingerprint, spec.source, None if spec.source == "full" else spec.top_k)
    folder = cache_root() / "base_logits" / key

    def build() -> BaseLogits:
        if spec.source == "full":
            bl = extract_full(model_loader(), ts, progress=progress)
        elif spec.source == "full_topk":
            full_spec = replace(spec, source="full")
            bl = topk_view(base_logits_for(ts, full_spec, base_path, fingerprint, model_loader, progress, refresh),
                           ts, spec.top_k, progress=progress)
        elif spec.source == "vllm":
            from vllm import LLM

            from vllm_plugin.serving import fast_dtype

            llm = LLM(model=base_path, max_logprobs=spec.top_k, enforce_eager=True, seed=0, dtype=fast_dtype())
            bl = extract_topk_vllm(llm, ts, spec.top_k, progress=progress)
            del llm
        else:
            bl = extract_topk_openai(spec.endpoint, spec.endpoint_model or base_path, ts,
                                     vocab_size=base_vocab_size(base_path), k=spec.top_k, progress=progress)
        bl.meta.update(base=base_path, tokenizer_fingerprint=fingerprint, source=spec.source)
        return bl

    return cached(folder, build, refresh)


class LazyBase:
    """The frozen base as a transformers model, loaded on the first call only: cached base
    log-probs need no base at all."""

    def __init__(self, path: str):
        self.path, self.model = path, None

    def __call__(self):
        if self.model is None:
            import torch
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()
        return self.model


def base_vocab_size(base_path: str) -> int:
    """How many tokens the base at ``base_path`` scores (its config's text vocabulary size)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(base_path).get_text_config().vocab_size


RESUME_KEYS = ("dataset", "source", "top_k", "fit_fraction", "split", "name_swap", "value_swap", "seed", "alone",
               "negatives", "candidate_k", "group_by_prompt", "shortlist_min_count", "shortlist", "dropout", "shots",
               "nearest_shot", "nearest_apart", "copy_task_only", "read_task_only", "copy_example", "base_candidates",
               "scheduled_sampling", "shot_seed", "copy_tail_offset", "tail_prior",
               "tail_prior_power")
RESUME_DEFAULTS = {"name_swap": 0.0, "value_swap": 0.0, "negatives": 0, "candidate_k": 32, "group_by_prompt": False,
                   "shortlist_min_count": 0, "shortlist": None, "dropout": 0.1, "shots": 0, "nearest_shot": False, "nearest_apart": "",
                   "copy_task_only": False, "read_task_only": False, "copy_example": False, "base_candidates": 0,
                   "scheduled_sampling": 0.0, "shot_seed": None, "copy_tail_offset": None,
                   "tail_prior": None, "tail_prior_power": 1.0}


def task_marker(tokenizer, dataset: str, prompts: list[list[int]], segments: int) -> list[int]:
    """The token ids of the prompt template's text before ``{input}`` (``PluginConfig.copy_after``):
    copy scores read each prompt from its last occurrence on, the task's own segment. Only the
    tokens that stay the same whatever input follows: a BPE tokenizer may merge the text's last
    character with the input's first (Qwen2.5 writes "Attributes:" then a newline as "Attributes",
    ":\n"), so a marker ending in that character would never occur in a prompt. Its start is kept:
    a tokenizer that writes the text's first word otherwise after an example (SentencePiece's
    leading "▁") is refused.

    Raises:
        ValueError: no token of that text survives the input after it; or some prompt (fit or
            select, tokenised, ``prompts``) does not hold those ids
            exactly ``segments`` times (once per in-context example and once for the task): the
            tokenizer writes that text otherwise at the start of a prompt than after an example,
            so the last occurrence would not start the task.
    """
    prefix = template_prefix(dataset)
    template = PROMPT_TEMPLATES.get(dataset, "{input}").lstrip()
    alone, *in_context = (tokenizer(text, add_special_tokens=False).input_ids
                          for text in (prefix, template.replace("{input}", "0"), template.replace("{input}", "x")))
    marker = alone[:next((i for i, tok in enumerate(alone) if any(i >= len(c) or c[i] != tok for c in in_context)),
                         len(alone))]
    if not marker:
        raise ValueError(f"--copy-task-only: this tokenizer merges all of the template's text before {{input}} "
                         f"({prefix!r}) with the input that follows; give the template more text before {{input}}")
    m = len(marker)
    wrong = sum(sum(p[i:i + m] == marker for i in range(len(p) - m + 1)) != segments for p in prompts)
    if wrong:
        raise ValueError(f"--copy-task-only: {wrong} of {len(prompts)} prompts do not hold the template's text "
                         f"before {{input}} ({prefix!r}; its first {m} of {len(alone)} tokens, those the input "
                         f"cannot change) {segments} time(s) (once per in-context example and for the task): this "
                         f"tokenizer writes it otherwise at the start of a prompt than after an example")
    return marker


def run_finished(spec: RunSpec) -> bool:
    """Whether ``spec``'s run folder holds a finished run: its metrics written and, for a gated
    run, its gate fitted (or recorded as None: no epoch to gate). ``train`` writes the training's
    metrics before the gate is fitted, so a run stopped while fitting it has them but no gate;
    running it again resumes past its last epoch and fits the gate."""
    path = spec.out_dir() / "metrics.json"
    return path.is_file() and (not spec.gate or spec.alone or "gate" in json.loads(path.read_text()))


def gate_checkpoint(checkpoint: Path, select, log=print) -> dict:
    """Give the plugin at ``checkpoint`` a gate fitted on ``select`` and save it in place."""
    from vllm_plugin.checkpoint import load_plugin, save_plugin

    from .train import fit_gate

    trained = load_plugin(checkpoint)
    gated = build_plugin(replace(trained.config, gate=True))
    gated.load_state_dict(trained.state_dict(), strict=False)
    result = fit_gate(gated.eval(), select, log=log)
    save_plugin(gated, checkpoint)
    return result


def check_resume(spec: RunSpec, previous: PluginConfig, fingerprint: str, training: dict) -> None:
    """Refuse to resume ``spec.out_dir()`` (whose resume point's config is ``previous``) with a
    run of another base, plugin or training (``RESUME_KEYS``; epochs and patience may grow).

    Raises:
        ValueError: naming what differs and the fixes (another --out, --no-resume, or the
            --recipe the folder was trained with).
    """
    mine = (fingerprint, spec.arch, spec.d_model, spec.n_layers, spec.copy, spec.copy_pending, spec.input_bag)
    theirs = (previous.tokenizer_fingerprint, previous.architecture, previous.d_model, previous.n_layers,
              previous.copy, previous.copy_pending, previous.input_bag)
    differ = [f"{k}: {a!r} then, {b!r} now" for k, a, b in zip(
        ("tokenizer", "arch", "d_model", "layers", "copy", "copy_pending", "input_bag"), theirs, mine) if a != b]
    differ += [f"{k}: {previous.training.get(k, RESUME_DEFAULTS.get(k))!r} then, {v!r} now"
               for k, v in training.items() if k in RESUME_KEYS
               and previous.training.get(k, RESUME_DEFAULTS.get(k)) != v]
    if differ:
        was = [name for name, r in ((n, recipe(n, spec.dataset)) for n in RECIPES) if previous.copy == r["copy"]
               and all(previous.training.get(k, RESUME_DEFAULTS[k]) == r[k]
                       for k in ("shortlist_min_count", "copy_task_only", "shots"))]
        hint = f" (it looks like --recipe {was[0]})" if was else ""
        raise ValueError(f"{spec.out_dir()} holds a run of another base, plugin or training ({'; '.join(differ)}): "
                         f"to continue it, pass the options it was trained with{hint}; else choose another "
                         f"--out, or pass --no-resume to start over there (its checkpoint is then replaced)")


@dataclass
class Splits:
    """A run's data as the base and the plugin read it (``tokenized_splits``)."""

    data_file: Path
    base_path: str
    tokenizer: object
    fingerprint: str
    fit_ex: list
    select_ex: list
    shots: list
    nearest: object  # NearestShot, or None
    fit_ts: TokenizedSet
    select_ts: TokenizedSet
    gate_ts: TokenizedSet  # select_ts unless spec.gate_values


def tokenized_splits(spec: RunSpec, examples: list | None = None, log=print, make_out: bool = True) -> Splits:
    """The fit, select and gate splits of ``spec`` as the base reads them (prompts behind their
    in-context examples, fit values swapped as asked), tokenised: the rows of their base-logit
    caches. ``examples`` replaces reading ``spec.data``; ``make_out``: as ``check_spec``.

    Raises:
        DataError, FileNotFoundError: as ``check_spec``.
    """
    from transformers import AutoTokenizer

    data_file = check_spec(spec, need_data=examples is None, make_out=make_out)
    base_path = resolve_base(spec.base)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if examples is None:
        examples = load_examples(spec.dataset, data_file)
    fit_ex, select_ex = split_examples(examples, spec.split, spec.fit_fraction, seed=spec.train.seed)
    # What the gate is fitted on: select, or select with its values redrawn (devel's values only),
    # by another draw than the one levers' --select-view values scores on.
    gate_ex = (swap_values(select_ex, 1.0, seed=spec.train.seed + 1, values_from=fit_ex + select_ex)
               if spec.gate_values else select_ex)
    shot_seed = spec.train.seed if spec.shot_seed is None else spec.shot_seed
    shots = in_context_shots(fit_ex, spec.shots, seed=shot_seed)  # drawn before any name swap
    nearest = NearestShot(fit_ex) if spec.nearest_shot else None
    nearest_fit = NearestShot(fit_ex, spec.nearest_apart) if spec.nearest_apart else nearest
    if spec.name_swap:  # the fit split only: select stays the real data that choices are made on
        fit_ex = swap_names(fit_ex, spec.name_swap, seed=spec.train.seed)
    if spec.value_swap:
        # Among the values of the fit split as rewritten so far: invented names too with --name-swap.
        fit_ex = swap_values(fit_ex, spec.value_swap, seed=spec.train.seed)
    if nearest:  # trained against the base as it will be prompted
        fit_ex = [replace(e, prompt=with_shots(e.prompt, [nearest_fit(e)])) for e in fit_ex]
        select_ex = [replace(e, prompt=with_shots(e.prompt, [nearest(e)])) for e in select_ex]
    elif shots:
        fit_ex, select_ex, gate_ex = ([replace(e, prompt=with_shots(e.prompt, shots)) for e in part]
                                      for part in (fit_ex, select_ex, gate_ex))
    log(f"{spec.dataset}: {len(examples)} examples over {len({e.group for e in examples})} inputs "
        f"-> fit {len(fit_ex)} / select {len(select_ex)}")
    fit_ts = tokenize_examples(fit_ex, tokenizer, spec.max_target_tokens)
    select_ts = tokenize_examples(select_ex, tokenizer, spec.max_target_tokens)
    gate_ts = tokenize_examples(gate_ex, tokenizer, spec.max_target_tokens) if spec.gate_values else select_ts
    return Splits(data_file, base_path, tokenizer, fingerprint, fit_ex, select_ex, shots, nearest,
                  fit_ts, select_ts, gate_ts)


def run(spec: RunSpec, progress: bool = True, log=print, refresh_cache: bool = False,
        examples: list | None = None) -> dict:
    """Train one plugin; returns metrics with timings and the checkpoint path.

    ``refresh_cache`` recomputes the base log-probs even when cached (benchmarks time it).
    ``examples`` replaces reading ``spec.data`` (e.g. a category-filtered WebNLG).
    """
    import torch

    t_start = time.time()
    splits = tokenized_splits(spec, examples, log)
    data_file, base_path, fingerprint = splits.data_file, splits.base_path, splits.fingerprint
    tokenizer, shots, nearest = splits.tokenizer, splits.shots, splits.nearest
    fit_ts, select_ts, gate_ts = splits.fit_ts, splits.select_ts, splits.gate_ts

    copy_after = (task_marker(tokenizer, spec.dataset, fit_ts.prompts + select_ts.prompts, spec.shots + 1)
                  if spec.copy_task_only else [])  # checked before the long base pass
    shortlist = task_shortlist(fit_ts, spec.shortlist_min_count) if spec.shortlist_min_count else None
    training = {"dataset": spec.dataset, "data": str(data_file), "source": spec.source,
                "top_k": None if spec.source == "full" else spec.top_k, "fit_fraction": spec.fit_fraction,
                "split": spec.split, "name_swap": spec.name_swap, "value_swap": spec.value_swap,
                "seed": spec.train.seed, "alone": spec.alone, "negatives": spec.train.negatives,
                "candidate_k": spec.train.candidate_k, "group_by_prompt": spec.train.group_by_prompt,
                "shortlist_min_count": spec.shortlist_min_count, "dropout": spec.dropout, "shots": spec.shots,
                "shot_seed": spec.shot_seed,
                "nearest_shot": spec.nearest_shot, "nearest_apart": spec.nearest_apart,
                "copy_task_only": spec.copy_task_only, "read_task_only": spec.read_task_only,
                "copy_example": spec.copy_example, "base_candidates": spec.base_candidates,
                "scheduled_sampling": spec.train.scheduled_sampling, "copy_tail_offset": spec.copy_tail_offset,
                "tail_prior": spec.tail_prior, "tail_prior_power": spec.tail_prior_power,
                # Which tokens, not only how often: other data would give another shortlist.
                "shortlist": None if shortlist is None else hashlib.sha256(str(shortlist).encode()).hexdigest()[:16]}
    resume_model = spec.out_dir() / "resume" / "model"
    previous = read_config(resume_model) if resume_model.is_dir() else None
    if previous is not None:  # before the long base pass
        check_resume(spec, previous, fingerprint, training)
    load_base = LazyBase(base_path)
    t0 = time.time()
    fit_bl = select_bl = gate_bl = None
    if not spec.alone:
        fit_bl = base_logits_for(fit_ts, spec, base_path, fingerprint, load_base, progress, refresh_cache)
        select_bl = base_logits_for(select_ts, spec, base_path, fingerprint, load_base, progress, refresh_cache)
        gate_bl = (base_logits_for(gate_ts, spec, base_path, fingerprint, load_base, progress, refresh_cache)
                   if spec.gate_values else select_bl)
        if spec.copy_tail_offset is not None:  # the base as the processor will show it to this plugin
            fit_bl, select_bl, gate_bl = (bl.with_lift(ts, copy_after, spec.copy_tail_offset) for bl, ts in
                                          ((fit_bl, fit_ts), (select_bl, select_ts), (gate_bl, gate_ts)))
            gate_bl = gate_bl if spec.gate_values else select_bl
        if spec.tail_prior is not None:  # the tail as the processor will share it for this plugin
            tail_prior = unigram_log_prior(fit_ts, fit_bl.vocab_size, spec.tail_prior, spec.tail_prior_power)
            fit_bl, select_bl = fit_bl.with_tail_prior(tail_prior), select_bl.with_tail_prior(tail_prior)
            gate_bl = gate_bl.with_tail_prior(tail_prior) if spec.gate_values else select_bl
    base_logits_s = time.time() - t0
    load_base = None  # free the base before training

    vocab_size = fit_bl.vocab_size if fit_bl is not None else base_vocab_size(base_path)
    config = PluginConfig(
        vocab_size=vocab_size, architecture=spec.arch, d_model=spec.d_model, n_layers=spec.n_layers,
        dropout=spec.dropout, copy=spec.copy, copy_after=copy_after, read_task_only=spec.read_task_only,
        copy_example=spec.copy_example, copy_pending=spec.copy_pending, input_bag=spec.input_bag,
        base_candidates=spec.base_candidates, copy_tail_offset=spec.copy_tail_offset, tail_prior=spec.tail_prior,
        tail_prior_power=spec.tail_prior_power,
        shortlist_size=0 if shortlist is None else len(shortlist),
        tokenizer_fingerprint=fingerprint, base_model=base_path,
        prompt_template=with_shots(PROMPT_TEMPLATES.get(spec.dataset, "{input}"), [] if nearest else shots),
        training=training,
    )
    if previous is not None and previous.vocab_size != vocab_size:
        raise ValueError(f"{spec.out_dir()} holds a run for a vocabulary of {previous.vocab_size}; this base has "
                         f"{vocab_size}: choose another --out or pass --no-resume")
    torch.manual_seed(spec.train.seed)
    plugin = build_plugin(config)
    if shortlist is not None:
        plugin.set_shortlist(shortlist)
    if spec.tail_prior is not None:
        plugin.set_tail_prior(tail_prior)
    log(f"plugin: {spec.arch}, {count_parameters(plugin) / 1e6:.1f}M parameters"
        + (f", a shortlist of {len(shortlist)} of {vocab_size} tokens" if shortlist is not None else ""))
    t1 = time.time()
    # What the plugin reads of each prompt (all of it, or the task from the marker on); the base's
    # log-probs, one row per target token, are those of the whole prompt either way.
    fit_read, select_read = (ts.read_from(lambda p: read_start(config, p)) for ts in (fit_ts, select_ts))
    metrics = train(plugin, PairSet(fit_read, fit_bl), PairSet(select_read, select_bl), spec.train,
                    spec.out_dir(), progress=progress, log=log)
    if spec.gate and not spec.alone:  # None: no epoch beat the base, so no plugin to gate
        t_gate = time.time()
        gate_read = gate_ts.read_from(lambda p: read_start(config, p)) if spec.gate_values else select_read
        metrics["gate"] = (gate_checkpoint(spec.out_dir() / "checkpoint", PairSet(gate_read, gate_bl), log)
                           if metrics.get("best_epoch") else None)
        if metrics["gate"] is not None:
            metrics["gate"]["select_view"] = "values" if spec.gate_values else "real"
        metrics["gate_s"] = time.time() - t_gate
    metrics.update(
        checkpoint=str(spec.out_dir() / "checkpoint"), base_logits_s=base_logits_s,
        train_s=time.time() - t1, wall_s=time.time() - t_start, source=None if spec.alone else spec.source,
        base_model=base_path, fit_tokens_forwarded=sum(map(len, fit_ts.prompts)) + fit_ts.num_target_tokens,
        select_tokens_forwarded=sum(map(len, select_ts.prompts)) + select_ts.num_target_tokens,
    )
    (spec.out_dir() / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
