"""The plugin inside vLLM: a logits processor with per-sequence plugin state.

Server-wide, the engine's ``additional_config`` names the plugin checkpoints to load at engine
start: ``--additional-config '{"vllm_plugin": {"plugins": {"e2e": "/ckpt/e2e"}}}'`` (or
``LLM(additional_config=...)``), or, as a convenience, ``$PLUGIN_LM_TABLE`` holds the table as
JSON (``{"e2e": "/ckpt/e2e"}``) or ``name=path,name2=path2``; ``additional_config`` wins when it
has the ``vllm_plugin`` key (see ``plugin_table``). Per request,
``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP) choose one by name and its strength:
``{"plugin": "e2e", "plugin_weight": 1.0}``. A request without ``plugin`` is untouched.
``plugin_mode`` picks how the experts combine: ``product`` (default, the paper),
``mixture`` (``w * p_plugin + (1 - w) * p_base``, a baseline) or ``alone`` (the plugin only).
A plugin trained from the base's top-k log-probs (a closed API's view) decodes against the
same view of the base: its top-k log-probs and a flat tail, or the tail it was trained with
(``experts.base_top_k``);
``plugin_base_top_k`` overrides that per request (0: the full base).

Every step, each row that uses a plugin advances that plugin's state by the tokens it has not
seen yet (the whole prompt when the row is new, else the one token sampled last step) and
gets ``weight * log_softmax(plugin logits)`` added to its logits: the product of experts of
the paper, renormalised by the sampler's softmax. Rows of different plugins share a batch;
each plugin group costs one state update and one head matmul.

One class, ``PluginLogitsProcessor``, serves both of vLLM's model runners (V1, used on CPU,
and Model Runner V2, the GPU default), so the installed entry point works under either.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import weakref
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import torch

from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from .bank import NO_PENALTY, PluginBank
from .experts import Mode

# A child of vLLM's "vllm" logger: vLLM configures only that one (its handler, format and
# VLLM_LOGGING_LEVEL, with propagate=False), so a logger outside it ("vllm_plugin") reaches only
# Python's last-resort handler, which drops INFO: `vllm serve` never showed our start-up lines.
logger = logging.getLogger("vllm.vllm_plugin")

# The server-wide table: the engine's additional_config[CONFIG_KEY][CONFIG_PLUGINS] (travels
# inside the engine config to every process and node), else $ENV_VAR. Not VLLM_PLUGINS: that is
# vLLM's own allowlist of vLLM plugins; and not any VLLM_* name: vLLM warns about VLLM_* variables
# it does not know, and `--fail-on-environ-validation` refuses to start with one.
CONFIG_KEY = "vllm_plugin"
CONFIG_PLUGINS = "plugins"
ENV_VAR = "PLUGIN_LM_TABLE"
LEGACY_ENV_VAR = "VLLM_PLUGINS"
CONFIG_SOURCE = f"--additional-config {CONFIG_KEY}.{CONFIG_PLUGINS}"
ENV_SOURCE = f"${ENV_VAR}"
ARG_PLUGIN = "plugin"
ARG_WEIGHT = "plugin_weight"
ARG_MODE = "plugin_mode"
ARG_TOP_K = "plugin_base_top_k"
# vLLM's three penalties, applied by the processor to the combined logits with vLLM's formulas:
# vLLM's own act after custom processors on V1 and before them on Model Runner V2, so on a
# plugin request they would decode differently by runner (admission refuses them there).
ARG_PENALTIES = ("plugin_repetition_penalty", "plugin_frequency_penalty", "plugin_presence_penalty")
VLLM_PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")
# The paper's repetition penalty: on each expert's logits before the product, generated tokens only.
ARG_EXPERT_PENALTY = "plugin_expert_repetition_penalty"
# Beam search sends each step as a fresh request whose prompt is the beam so far: this many of
# its last prompt tokens are the beam's output, not the user's prompt (``beam.plugin_beam_search``
# sets it; copy scores and penalties then read the prompt as the user sent it).
ARG_BEAM_TOKENS = "plugin_beam_tokens"
MAX_WEIGHT = 100.0
MAX_TOP_K = 1000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PluginConfigError(ValueError):
    pass


# ----- configuration --------------------------------------------------------------------------
def parse_table(raw, source: str) -> dict[str, str]:
    """Plugin name -> checkpoint folder from ``raw``: a mapping, a JSON object string, or
    ``name=path,name2=path2``; ``source`` names where it came from, for the errors.

    Raises:
        PluginConfigError: ``raw`` is none of those, a path is not a non-empty string, or a name
            is not letters, digits, '_', '.', '-' (at most 64); the message names ``source``.
    """
    fix = 'give {"name": "/checkpoint/folder", ...} or name=/checkpoint/folder,name2=...'
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            return {}
        if raw.startswith("{"):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise PluginConfigError(f"{source} is not valid JSON ({e}): {fix}") from e
        else:
            table = {}
            for item in raw.split(","):
                name, sep, path = item.partition("=")
                if not sep or not path.strip():
                    raise PluginConfigError(f"{source} entry {item!r} is not name=path: {fix}")
                table[name.strip()] = path.strip()
            raw = table
    if not isinstance(raw, Mapping) or not all(isinstance(v, str) and v.strip() for v in raw.values()):
        raise PluginConfigError(f"{source} must map plugin names to checkpoint folders, got {raw!r}: {fix}")
    for name in raw:
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginConfigError(f"plugin name {name!r} in {source}: use letters, digits, '_', '.', '-'")
    return {name: path.strip() for name, path in raw.items()}


def _config_table(additional_config) -> dict[str, str] | None:
    """The table in an engine's ``additional_config``; None when it has no ``vllm_plugin`` key.

    Raises:
        PluginConfigError: the ``vllm_plugin`` entry is malformed (see ``parse_table``).
    """
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    ours = additional_config[CONFIG_KEY]
    if not isinstance(ours, Mapping) or set(ours) - {CONFIG_PLUGINS}:
        raise PluginConfigError(
            f"--additional-config {CONFIG_KEY} must be {{\"{CONFIG_PLUGINS}\": {{\"name\": \"/checkpoint\", ...}}}}, "
            f"got {ours!r}")
    return parse_table(ours.get(CONFIG_PLUGINS) or {}, CONFIG_SOURCE)


_warned_config: set[str] = set()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned_config:
        _warned_config.add(key)
        logger.warning(message, *args)


def plugin_table(vllm_config=None, environ=os.environ) -> tuple[dict[str, str], str]:
    """The plugins an engine serves and where the table came from: ``(table, source)``.

    Precedence: the engine's ``additional_config`` (``--additional-config`` /
    ``LLM(additional_config=...)``) when it has the ``vllm_plugin`` key, even an empty table
    (which turns the plugins off for that engine); else ``$PLUGIN_LM_TABLE``; else none (the
    processor stays inert). ``$VLLM_PLUGINS`` is vLLM's and never read here, whatever it holds.

    Raises:
        PluginConfigError: the chosen source is malformed; the message names it.
    """
    from_config = _config_table(getattr(vllm_config, "additional_config", None))
    env_raw = environ.get(ENV_VAR, "").strip()
    if from_config is not None:
        if env_raw:
            _warn_once("both", "vllm_plugin: %s is set and ignored: %s takes precedence", ENV_SOURCE, CONFIG_SOURCE)
        return from_config, CONFIG_SOURCE
    if env_raw:
        return parse_table(env_raw, ENV_SOURCE), ENV_SOURCE
    legacy = environ.get(LEGACY_ENV_VAR, "")
    if "=" in legacy or legacy.lstrip().startswith("{"):
        _warn_once("legacy", "vllm_plugin: $%s looks like a plugin table, but it is vLLM's plugin allowlist and "
                   "vllm_plugin no longer reads it (it also stops vLLM loading its own plugins): move the "
                   "table to %s or %s", LEGACY_ENV_VAR, CONFIG_SOURCE, ENV_SOURCE)
    return {}, "none"


def configured_plugins(environ=os.environ, vllm_config=None) -> dict[str, str]:
    """Plugin name -> checkpoint folder for an engine (``plugin_table`` without the source).

    Raises:
        PluginConfigError: see ``plugin_table``.
    """
    return plugin_table(vllm_config, environ)[0]


class RequestPlugin(NamedTuple):
    name: str | None
    weight: float = 0.0
    mode: Mode = Mode.PRODUCT
    top_k: int | None = None  # the base's top-k view; None: the plugin's own (its training's)
    penalties: tuple[float, float, float] = NO_PENALTY  # repetition, frequency, presence
    expert_penalty: float = 1.0  # the paper's: each expert, generated tokens, before the product
    beam_tokens: int = 0  # last prompt tokens that a beam search generated (counted as output)

    def prompt_len(self, sent: int) -> int:
        """How many of the ``sent`` prompt tokens are the user's prompt: all but those a beam
        search generated."""
        return max(0, sent - self.beam_tokens)


def penalty_args(repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0) -> dict:
    """vLLM's penalties as a plugin request's ``extra_args`` (the defaults left out)."""
    values = (repetition_penalty, frequency_penalty, presence_penalty)
    return {arg: v for arg, v, default in zip(ARG_PENALTIES, values, NO_PENALTY) if v != default}


def _check_penalty(arg: str, value, low: float, high: float, low_open: bool) -> float:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        raise ValueError(f"'{arg}' must be a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


def request_plugin(params, known: dict | None = None, vocab_size: Callable[[str], int] | None = None,
                   candidates: Callable[[str], int] | None = None) -> RequestPlugin:
    """How a request uses a plugin (``name`` None: it does not).

    ``params.extra_args`` (``vllm_xargs`` over HTTP) is read; ``known``: the servable plugin
    names (keys; default: ``configured_plugins()``); ``vocab_size(name)``: the number of tokens that
    plugin (= the base) scores, bounding ``plugin_base_top_k`` (None: not checked here);
    ``candidates(name)``: how many of the base's top tokens that plugin's candidate scores read
    (``PluginConfig.base_candidates``), the least ``plugin_base_top_k`` above 0 it can decode with
    (None: not checked here).

    Raises:
        ValueError: an argument the engine could not serve exactly as asked, with the reason:
            an unknown plugin or argument name, a weight that is not a finite number in range
            (booleans included), an unknown mode, a top-k that is not an integer in
            ``[0, min(MAX_TOP_K, vocabulary size)]`` or that shows the base's top tokens to a plugin
            with candidate scores on more of them; ``CheckpointError`` (a ValueError) if a
            configured checkpoint's config cannot be read for its vocabulary size.
    """
    args = getattr(params, "extra_args", None) or {}
    if not isinstance(args, Mapping):
        raise ValueError(f"extra_args must be a mapping of argument names to values, got {type(args).__name__}")
    name = args.get(ARG_PLUGIN)
    weight = args.get(ARG_WEIGHT, 1.0)
    mode = args.get(ARG_MODE, "product")
    top_k = args.get(ARG_TOP_K)
    ours = (ARG_PLUGIN, ARG_WEIGHT, ARG_MODE, ARG_TOP_K, *ARG_PENALTIES, ARG_EXPERT_PENALTY, ARG_BEAM_TOKENS)
    stray = [k for k in args if isinstance(k, str) and k.startswith("plugin") and k not in ours]
    if stray:
        raise ValueError(f"unknown plugin argument(s) {stray}; expected {', '.join(map(repr, ours))}")
    if name is None:
        given = [k for k in ours[1:] if k in args]
        if given:
            raise ValueError(f"{given} given without '{ARG_PLUGIN}'")
        return RequestPlugin(None)
    known = configured_plugins() if known is None else known
    if not isinstance(name, str) or name not in known:
        available = ", ".join(sorted(known)) or f"none (configure {CONFIG_SOURCE} or {ENV_SOURCE} on the server)"
        raise ValueError(f"unknown plugin {name!r}; available: {available}")
    try:
        mode = Mode.parse(mode)
    except ValueError as e:
        raise ValueError(f"'{ARG_MODE}': {e}") from None
    top = 1.0 if mode == Mode.MIXTURE else MAX_WEIGHT
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
            or not 0.0 <= weight <= top:
        raise ValueError(f"'{ARG_WEIGHT}' must be a number in [0, {top:g}] for mode {mode.label}, got {weight!r}")
    if top_k is not None:
        vocab = vocab_size(name) if vocab_size is not None else None
        limit = MAX_TOP_K if vocab is None else min(MAX_TOP_K, vocab)
        wanted = candidates(name) if candidates is not None else 0
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= limit:
            scope = "" if vocab is None else f"; plugin '{name}' and the base score {vocab} tokens"
            scope += f"; with its candidate scores, 0 or at least {wanted}" if wanted else ""
            raise ValueError(f"'{ARG_TOP_K}' must be an integer in [0, {limit}] (0: the full base{scope}), "
                             f"got {top_k!r}")
        if 0 < top_k < wanted:  # the plugin would read more of the base than the view shows
            raise ValueError(f"'{ARG_TOP_K}'={top_k}: plugin '{name}' scores the base's top {wanted} tokens "
                             f"(candidate scores), so it needs 0 (the full base) or at least {wanted}")
    vllm_set = [p for p, default in zip(VLLM_PENALTIES, NO_PENALTY) if getattr(params, p, default) != default]
    if vllm_set:
        given = ", ".join(f"{p}={getattr(params, p)!r}" for p in vllm_set)
        raise ValueError(
            f"{given} with a plugin: vLLM applies its penalties after the plugin on the V1 model runner and "
            f"before it on Model Runner V2, so the request would decode differently by runner. Pass "
            f"{', '.join('plugin_' + p for p in vllm_set)} in extra_args (vllm_xargs over HTTP) instead: "
            f"vLLM's formulas, applied to the combined logits on every runner")
    penalties = (_check_penalty(ARG_PENALTIES[0], args.get(ARG_PENALTIES[0], 1.0), 0.0, MAX_WEIGHT, True),
                 _check_penalty(ARG_PENALTIES[1], args.get(ARG_PENALTIES[1], 0.0), -2.0, 2.0, False),
                 _check_penalty(ARG_PENALTIES[2], args.get(ARG_PENALTIES[2], 0.0), -2.0, 2.0, False))
    expert = _check_penalty(ARG_EXPERT_PENALTY, args.get(ARG_EXPERT_PENALTY, 1.0), 0.0, MAX_WEIGHT, True)
    beam_tokens = args.get(ARG_BEAM_TOKENS, 0)
    if isinstance(beam_tokens, bool) or not isinstance(beam_tokens, int) or beam_tokens < 0:
        raise ValueError(f"'{ARG_BEAM_TOKENS}' must be a non-negative integer (how many of the prompt's last "
                         f"tokens a beam search generated), got {beam_tokens!r}")
    return RequestPlugin(name, float(weight), mode, top_k, penalties, expert, beam_tokens)


@functools.lru_cache(maxsize=64)
def _checkpoint_config(path: str):
    """A checkpoint's ``PluginConfig`` (its ``config.json``, read once per path).

    Raises:
        CheckpointError: the folder or its config is missing or invalid.
    """
    from .checkpoint import read_config

    return read_config(path)


def validate_request(params) -> None:
    """Admission check, run by vLLM's frontend (``validate_params``) before the engine sees the
    request, so nothing a request carries can fail inside the engine step.

    The table is the admitting engine's: vLLM passes no config here, so ``admission.admitting_engine``
    finds the frontend's ``InputProcessor`` on the call stack and its ``additional_config`` is read
    (else ``$PLUGIN_LM_TABLE``). The vocabulary size comes from each configured plugin's checkpoint
    config (``load_plugin`` refuses a plugin whose vocabulary differs from the base's).

    Raises:
        ValueError: see ``request_plugin``; ``PluginConfigError`` (a ValueError) if the table
            itself is malformed.
    """
    from .admission import admitting_engine, check_admission

    input_processor, prompt = admitting_engine()
    table = configured_plugins(vllm_config=getattr(input_processor, "vllm_config", None))

    def config(name: str):
        return _checkpoint_config(str(table[name]))

    def max_len() -> int | None:  # the positions the plugin reads at most (None: any)
        c = config(req.name)
        return c.max_len if c.architecture == "transformer" else None

    req = request_plugin(params, table, vocab_size=lambda name: config(name).vocab_size,
                         candidates=lambda name: config(name).base_candidates)
    if req.name is not None:  # engine facts: speculative decoding, prompt embeddings, max_len
        check_admission(params, req.name, max_len, input_processor, prompt)


def _tokenizer_fingerprint(vllm_config) -> str | None:
    try:
        from transformers import AutoTokenizer

        from .base_model import tokenizer_fingerprint

        mc = vllm_config.model_config
        tok = AutoTokenizer.from_pretrained(mc.tokenizer, trust_remote_code=mc.trust_remote_code,
                                            revision=getattr(mc, "tokenizer_revision", None))
        return tokenizer_fingerprint(tok)
    except Exception as e:  # a base without an HF tokenizer can still serve; vocab size is checked
        logger.warning("vllm_plugin: cannot fingerprint the base tokenizer (%s); checking vocabulary size only", e)
        return None


# One active processor per engine: a class given both as entry point and in
# ``logits_processors`` is instantiated twice, and the plugin must be added once.
_ACTIVE: list[tuple[weakref.ref, weakref.ref]] = []


def _claim(vllm_config, processor) -> bool:
    _ACTIVE[:] = [(c, p) for c, p in _ACTIVE if c() is not None and p() is not None]
    if any(c() is vllm_config for c, _ in _ACTIVE):
        logger.info("vllm_plugin: processor registered twice for one engine; the second copy stays inert")
        return False
    _ACTIVE.append((weakref.ref(vllm_config), weakref.ref(processor)))
    return True


def count(n: int) -> str:
    """13012345 -> '13.0M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def describe(name: str, model, path) -> str:
    """One log line's worth about a loaded plugin: name, architecture, size, base view, folder."""
    c = model.config
    k = int(c.training.get("top_k") or 0)
    lift = ("" if c.copy_tail_offset is None
            else f", the copied tokens {abs(c.copy_tail_offset):g} nats below the {k}th out of the tail")
    tail = ("a flat tail" if c.tail_prior is None else "a tail by the fit targets' unigram frequencies"
            + ("" if c.tail_prior_power == 1 else f" to the power {c.tail_prior_power:g}"))
    view = f"top-{k} (the base's top-{k} log-probs + {tail}{lift})" if k else "full"
    parameters = sum(p.numel() for p in model.parameters())
    gate = ((", strength gated per position" if c.gate else "") + (", copy scores on prompt tokens" if c.copy else "")
            + (f" from the last {len(c.copy_after)}-token marker on" if c.copy_after else "")
            + (", pending-copy scores on those not generated yet" if c.copy_pending else "")
            + (", example scores on the in-context examples' tokens the task lacks" if c.copy_example else "")
            + (", reading each prompt from that marker on" if c.read_task_only else "")
            + (", an input bag of the task's tokens" if c.input_bag else "")
            + (f", candidate scores on the base's top {c.base_candidates} tokens" if c.base_candidates else "")
            + (f", a shortlist of {c.shortlist_size} tokens (one shared logit for the rest)" if c.shortlist_size else ""))
    return (f"plugin '{name}': {c.architecture}, {count(parameters)} parameters ({c.n_layers} layer(s), "
            f"d_model={c.d_model}), base view {view}{gate}, vocabulary {c.vocab_size}, from {path}")


def load_table(table: Mapping[str, str], source: str, vocab_size: int | None,
               tokenizer_fingerprint: str | None) -> dict:
    """Load every plugin of ``table`` (name -> folder) for a base of ``vocab_size`` tokens.

    Raises:
        PluginConfigError: a checkpoint is missing, unreadable, corrupt, holds non-finite
            values, or does not fit the base; the message names the plugin, ``source``, the file
            and the problem, and says what to do.
    """
    from .checkpoint import CheckpointError, load_plugin

    plugins = {}
    for name, path in table.items():
        try:
            plugins[name] = load_plugin(path, vocab_size=vocab_size, tokenizer_fingerprint=tokenizer_fingerprint)
        except CheckpointError as e:
            raise PluginConfigError(f"vllm_plugin: refusing to serve plugin '{name}' (from {source}, folder {path}): "
                                    f"{str(e).rstrip('.')}. Fix or remove that entry of {source}.") from e
    return plugins


def load_bank(vllm_config, device, num_slots: int, processor) -> PluginBank | None:
    """Load the configured plugins for this engine, or None when there are none (inert).

    Each loaded plugin is logged (vLLM's log: name, architecture, size, base view).

    Raises:
        PluginConfigError: the table is malformed or a plugin cannot be served (``load_table``);
            logged as one ERROR line first, so the cause stands out in vLLM's start-up failure.
    """
    try:
        table, source = plugin_table(vllm_config)
        if not table or not _claim(vllm_config, processor):
            return None
        vocab = vllm_config.model_config.get_vocab_size()
        plugins = load_table(table, source, vocab, _tokenizer_fingerprint(vllm_config))
    except PluginConfigError as e:
        logger.error("%s", e)
        raise
    logger.info("vllm_plugin: serving %d plugin(s) from %s", len(plugins), source)
    for name, model in plugins.items():
        logger.info("vllm_plugin: %s", describe(name, model, table[name]))
    return PluginBank(plugins, num_slots, device)


class _Admission:
    """The one ``validate_params`` of every runner's class (vLLM calls it in the frontend)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse, before the engine sees it, a request the plugins cannot serve exactly as asked.

        Raises:
            ValueError: see ``validate_request``; vLLM answers it as HTTP 400.
        """
        validate_request(sampling_params)


# ----- V1 model runner ------------------------------------------------------------------------
class PluginProcessorV1(_Admission, V1LogitsProcessor):
    """V1 interface: rows are batch positions; they map to state slots that never move."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        num_slots = vllm_config.scheduler_config.max_num_seqs
        self.bank = load_bank(vllm_config, device, num_slots, self)
        self.row_slot = np.full(num_slots, -1, dtype=np.int64)
        self.free_slots = list(range(num_slots - 1, -1, -1))
        self.row_tokens: list[tuple[list[int], list[int]] | None] = [None] * num_slots
        self.active_rows = np.zeros(0, dtype=np.int64)

    def is_argmax_invariant(self) -> bool:
        """False when plugins are loaded: adding their log-probs changes which token is greedy."""
        return self.bank is None

    def _release(self, row: int) -> None:
        slot = self.row_slot[row]
        if slot >= 0:
            self.bank.assign(int(slot), None)
            self.free_slots.append(int(slot))
        self.row_slot[row] = -1
        self.row_tokens[row] = None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removed rows free their slot, added rows that name a plugin
        take one (with their prompt ids and vLLM's live output-id list), moves and swaps remap
        rows to slots. No tensor is touched; the state stays in its slot."""
        if self.bank is None or not batch_update:
            return
        for row in batch_update.removed:
            self._release(row)
        for row, params, prompt_ids, output_ids in batch_update.added:
            self._release(row)
            try:
                req = request_plugin(params, self.bank.index, candidates=self.bank.base_candidates)
            except ValueError as e:  # validated at admission; never let a request kill the engine
                self.bank.warn_once(str(e), f"vllm_plugin: ignoring request arguments: {e}")
                continue
            if req.name is None:
                continue
            if prompt_ids is None:
                self.bank.warn_once("embeds", "vllm_plugin: requests without prompt token ids "
                                              "(prompt embeddings) run without their plugin")
                continue
            slot = self.free_slots.pop()
            self.bank.assign(slot, req.name, req.weight, req.mode, req.top_k, params.logit_bias, req.penalties,
                             req.prompt_len(len(prompt_ids)), req.expert_penalty)
            self.row_slot[row] = slot
            self.row_tokens[row] = (prompt_ids, output_ids)  # output_ids is vLLM's live list
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                self.row_slot[[a, b]] = self.row_slot[[b, a]]
                self.row_tokens[a], self.row_tokens[b] = self.row_tokens[b], self.row_tokens[a]
            else:
                self._release(b)
                self.row_slot[b], self.row_tokens[b] = self.row_slot[a], self.row_tokens[a]
                self.row_slot[a], self.row_tokens[a] = -1, None
        self.active_rows = np.nonzero(self.row_slot >= 0)[0]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [batch rows, V] (float32, after vLLM's constraints) with each plugin row's
        combination written in place (``PluginBank.apply``); rows without a plugin untouched."""
        if self.bank is None or not len(self.active_rows):
            return logits
        rows = self.active_rows
        seqs = [self.row_tokens[r] for r in rows]
        # The newest token; under async scheduling it can still be a -1 placeholder (vLLM fills
        # it in only when the runner knows a processor needs output ids).
        last = np.fromiter((o[-1] if o else p[-1] for p, o in seqs), dtype=np.int64, count=len(seqs))
        seq_lens = np.fromiter((len(p) + len(o) for p, o in seqs), dtype=np.int64, count=len(seqs))
        known = last >= 0
        if not known.all():
            self.bank.warn_once("placeholder", "vllm_plugin: newest token not yet known (async scheduling); "
                                "pass the processor in --logits-processors / LLM(logits_processors=...) "
                                "so vLLM provides output token ids. Those rows run without the plugin.")
            rows, seqs, last, seq_lens = rows[known], [s for s, k in zip(seqs, known) if k], last[known], seq_lens[known]
            if not len(rows):
                return logits
        bank = self.bank

        def last_tokens(sel: np.ndarray, _rows: torch.Tensor) -> torch.Tensor:
            return bank._t(last[sel])

        def token_range(sel: np.ndarray, start: np.ndarray, length: np.ndarray) -> torch.Tensor:
            out = np.zeros((len(sel), int(length.max())), dtype=np.int64)
            for i, (j, s0, n) in enumerate(zip(sel, start, length)):  # only new/resumed rows
                p, o = seqs[j]
                out[i, :n] = (p + o)[s0:s0 + n]
            return bank._t(np.maximum(out, 0))

        return bank.apply(logits, rows, self.row_slot[rows], seq_lens, last_tokens, token_range)


# ----- Model Runner V2 ------------------------------------------------------------------------
class PluginProcessorV2(_Admission, V2LogitsProcessor):
    """MRV2 interface: per-slot state keyed by the runner's request slots; tokens read on device."""

    def __init__(self, vllm_config, req_states):
        self.req_states = req_states
        self.bank = load_bank(vllm_config, req_states.device, req_states.max_num_reqs, self)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        """Give slot ``req_idx`` (recycled by the runner without notice) to a new request; True if
        it uses a plugin, so the sampler runs ``apply`` for it."""
        if self.bank is None:
            return False
        try:
            req = request_plugin(sampling_params, self.bank.index, candidates=self.bank.base_candidates)
        except ValueError as e:
            self.bank.warn_once(str(e), f"vllm_plugin: ignoring request arguments: {e}")
            req = RequestPlugin(None)
        prompt_len = req.prompt_len(int(self.req_states.prompt_len.np[req_idx])) if req.name is not None else 0
        return self.bank.assign(req_idx, req.name, req.weight, req.mode, req.top_k,
                                getattr(sampling_params, "logit_bias", None), req.penalties, prompt_len,
                                req.expert_penalty)

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        """``logits`` [rows, V] (rows in ``ctx.idx_mapping`` order, after vLLM's bias, penalties,
        bad words and grammar) with each plugin row's combination written in place."""
        if self.bank is None:
            return logits
        slots_all = np.asarray(ctx.idx_mapping_np)
        if logits.shape[0] != len(slots_all):  # speculative decoding: vLLM refuses it with custom processors
            return logits
        rows = np.nonzero(self.bank.plugin_of[slots_all] >= 0)[0]
        if not len(rows):
            return logits
        slots = slots_all[rows]
        seq_lens = np.asarray(ctx.seq_lens_upper_bound_np)[rows].astype(np.int64)
        bank, all_ids = self.bank, self.req_states.all_token_ids.gpu

        def last_tokens(_sel: np.ndarray, rows_t: torch.Tensor) -> torch.Tensor:
            return ctx.input_ids[rows_t].long()

        def token_range(sel: np.ndarray, start: np.ndarray, length: np.ndarray) -> torch.Tensor:
            width = int(length.max())
            start_t, length_t = bank._t(start), bank._t(length)
            pos = start_t[:, None] + torch.arange(width, device=bank.device)[None, :]
            pos = torch.minimum(pos, (start_t + length_t - 1)[:, None])
            tokens = all_ids[bank._t(slots[sel])[:, None], pos].long()
            # The newest token is this step's input; it may not be committed to all_token_ids yet.
            tokens[torch.arange(len(sel), device=bank.device), length_t - 1] = ctx.input_ids[bank._t(rows[sel])].long()
            return tokens

        return bank.apply(logits, rows, slots, seq_lens, last_tokens, token_range)


# ----- one class for both runners (the entry point) ------------------------------------------
class PluginLogitsProcessor(PluginProcessorV1, PluginProcessorV2):
    """Pick the implementation by what the runner hands the constructor.

    V1 builds processors with ``(vllm_config, device: torch.device, is_pin_memory)``, MRV2 with
    ``(vllm_config, req_states: LogitsProcRequestState)``; both loaders accept this class (it
    subclasses both interfaces), so one entry point and one ``--logits-processors`` name serve
    either runner.
    """

    def __new__(cls, vllm_config, *args, **kwargs):
        second = args[0] if args else kwargs.get("device", kwargs.get("req_states"))
        if isinstance(second, torch.device):
            return PluginProcessorV1(vllm_config, *args, **kwargs)
        return PluginProcessorV2(vllm_config, *args, **kwargs)
