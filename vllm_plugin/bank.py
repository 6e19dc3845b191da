"""The processor's batched core: named plugins with per-sequence state, applied to vLLM's logits.

``PluginBank`` knows nothing of vLLM's runners: each runner adapter (``processor.py``) maps its
rows to state slots, assigns a slot when a request arrives, and calls ``apply`` every step with
the rows that use a plugin. Everything that depends only on which rows are in the batch (the
groups per plugin, their device index tensors, strengths, top-k views and baseline modes) is a
``_Plan``, rebuilt only when the batch or an assignment changes, as vLLM's MinP processor
refreshes its device mirror only in ``update_state``. A decode step of a product-of-experts batch
is then: advance each plugin's state by one token, one head matmul, one fused add.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .experts import Mode, base_top_k, combine, entropy, entropy_with_flat
from .model import copy_starts

logger = logging.getLogger("vllm.vllm_plugin")

NO_PENALTY = (1.0, 0.0, 0.0)  # repetition, frequency, presence: vLLM's neutral values
_NO_LIMIT = np.iinfo(np.int64).max

# A runner's two views of its sequences' tokens. ``sel`` indexes the rows handed to ``apply``;
# ``rows`` is ``rows[sel]`` as a device tensor, for runners that read tokens on the device.
LastTokens = Callable[[np.ndarray, torch.Tensor], torch.Tensor]  # -> int64 [len(sel)]: the newest token
TokenRange = Callable[[np.ndarray, np.ndarray, np.ndarray], torch.Tensor]  # (sel, start, length) -> [len(sel), max(length)], padded


@dataclass(frozen=True)
class _Group:
    """One plugin's rows of the current batch."""

    plugin: int
    sel: np.ndarray  # [n] positions among the rows handed to ``apply``
    slots: np.ndarray  # [n] their state slots
    rows_t: torch.Tensor  # [n] their logits rows, on the device
    slots_t: torch.Tensor  # [n] their slots, on the device
    weight: float | torch.Tensor  # one strength shared by the group, else [n, 1]
    product: bool  # every row is a product of experts (the common case: one fused add)
    shortlisted: bool  # product rows of a shortlisted plugin, no expert penalty: added at the shortlist's cost
    in_order: bool  # the rows are the logits' first n, in order: changed in place, not gathered
    normalise: bool  # some row needs the plugin's true log-probs (a repetition penalty follows)
    top_k: tuple  # ((k, rows_t [m], idx_t [m], bias [m, V] | None), ...): rows decoding against the base's top-k view
    expert_penalty: tuple | None  # (rows_t [m], idx_t [m], slots_t [m], penalty [m]): the paper's penalty
    modes: tuple  # ((mode, rows_t [m], idx_t [m], weight [m, 1], bias [m, V] | None), ...): baseline rows


@dataclass(frozen=True)
class _Plan:
    """Everything about the current batch that does not change from one decode step to the next."""

    rows: np.ndarray  # [b] the rows handed to ``apply`` (the plan's key, with ``slots`` and ``version``)
    slots: np.ndarray  # [b]
    version: int
    groups: tuple[_Group, ...]
    counted: np.ndarray  # [c] positions of rows with any penalty: their tokens are counted
    counted_rows_t: torch.Tensor  # [c]
    counted_slots_t: torch.Tensor  # [c]
    penalised: np.ndarray  # [p] positions of rows with vLLM's penalties (after the combination)
    penalty_rows_t: torch.Tensor  # [p]
    penalty_slots_t: torch.Tensor  # [p]
    penalties_t: torch.Tensor  # [p, 3] repetition, frequency, presence


class PluginBank:
    """Named plugins with state for ``num_slots`` sequences each, in preallocated tensors.

    Host-side arrays per slot: which plugin (-1: none), its strength, mode, base view, penalties,
    and how many of the sequence's tokens its state has absorbed (from ``offset`` on: the
    task's marker for a plugin that reads the task only, else the first token). A slot's tokens come from the
    runner through two callbacks (``LastTokens``, ``TokenRange``), so the core never knows which
    runner it serves.
    """

    def __init__(self, plugins: dict, num_slots: int, device):
        self.names = list(plugins)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.device = torch.device(device)
        self.models = [plugins[n].to(self.device).eval() for n in self.names]
        self.heads = [_fast_head_rows(m, self.device) for m in self.models]
        self.shortlists = [_token_of_row(m) for m in self.models]  # [K] the token of each head row, or None
        self.states = [m.new_state(num_slots, self.device) for m in self.models]
        self.max_len = [m.config.max_len if m.config.architecture == "transformer" else None for m in self.models]
        # A plugin with copy scores reads which tokens each sequence's prompt holds: the
        # penalties' ``in_prompt`` table, kept for its slots too.
        self.copies = [m.copy_score is not None for m in self.models]
        # A plugin whose copy scores read the prompt from its last marker on (the task's input
        # after in-context examples, ``PluginConfig.copy_after``) reads the ``copy_mask`` table
        # instead, filled once a slot's whole prompt is known.
        self.copy_marker = [self._t(np.asarray(m.config.copy_after, dtype=np.int64)) if m.config.copy_after else None
                            for m in self.models]
        # A plugin with example scores (``copy_example``) also reads ``example_mask``: the prompt's
        # tokens before that marker that the task's segment lacks, filled at the same time.
        self.examples = [m.example_score is not None for m in self.models]
        # A plugin that reads the task only (``PluginConfig.read_task_only``) starts reading each
        # sequence at that marker: ``offset`` [slot], -1 until ``_mark_copy_region`` finds it (such
        # a plugin has copy scores, so its rows are counted before they advance).
        self.read_marker = [marker if m.config.read_task_only else None
                            for m, marker in zip(self.models, self.copy_marker)]
        # A plugin trained from top-k log-probs learned to correct that view of the base.
        self.trained_top_k = [int(m.config.training.get("top_k") or 0) for m in self.models]
        self.plugin_of = np.full(num_slots, -1, dtype=np.int32)
        self.active = np.zeros(num_slots, dtype=bool)  # the plugin still reads this sequence (not past max_len)
        self.limit = np.full(num_slots, _NO_LIMIT, dtype=np.int64)  # the plugin's max_len
        self.weight = np.zeros(num_slots, dtype=np.float32)
        self.mode = np.zeros(num_slots, dtype=np.int8)  # a Mode
        self.consumed = np.zeros(num_slots, dtype=np.int64)  # tokens the plugin has read (from ``offset`` on)
        self.offset = np.zeros(num_slots, dtype=np.int64)
        self.normalise = np.ones(num_slots, dtype=bool)
        self.top_k = np.zeros(num_slots, dtype=np.int64)  # 0: the full base
        # A request's logit_bias as (token ids, biases) on the device, for the paths that must
        # see it apart from the logits (the top-k view, mixture, alone): see experts.combine.
        self.bias: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_slots
        # Penalties per slot, and for penalised slots (and those of plugins with copy scores) the
        # tokens seen so far: [slots, V] prompt mask and output counts, allocated on first use and
        # updated by one scatter per step;
        # ``counted``: how many of a slot's tokens they hold.
        self.penalties = np.tile(np.array(NO_PENALTY, dtype=np.float32), (num_slots, 1))
        self.counts_tokens = np.zeros(num_slots, dtype=bool)  # some penalty needs the slot's tokens
        self.expert_penalty = np.ones(num_slots, dtype=np.float32)
        self.prompt_len = np.zeros(num_slots, dtype=np.int64)
        self.counted = np.zeros(num_slots, dtype=np.int64)
        self.in_prompt: torch.Tensor | None = None
        self.copy_mask: torch.Tensor | None = None
        self.example_mask: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        self.version = 0  # bumped by every change a plan depends on
        self._plan: _Plan | None = None
        self._warned: set[str] = set()

    # ----- bookkeeping: where the batch changes -----------------------------------------------
    def assign(self, slot: int, name: str | None, weight: float = 1.0, mode: Mode = Mode.PRODUCT,
               top_k: int | None = None, logit_bias: dict[int, float] | None = None,
               penalties: tuple[float, float, float] = NO_PENALTY, prompt_len: int = 0,
               expert_penalty: float = 1.0) -> bool:
        """Give ``slot`` to a sequence that uses plugin ``name`` (None: none); True if it does.

        ``top_k``: decode against the base's top-k view (None: as the plugin was trained; 0: full).
        ``logit_bias``: the request's (token id -> bias), which vLLM has already added to the
        logits; kept so that the top-k view, mixture and alone keep it too.
        ``penalties``: (repetition, frequency, presence), vLLM's formulas on the combined logits;
        ``prompt_len`` tells prompt tokens (repetition only) from output tokens (all three).
        ``expert_penalty``: the paper's repetition penalty, on the base's and the plugin's logits
        separately before they combine, for generated tokens only (``experts.penalise_generated``)."""
        g = -1 if name is None else self.index[name]
        self.plugin_of[slot] = g
        self.active[slot] = g >= 0
        self.limit[slot] = _NO_LIMIT if g < 0 or self.max_len[g] is None else self.max_len[g]
        self.weight[slot] = weight
        self.mode[slot] = mode
        self.penalties[slot] = penalties if g >= 0 else NO_PENALTY
        self.expert_penalty[slot] = expert_penalty if g >= 0 else 1.0
        self.counts_tokens[slot] = g >= 0 and (tuple(penalties) != NO_PENALTY or expert_penalty != 1.0
                                               or self.copies[g])
        # The repetition penalty is not shift-invariant: it needs the plugin's true log-probs.
        self.normalise[slot] = g >= 0 and penalties[0] != 1.0
        self.prompt_len[slot] = prompt_len
        self.counted[slot] = 0
        self.top_k[slot] = (self.trained_top_k[g] if top_k is None else top_k) if g >= 0 else 0
        self.consumed[slot] = 0
        self.offset[slot] = -1 if g >= 0 and self.read_marker[g] is not None else 0
        self.bias[slot] = ((self._t(np.fromiter(logit_bias, dtype=np.int64)),
                            self._t(np.fromiter(logit_bias.values(), dtype=np.float32)))
                           if logit_bias and g >= 0 else None)
        self.version += 1
        return name is not None

    def base_candidates(self, name: str) -> int:
        """How many of the base's top tokens plugin ``name``'s candidate scores read (0: none), so
        that a request that reached the engine unchecked is held to admission's rule too."""
        return self.models[self.index[name]].config.base_candidates

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    def _t(self, array) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def _expire(self, slots: np.ndarray, seq_lens: np.ndarray) -> None:
        """Sequences past their plugin's ``max_len`` continue without it (penalties still apply)."""
        over = seq_lens > self.limit[slots]
        if over.any():
            for g in np.unique(self.plugin_of[slots[over]]):
                self.warn_once(f"len{g}", f"vllm_plugin: sequences past plugin '{self.names[g]}' "
                                          f"max_len={self.max_len[g]} continue without it")
            self.active[slots[over]] = False
            self.limit[slots[over]] = _NO_LIMIT
            self.version += 1

    def _plan_for(self, rows: np.ndarray, slots: np.ndarray, vocab_size: int) -> _Plan:
        plan = self._plan
        if (plan is not None and plan.version == self.version and np.array_equal(plan.rows, rows)
                and np.array_equal(plan.slots, slots)):
            return plan
        active, plugin_ids = self.active[slots], self.plugin_of[slots]
        groups = tuple(self._group(int(g), np.nonzero(active & (plugin_ids == g))[0], rows, slots, vocab_size)
                       for g in np.unique(plugin_ids[active]))
        counted = np.nonzero(self.counts_tokens[slots])[0]
        pen = np.nonzero((self.penalties[slots] != np.array(NO_PENALTY, dtype=np.float32)).any(-1))[0]
        self._plan = _Plan(rows.copy(), slots.copy(), self.version, groups,
                           counted, self._t(rows[counted]), self._t(slots[counted]),
                           pen, self._t(rows[pen]), self._t(slots[pen]), self._t(self.penalties[slots[pen]]))
        return self._plan

    def _group(self, g: int, sel: np.ndarray, rows: np.ndarray, slots: np.ndarray, vocab_size: int) -> _Group:
        s, r = slots[sel], rows[sel]
        weights, modes, top_k = self.weight[s], self.mode[s], self.top_k[s]
        shared = bool((weights == weights[0]).all())
        views = []
        for k in np.unique(top_k[top_k > 0]):  # usually none; one value per top-k plugin
            part = top_k == k
            # Admission bounds k by the vocabulary; clamped again so no value can raise here.
            views.append((min(int(k), vocab_size), self._t(r[part]), self._t(np.nonzero(part)[0]),
                          self._bias_rows(s[part], vocab_size)))
        expert = None
        if (self.expert_penalty[s] != 1.0).any():
            part = np.nonzero(self.expert_penalty[s] != 1.0)[0]
            expert = (self._t(r[part]), self._t(part), self._t(s[part]), self._t(self.expert_penalty[s[part]]))
        baselines = []
        if modes.any():
            for m in np.unique(modes):  # at most three groups, same maths as the reference
                part = modes == m
                baselines.append((Mode(int(m)), self._t(r[part]), self._t(np.nonzero(part)[0]),
                                  self._t(weights[part])[:, None], self._bias_rows(s[part], vocab_size)))
        product, normalise = not modes.any(), bool(self.normalise[s].any())
        # Candidate scores sit on tokens the base picks each step, not on the few flat groups the
        # shortlisted path's entropy knows: such a plugin takes the vocabulary-wide path.
        shortlisted = (self.shortlists[g] is not None and product and not normalise and expert is None
                       and not self.models[g].config.base_candidates)
        return _Group(g, sel, s, self._t(r), self._t(s), float(weights[0]) if shared else self._t(weights)[:, None],
                      product, shortlisted, bool((r == np.arange(len(r))).all()), normalise, tuple(views), expert,
                      tuple(baselines))

    def _bias_rows(self, slots: np.ndarray, vocab_size: int) -> torch.Tensor | None:
        """[len(slots), V] logit_bias of these slots (zeros for those without); None if none has one."""
        has = [i for i, s in enumerate(slots) if self.bias[s] is not None]
        if not has:
            return None
        out = torch.zeros(len(slots), vocab_size, device=self.device)
        for i in has:
            ids, values = self.bias[slots[i]]
            out[i, ids] = values
        return out

    # ----- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, rows: np.ndarray, slots: np.ndarray, seq_lens: np.ndarray,
              last_tokens: LastTokens, token_range: TokenRange) -> torch.Tensor:
        """Combine each row's plugin with ``logits`` in place; returns ``logits``.

        logits: [batch, V] float32, vLLM's logits after its constraints. rows, slots, seq_lens:
        [n] the rows that use a plugin, their state slots, and how many tokens each sequence
        holds now (prompt + output). Product rows get ``weight * log-probs`` added (up to a
        per-row constant the sampler's softmax cancels); mixture and alone rows are replaced by
        ``experts.combine``; penalised rows then get vLLM's penalties.
        """
        self._expire(slots, seq_lens)
        plan = self._plan_for(rows, slots, logits.shape[-1])
        if len(plan.counted):
            self._count_tokens(plan, seq_lens, logits.shape[-1], last_tokens, token_range)
        for group in plan.groups:
            self._advance(group, seq_lens, last_tokens, token_range)
            hidden = self.states[group.plugin]["out"][group.slots_t]
            if group.shortlisted:
                self._restrict_to_top_k(group, logits)
                self._add_shortlisted_product(group, logits, hidden)
                continue
            model = self.models[group.plugin]
            plugin_logits = model.to_vocab(self.heads[group.plugin](hidden)).float()
            if self.copies[group.plugin]:
                plugin_logits = model.add_copy_score(hidden, plugin_logits, *self._copied(group))
            if model.candidate_score is not None:  # the base's own top tokens, before any top-k view
                plugin_logits = model.add_candidate_score(hidden, plugin_logits, logits[group.rows_t])
            self._restrict_to_top_k(group, logits)
            self._penalise_experts(group, logits, plugin_logits)
            if group.product:
                self._add_product(group, logits, plugin_logits, hidden)
            else:
                self._combine_modes(group, logits, plugin_logits, hidden)
        if len(plan.penalised):
            self._penalise(plan, logits)
        return logits

    def _advance(self, group: _Group, seq_lens: np.ndarray, last_tokens: LastTokens, token_range: TokenRange) -> None:
        """Feed each slot the tokens its state has not absorbed: one per row on a decode step, the
        whole prompt for a new row (from its marker on, once the prompt is whole, for a plugin
        that reads the task only), the missed ones after chunked prefill or preemption."""
        model, state, sel, s = self.models[group.plugin], self.states[group.plugin], group.sel, group.slots
        lens, done = seq_lens[sel], self.consumed[s]
        if self.read_marker[group.plugin] is not None:  # from the marker on; nothing before it is found
            off = self.offset[s]
            lens = np.where(off < 0, 0, lens - off)
        delta = lens - done
        self.consumed[s] = np.maximum(done, lens)
        if (delta == 1).all() and done.all():  # the decode hot path: one batched step
            model.advance(state, group.slots_t, last_tokens(sel, group.rows_t)[:, None], None, done)
            return
        fresh = (done == 0) & (delta > 0)  # must be reset first, even for a 1-token prompt
        step = (delta == 1) & ~fresh
        catch_up = (delta > 1) | fresh
        if fresh.any():
            model.reset(state, self._t(s[fresh]))
        if catch_up.any():  # new rows (whole prompt), resumed rows, chunked prefill
            lengths = delta[catch_up]
            tokens = token_range(sel[catch_up], done[catch_up] + self.offset[s[catch_up]], lengths)
            model.advance(state, self._t(s[catch_up]), tokens, lengths.tolist(), done[catch_up])
        if step.any():
            idx = self._t(np.nonzero(step)[0])
            model.advance(state, group.slots_t[idx], last_tokens(sel[step], group.rows_t[idx])[:, None], None,
                          done[step])

    def _add_shortlisted_product(self, group: _Group, logits: torch.Tensor, hidden: torch.Tensor) -> None:
        """``_add_product`` of a shortlisted plugin at its shortlist's cost. Up to a per-row
        constant (its rest row's logit), which the sampler's softmax cancels, its logits are
        ``d`` on its K tokens (each one's logit above the rest row's) plus its copy scores on the
        copied tokens: added as such, and its entropy (for a gate) taken over K columns and a few
        flat groups. Nothing vocabulary-wide is built for the plugin but the copy scores' add;
        the gate's base entropy still reads the vocabulary."""
        model, ids = self.models[group.plugin], self.shortlists[group.plugin]
        row_logits = self.heads[group.plugin](hidden).float()
        d = row_logits[:, :-1] - row_logits[:, -1:]  # [n, K]
        base = logits[:len(group.rows_t)] if group.in_order else logits[group.rows_t]
        lifts = []  # (tokens [n, V] bool, bonus [n, 1]); each lift's tokens hold the next one's
        apart = None  # the example scores' lift, on tokens no other lift holds
        if self.copies[group.plugin]:
            (copied, pending, example), bonuses = self._copied(group), model.copy_bonuses(hidden)
            lifts = [(m, b) for m, b in zip((copied, pending), bonuses) if m is not None]
            apart = None if example is None else (example, bonuses[2])
        weight = group.weight
        if model.gate is not None:
            plugin_entropy = _shortlisted_entropy(d, lifts, ids, logits.shape[-1], apart)
            weight = weight * model.strength_of(hidden, entropy(base), plugin_entropy)[:, None]
        for tokens, bonus in lifts + ([apart] if apart else []):
            base += (tokens * (weight * bonus)).to(base.dtype)
        base.index_add_(1, ids, (d * weight).to(base.dtype))
        if not group.in_order:
            logits.index_copy_(0, group.rows_t, base)

    def _copied(self, group: _Group) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """[n, V] bool: the tokens the rows' copy scores lift (the prompt's, or its task's after a
        ``copy_after`` marker); of those the ones the output has not generated, for pending-copy
        scores (the output counts, which a copy plugin's slots keep, ``counts_tokens``, say
        which); and the examples' tokens the task lacks, for example scores (None without them)."""
        mask = self._copy_set(group)
        pending = (None if self.models[group.plugin].pending_score is None
                   else mask & (self.output_counts[group.slots_t] == 0))
        return mask, pending, self.example_mask[group.slots_t] if self.examples[group.plugin] else None

    def _copy_set(self, group: _Group) -> torch.Tensor:
        """[n, V] bool: the tokens the rows' copy scores lift (``_copied``'s first)."""
        return (self.in_prompt if self.copy_marker[group.plugin] is None else self.copy_mask)[group.slots_t]

    def _restrict_to_top_k(self, group: _Group, logits: torch.Tensor) -> None:
        """Rows of a plugin trained from top-k log-probs decode against that view of the base (with
        the tokens its copy scores lift out of the flat tail, ``PluginConfig.copy_tail_offset``, or
        its tail prior, ``PluginConfig.tail_prior``)."""
        if not group.top_k:
            return
        model = self.models[group.plugin]
        offset = model.config.copy_tail_offset
        lifted = None if offset is None else self._copy_set(group)
        for k, rows_t, idx_t, bias in group.top_k:
            view = base_top_k(logits[rows_t], k, bias, None if lifted is None else lifted[idx_t], offset or 0.0,
                              model.tail_log_prior)
            logits.index_copy_(0, rows_t, view.to(logits.dtype))

    def _penalise_experts(self, group: _Group, logits: torch.Tensor, plugin_logits: torch.Tensor) -> None:
        """The paper's repetition penalty, on each expert's logits before they combine: tokens
        generated so far (not the prompt) are divided by it where positive, multiplied where
        negative (vLLM's op with an empty prompt mask; ``experts.penalise_generated`` in the oracle)."""
        if group.expert_penalty is None:
            return
        from vllm._custom_ops import apply_repetition_penalties

        rows_t, idx_t, slots_t, penalty = group.expert_penalty
        generated = self.output_counts[slots_t] > 0
        no_prompt = torch.zeros_like(generated)
        for scores, index in ((logits, rows_t), (plugin_logits, idx_t)):
            x = scores[index]
            apply_repetition_penalties(x, no_prompt, generated, penalty.to(x.dtype))
            scores.index_copy_(0, index, x)

    def _add_product(self, group: _Group, logits: torch.Tensor, plugin_logits: torch.Tensor,
                     hidden: torch.Tensor) -> None:
        """The product of experts: ``logits += weight * log_softmax(plugin_logits)``, the weight
        times the plugin's learned per-position strength if it has a gate."""
        if group.normalise:
            lp = torch.log_softmax(plugin_logits, dim=-1)
        else:
            # log_softmax(z) = z - logsumexp(z): a per-row constant that the sampler's softmax
            # cancels. Only the repetition penalty, which follows, is not shift-invariant; rows
            # without one skip the normalising pass.
            lp = plugin_logits
        lp = lp.to(logits.dtype)
        gate = self._gate(group.plugin, hidden, logits, group.rows_t, plugin_logits)
        if gate is not None:
            weight = group.weight if isinstance(group.weight, float) else group.weight[:, 0]
            logits.index_add_(0, group.rows_t, lp.mul_((weight * gate).to(lp.dtype)[:, None]))
        elif isinstance(group.weight, float):
            logits.index_add_(0, group.rows_t, lp, alpha=group.weight)
        else:
            logits.index_add_(0, group.rows_t, lp.mul_(group.weight.to(lp.dtype)))

    def _gate(self, plugin: int, hidden: torch.Tensor, logits: torch.Tensor, rows_t: torch.Tensor,
              plugin_logits: torch.Tensor) -> torch.Tensor | None:
        """[n] the learned per-position strength of a gated plugin's rows ``rows_t``; None for a
        plugin without a gate, without gathering the base's rows (the common decode step)."""
        model = self.models[plugin]
        return None if model.gate is None else model.strength(hidden, logits[rows_t], plugin_logits)

    def _combine_modes(self, group: _Group, logits: torch.Tensor, plugin_logits: torch.Tensor,
                       hidden: torch.Tensor) -> None:
        """Mixture and plugin-alone rows (baselines), and product rows sharing their plugin."""
        for mode, rows_t, idx_t, weight, bias in group.modes:
            if mode == Mode.PRODUCT:  # a gate scales the product's strength only
                gate = self._gate(group.plugin, hidden[idx_t], logits, rows_t, plugin_logits[idx_t])
                weight = weight if gate is None else weight * gate[:, None]
            combined = combine(logits[rows_t], plugin_logits[idx_t], weight, mode, bias=bias)
            logits.index_copy_(0, rows_t, combined.to(logits.dtype))

    # ----- penalties (vLLM's formulas, after the combination on every runner) -----------------
    def _count_tokens(self, plan: _Plan, seq_lens: np.ndarray, vocab_size: int,
                      last_tokens: LastTokens, token_range: TokenRange) -> None:
        """Bring the penalty tables of the plan's counted rows up to ``seq_lens``: tokens before
        the slot's prompt length mark ``in_prompt``, later ones add to ``output_counts``."""
        if self.in_prompt is None or self.in_prompt.shape[1] != vocab_size:
            shape = (len(self.plugin_of), vocab_size)
            self.in_prompt = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
            if any(m is not None for m in self.copy_marker):
                self.copy_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
            if any(self.examples):
                self.example_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
        sel = plan.counted
        s = plan.slots[sel]
        done = self.counted[s]
        delta = seq_lens[sel] - done
        self.counted[s] = np.maximum(done, seq_lens[sel])
        step = (delta == 1) & (done >= self.prompt_len[s]) & (done > 0)
        if step.all():  # decode: one new output token per row
            self._count_outputs(plan.counted_slots_t, last_tokens(sel, plan.counted_rows_t))
            return
        if (done == 0).any():  # a new sequence in a recycled slot
            fresh = self._t(s[done == 0])
            self.in_prompt[fresh] = False
            self.output_counts[fresh] = 0
            if self.copy_mask is not None:
                self.copy_mask[fresh] = False
            if self.example_mask is not None:
                self.example_mask[fresh] = False
        if step.any():
            idx = self._t(np.nonzero(step)[0])
            self._count_outputs(plan.counted_slots_t[idx], last_tokens(sel[step], plan.counted_rows_t[idx]))
        catch_up = (delta > 0) & ~step
        if catch_up.any():  # the prompt, a prefill chunk, or a resumed sequence's tokens
            c = np.nonzero(catch_up)[0]
            tokens = token_range(sel[c], done[c], delta[c])
            pos = self._t(done[c])[:, None] + torch.arange(tokens.shape[1], device=self.device)[None, :]
            valid = pos < self._t(done[c] + delta[c])[:, None]
            prompt = pos < self._t(self.prompt_len[s[c]])[:, None]
            slot_of = self._t(s[c])[:, None].expand_as(tokens)
            self.in_prompt[slot_of[valid & prompt], tokens[valid & prompt]] = True
            out = valid & ~prompt
            self._count_outputs(slot_of[out], tokens[out])
            self._mark_copy_region(sel[c], s[c], done[c], delta[c], token_range)

    def _mark_copy_region(self, sel: np.ndarray, slots: np.ndarray, done: np.ndarray, delta: np.ndarray,
                          token_range: TokenRange) -> None:
        """For slots of plugins with a ``copy_after`` marker whose prompt these tokens complete:
        mark in ``copy_mask`` the prompt's tokens from the marker's last occurrence on (and in
        ``example_mask`` those before it that the task lacks), give a plugin with an input bag
        that of those tokens, and set ``offset`` there for a plugin that reads the task only.
        Once per sequence, when the whole prompt is known (a marker can only be found then; a
        prompt without one is read whole)."""
        if self.copy_mask is None:
            return
        plen = self.prompt_len[slots]
        groups = self.plugin_of[slots]
        completes = (done < plen) & (done + delta >= plen)
        for g in np.unique(groups[completes]):
            marker = self.copy_marker[g]
            if marker is None:
                continue
            pick = np.nonzero(completes & (groups == g))[0]
            # All the tokens up to now, not only the prompt's: the runner's range fills its last
            # position with this step's input, which is the prompt's last token only when no
            # output follows it yet (a resumed sequence catches up on both).
            tokens = token_range(sel[pick], np.zeros(len(pick), dtype=np.int64), done[pick] + delta[pick])
            lengths = self._t(plen[pick])
            start = copy_starts(tokens, lengths, marker)
            if bool((start < 0).any()):
                self.warn_once("marker", f"vllm_plugin: a prompt for plugin '{self.names[g]}' lacks the text "
                               "its copy scores start at (the template's text before {input}: copy_after); "
                               "its copy scores (and, for a plugin that reads the task only, the plugin) read "
                               "the whole prompt. Send prompts in the checkpoint's prompt_template.")
            pos = torch.arange(tokens.shape[1], device=self.device)[None, :]
            keep = (pos >= start.clamp(min=0)[:, None]) & (pos < lengths[:, None])
            slot_t = self._t(slots[pick])
            slot_of = slot_t[:, None].expand_as(tokens)
            self.copy_mask[slot_t] = False
            self.copy_mask[slot_of[keep], tokens[keep]] = True
            if self.models[g].bag is not None:  # before this step's advance, which adds it to ``out``
                self.models[g].set_bag(self.states[g], slot_t, self.copy_mask[slot_t])
            if self.read_marker[g] is not None:
                self.offset[slots[pick]] = start.clamp(min=0).cpu().numpy()
            if self.examples[g]:  # before the marker, less what the task holds
                before = pos < start.clamp(min=0)[:, None]
                self.example_mask[slot_t] = False
                self.example_mask[slot_of[before], tokens[before]] = True
                self.example_mask[slot_t] &= ~self.copy_mask[slot_t]

    def _count_outputs(self, slots_t: torch.Tensor, tokens: torch.Tensor) -> None:
        self.output_counts.index_put_((slots_t, tokens.long()), torch.ones_like(tokens, dtype=torch.int32),
                                      accumulate=True)

    def _penalise(self, plan: _Plan, logits: torch.Tensor) -> None:
        """vLLM's penalties on the penalised rows (``vllm.model_executor.layers.utils.apply_penalties``
        with the tables kept here), after the plugin, as V1 applies them: identical on both runners."""
        from vllm._custom_ops import apply_repetition_penalties

        r, s = plan.penalty_rows_t, plan.penalty_slots_t
        x = logits[r]
        counts = self.output_counts[s]
        seen = counts > 0
        rep, freq, pres = plan.penalties_t.to(x.dtype).unbind(-1)
        apply_repetition_penalties(x, self.in_prompt[s], seen, rep)
        x -= freq.unsqueeze(1) * counts
        x -= pres.unsqueeze(1) * seen
        logits.index_copy_(0, r, x)


def _token_of_row(model) -> torch.Tensor | None:
    """[K] the token id each of a shortlisted plugin's first K head rows scores (its ``index_of``
    inverted; the shortlist in row order, whatever order it was set in); None without a shortlist."""
    ids = model.shortlist()
    if ids is None:
        return None
    out = torch.empty_like(ids)
    out[model.index_of[ids]] = ids
    return out


def _shortlisted_entropy(d: torch.Tensor, lifts: list, ids: torch.Tensor, vocab_size: int,
                         apart: tuple | None = None) -> torch.Tensor:
    """[n] entropy of a shortlisted plugin's softmax over the vocabulary from ``d`` [n, K] (its K
    tokens' logits above the rest row's, in row order: token ``ids[i]`` is row i), its copy
    scores ``lifts`` (nested token masks [n, V] and their bonuses [n, 1]) and ``apart`` (a mask
    and bonus on tokens no lift holds: example scores): K columns, and off the shortlist one flat
    group per lift depth and one for ``apart``."""
    y, value = d, torch.zeros_like(d[:, :1])
    values, counts = [value], [torch.full_like(value, vocab_size - len(ids))]
    for depth, (tokens, bonus) in enumerate(lifts + ([apart] if apart else [])):
        on_list = tokens[:, ids]
        y = y + bonus * on_list
        off = (tokens.sum(-1, keepdim=True) - on_list.sum(-1, keepdim=True)).float()
        parent = 0 if depth == len(lifts) else -1  # apart's tokens come out of the rest, not a lift
        counts[parent] = counts[parent] - off
        value = bonus if depth == len(lifts) else value + bonus
        values.append(value)
        counts.append(off)
    return entropy_with_flat(y, torch.cat(values, 1), torch.cat(counts, 1))


def _fast_head_rows(model, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head's rows (``model.head_rows``: the vocabulary, or a shortlist and its rest row)
    through vLLM's own CPU GEMM (oneDNN, prepacked weight), as vLLM runs the base's layers: much
    faster than aten's matmul at decode batch sizes on CPU (see README). Elsewhere, or if vLLM's
    CPU ops are missing, the model's own."""
    if device.type != "cpu":
        return model.head_rows
    try:
        from vllm import _custom_ops as ops

        if not getattr(ops, "_supports_onednn", False):
            return model.head_rows
        handler = ops.create_onednn_mm(model.head_weight().detach().t(), 32)
    except Exception as e:  # noqa: BLE001 - any failure here just means the portable path
        logger.info("vllm_plugin: oneDNN head unavailable (%s); using torch", e)
        return model.head_rows
    bias = model.out_bias.detach()
    return lambda hidden: ops.onednn_mm(handler, hidden.contiguous(), bias)
