"""Train a plugin against a frozen base's cached log-probs (teacher forcing).

Loss: cross-entropy of softmax(base log-probs + plugin logits) on target tokens only, which is
the product of experts p_base * p_plugin renormalised. The loop is ``training.loop``'s, shared
with the LoRA fine-tune: AdamW (decay on dim >= 2), linear warmup then cosine decay to a tenth of
the rate, early stopping on the held-out (select) loss, a non-finite loss or gradient stopping
training (``TrainingDivergedError``) before the step that would spread it into the weights. Here
the best weights go to ``out_dir/checkpoint`` and the run is resumable (``loop.save_point``); since
a divergence is raised before any save, neither is ever overwritten with it. Nothing is pickled:
the optimizer state is stored as safetensors too.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_plugin.checkpoint import load_plugin, save_plugin
from vllm_plugin.experts import entropy_with_flat
from vllm_plugin.model import PluginLM, copy_start

from . import loop
from .base_logits import BaseLogits, TokenizedSet
from .loop import LoopState, ResumeError, TrainConfig, TrainingDivergedError  # noqa: F401 - re-exported: the trainer's API


class PairSet:
    """Tokenized examples with the base's log-probs for each of their target tokens."""

    def __init__(self, ts: TokenizedSet, base: BaseLogits | None):
        """``base=None``: no base expert (training the small model alone)."""
        if base is not None and len(base) != ts.num_target_tokens:
            raise ValueError(f"base logits cover {len(base)} target tokens, the examples have "
                             f"{ts.num_target_tokens}: the cache does not belong to this data")
        self.ts, self.base = ts, base
        self.offsets = [0]
        for t in ts.targets:
            self.offsets.append(self.offsets[-1] + len(t))

    def __len__(self):
        return len(self.ts.targets)

    def batch(self, idx: list[int]):
        """Right-padded plugin inputs and, for each target token, where its prediction is read."""
        seqs = [self.ts.prompts[self.ts.example_prompt[e]] + self.ts.targets[e][:-1] for e in idx]
        ids = torch.zeros(len(idx), max(map(len, seqs)), dtype=torch.long)
        pos_b, pos_t, rows, targets = [], [], [], []
        for b, (e, seq) in enumerate(zip(idx, seqs)):
            ids[b, :len(seq)] = torch.tensor(seq)
            p, n = len(self.ts.prompts[self.ts.example_prompt[e]]), len(self.ts.targets[e])
            pos_b += [b] * n
            pos_t += range(p - 1, p - 1 + n)
            rows += range(self.offsets[e], self.offsets[e + 1])
            targets += self.ts.targets[e]
        return ids, torch.tensor(pos_b), torch.tensor(pos_t), torch.tensor(rows), torch.tensor(targets)


    def shared_batch(self, idx: list[int]):
        """The batch with each distinct prompt once: right-padded prompts [P, Lp] and their
        lengths, continuations (targets but their last token) [E, Lc], each example's prompt
        [E], and for each target token its example, its index in the target, flat row and id."""
        firsts = sorted({self.ts.example_prompt[e] for e in idx})
        local = {p: i for i, p in enumerate(firsts)}
        prompts = [self.ts.prompts[p] for p in firsts]
        conts = [self.ts.targets[e][:-1] for e in idx]
        prompt_ids = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        cont_ids = torch.zeros(len(idx), max(1, max(map(len, conts))), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, :len(p)] = torch.tensor(p)
        pos_e, pos_t, rows, targets = [], [], [], []
        for b, (e, c) in enumerate(zip(idx, conts)):
            cont_ids[b, :len(c)] = torch.tensor(c, dtype=torch.long)
            n = len(self.ts.targets[e])
            pos_e += [b] * n
            pos_t += range(n)
            rows += range(self.offsets[e], self.offsets[e + 1])
            targets += self.ts.targets[e]
        prompt_of = torch.tensor([local[self.ts.example_prompt[e]] for e in idx])
        return (prompt_ids, torch.tensor(list(map(len, prompts))), cont_ids, prompt_of,
                torch.tensor(pos_e), torch.tensor(pos_t), torch.tensor(rows), torch.tensor(targets))

    def in_prompt(self, idx: list[int], vocab_size: int, cols: torch.Tensor | None = None,
                  after: list[int] = ()) -> torch.Tensor:
        """[n, V] bool (or [n, len(cols)]: those columns only): for each target token of examples
        ``idx`` (in ``batch`` order), which tokens occur in its example's prompt (from the last
        ``after`` marker on, ``model.copy_start``), as the processor marks them for a plugin with
        copy scores (``PluginLM.add_copy_score``)."""
        return self._per_token(idx, vocab_size, cols, lambda prompt, start: (prompt[start:], ()), after)

    def in_example(self, idx: list[int], vocab_size: int, cols: torch.Tensor | None = None,
                   after: list[int] = ()) -> torch.Tensor:
        """``in_prompt``'s rows: the tokens of each example's prompt before the last ``after``
        marker (the in-context examples) that the part from it on (the task) does not hold, what
        a plugin's example scores lift (``copy_example``)."""
        return self._per_token(idx, vocab_size, cols, lambda prompt, start: (prompt[:start], prompt[start:]), after)

    def task_tokens(self, idx: list[int], vocab_size: int, after: list[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """``in_prompt`` once per distinct prompt of examples ``idx``: [P, V] bool, and int64 [n]
        the prompt of each target token (``batch`` order), for an input bag (``PluginLM.bag_of``)."""
        return self._per_prompt(idx, vocab_size, lambda prompt, start: (prompt[start:], ()), after)

    def _per_prompt(self, idx: list[int], vocab_size: int, split, after) -> tuple[torch.Tensor, torch.Tensor]:
        """A [V] token mask per distinct prompt (``split(prompt, copy_start)``: the tokens to mark
        and those to leave unmarked), [P, V], and the row of each target token of ``idx`` [n]."""
        prompts = sorted({self.ts.example_prompt[e] for e in idx})
        local = {p: i for i, p in enumerate(prompts)}
        mask = torch.zeros(len(prompts), vocab_size, dtype=torch.bool)
        for i, p in enumerate(prompts):
            prompt = self.ts.prompts[p]
            marked, unmarked = split(prompt, copy_start(prompt, after))
            mask[i, torch.tensor(marked, dtype=torch.long)] = True
            mask[i, torch.tensor(unmarked, dtype=torch.long)] = False
        return mask, torch.tensor([local[self.ts.example_prompt[e]] for e in idx for _ in self.ts.targets[e]])

    def _per_token(self, idx: list[int], vocab_size: int, cols: torch.Tensor | None, split, after) -> torch.Tensor:
        """``_per_prompt``'s masks read at ``cols``, one row per target token of ``idx``."""
        mask, which = self._per_prompt(idx, vocab_size, split, after)
        return (mask if cols is None else mask[:, cols])[which]

    def generated_before(self, idx: list[int], vocab_size: int, cols: torch.Tensor | None = None) -> torch.Tensor:
        """[n, V] bool (or [n, len(cols)]), rows as ``in_prompt``'s: for each target token, the
        tokens its target holds before it, the output so far when the plugin predicts it (what
        pending-copy scores leave out, ``PluginConfig.copy_pending``). Every earlier target token
        is a target of the batch, so ``cols`` (which scores every target) holds it."""
        rows, ids, offset = [], [], 0
        for e in idx:
            target = torch.tensor(self.ts.targets[e], dtype=torch.long)
            later, earlier = torch.ones(len(target), len(target), dtype=torch.bool).tril(-1).nonzero(as_tuple=True)
            rows.append(offset + later)
            ids.append(target[earlier])
            offset += len(target)
        rows, ids = torch.cat(rows), torch.cat(ids)
        if cols is not None:
            column = torch.full((vocab_size,), -1, dtype=torch.long)
            column[cols] = torch.arange(len(cols))
            ids = column[ids]
            if bool((ids < 0).any()):  # -1 would mark the last column instead
                raise ValueError("generated_before: cols must hold every target token of the batch")
        mask = torch.zeros(offset, vocab_size if cols is None else len(cols), dtype=torch.bool)
        mask[rows, ids] = True
        return mask

    def grouped_order(self, seed: int) -> list[int]:
        """Every example once, the prompts in a seeded random order and each prompt's examples
        together (also shuffled), so that consecutive batches share prompts."""
        rng = random.Random(seed)
        by_prompt: dict[int, list[int]] = {}
        for e, p in enumerate(self.ts.example_prompt):
            by_prompt.setdefault(p, []).append(e)
        groups = list(by_prompt.values())
        rng.shuffle(groups)
        return [e for g in groups for e in rng.sample(g, len(g))]


def task_shortlist(ts: TokenizedSet, min_count: int = 1) -> list[int]:
    """The token ids that occur at least ``min_count`` times in ``ts``'s prompts (each distinct
    prompt once) and targets, sorted: a shortlisted plugin's own tokens (``PluginConfig.shortlist_size``).
    Built from the fit split only, so that nothing is learnt from select.

    Raises:
        ValueError: no token occurs that often.
    """
    counts = torch.bincount(torch.tensor([t for seq in ts.prompts + ts.targets for t in seq]))
    ids = (counts >= min_count).nonzero()[:, 0].tolist()
    if not ids:
        raise ValueError(f"no token occurs {min_count} times in the fit split: lower --shortlist-min-count")
    return ids


def target_hidden(plugin: PluginLM, data: PairSet, idx: list[int], share_prompts: bool = False,
                  feed: torch.Tensor | None = None):
    """The plugin's hidden state [n, d] before each target token of examples ``idx``, their flat
    rows [n] and ids [n]. ``share_prompts``: a plugin that can (the GRU) reads each distinct
    prompt once (in training mode its references then share the prompt's dropout masks).
    ``feed`` (int64 [n], or None): where >= 0, the plugin reads that token in place of the
    reference's target token there (scheduled sampling; an example's last target is never read)."""
    if share_prompts and hasattr(plugin, "forward_shared"):
        prompts, lens, conts, prompt_of, pos_e, pos_t, rows, targets = data.shared_batch(idx)
        if feed is not None:
            at = feed >= 0
            conts[pos_e[at], pos_t[at]] = feed[at]
        after_prompt, along = plugin.forward_shared(prompts, lens, conts, prompt_of)
        states = torch.cat([after_prompt[prompt_of][:, None], along], 1)  # [E, 1 + Lc, d]
        return with_bag(plugin, data, idx, states[pos_e, pos_t]), rows, targets
    ids, pos_b, pos_t, rows, targets = data.batch(idx)
    if feed is not None:
        at = feed >= 0
        ids[pos_b[at], pos_t[at] + 1] = feed[at]
    return with_bag(plugin, data, idx, plugin(ids)[pos_b, pos_t]), rows, targets


def with_bag(plugin: PluginLM, data: PairSet, idx: list[int], hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` [n, d] before the target tokens of examples ``idx`` plus the input bag of each
    one's task (``PluginLM.bag_of``), as ``set_bag`` adds it when decoding; ``hidden`` itself for
    a plugin without one."""
    if plugin.bag is None:
        return hidden
    tokens, which = data.task_tokens(idx, plugin.config.vocab_size, plugin.config.copy_after)
    return hidden + plugin.bag_of(tokens)[which].to(hidden.dtype)


@torch.no_grad()
def own_inputs(plugin: PluginLM, data: PairSet, idx: list[int], share: float, seed: int,
               share_prompts: bool = False) -> torch.Tensor:
    """Scheduled sampling's inputs for examples ``idx``: int64 [n] over their target tokens
    (``batch`` order), the token greedy decoding picks there under teacher forcing (the argmax
    of the combined scores, ``batch_loss(choose=True)``; the plugin in eval mode) at a seeded
    ``share`` of the positions, -1 (the reference's token) elsewhere and at each example's last."""
    was = plugin.training
    plugin.eval()
    chosen = batch_loss(plugin, data, idx, share_prompts, choose=True)
    plugin.train(was)
    draw = torch.Generator().manual_seed(hash((seed, *idx)) & 0x7FFFFFFF)
    replace = torch.rand(len(chosen), generator=draw) < share
    lengths = torch.tensor([len(data.ts.targets[e]) for e in idx])
    replace[lengths.cumsum(0) - 1] = False
    return torch.where(replace, chosen, -1)


def with_copy_score(plugin: PluginLM, data: PairSet, idx: list[int], hidden: torch.Tensor, logits: torch.Tensor,
                    cols: torch.Tensor | None = None) -> torch.Tensor:
    """The plugin's ``logits`` [n, V] (or at columns ``cols``) before the target tokens of
    examples ``idx`` (``hidden`` [n, d]), with its copy scores if it has them, its pending-copy
    scores on the copied tokens that the target has not held yet, and its example scores on the
    in-context examples' tokens the task lacks."""
    if plugin.copy_score is None:
        return logits
    vocab = plugin.config.vocab_size
    in_prompt = data.in_prompt(idx, vocab, cols, plugin.config.copy_after)
    pending = None if plugin.pending_score is None else in_prompt & ~data.generated_before(idx, vocab, cols)
    in_example = (None if plugin.example_score is None
                  else data.in_example(idx, vocab, cols, plugin.config.copy_after))
    return plugin.add_copy_score(hidden, logits, in_prompt, pending, in_example)


def base_candidates(plugin: PluginLM, data: PairSet, rows: torch.Tensor) -> torch.Tensor | None:
    """int64 [n, K]: the base's K most likely tokens, in rank order, at the flat rows ``rows`` of
    its cache (a top-k cache: its first K listed), for a plugin with candidate scores
    (``PluginConfig.base_candidates`` K); else None (also without a base)."""
    k = plugin.config.base_candidates
    if not k or data.base is None:
        return None
    return data.base.candidates()[rows][:, :k].contiguous()


def batch_loss(plugin: PluginLM | None, data: PairSet, idx: list[int], share_prompts: bool = False,
               feed: torch.Tensor | None = None, choose: bool = False):
    """Summed combined cross-entropy over the batch's target tokens, and their count
    (``share_prompts``, ``feed``: see ``target_hidden``). ``choose``: instead, int64 [n] the
    argmax of the combined scores at each target token (``own_inputs``)."""
    if plugin is None:  # the base alone: its target log-probs, without the vocabulary if it can
        _, _, _, rows, targets = data.batch(idx)
        target = data.base.target_log_probs(rows, targets)
        if target is not None:
            return -target.sum(), len(targets)
        return F.cross_entropy(data.base.scores(rows), targets, reduction="sum"), len(targets)
    if plugin.index_of is not None:
        return shortlist_batch_loss(plugin, data, idx, share_prompts, feed, choose)
    hidden, rows, targets = target_hidden(plugin, data, idx, share_prompts, feed)
    logits = with_copy_score(plugin, data, idx, hidden, plugin.head(hidden))
    if data.base is not None:  # CE renormalises the sum
        base = data.base.scores(rows)
        candidates = base_candidates(plugin, data, rows)  # the cache's own (a top-k view's tail can outrank them)
        if candidates is not None:
            logits = plugin.add_candidate_score(hidden, logits, base, candidates)
        gate = plugin.strength(hidden, base, logits)
        logits = base + (logits if gate is None else gate[:, None] * logits)
    if choose:
        return logits.argmax(-1)
    return F.cross_entropy(logits, targets, reduction="sum"), len(targets)


@loop.without_subnormals
def fit_gate(plugin: PluginLM, data: PairSet, epochs: int = 3, lr: float = 1e-2, batch_size: int = 64,
             seed: int = 0, log=print) -> dict:
    """Fit a gated plugin's gate (``PluginLM.strength``) on ``data``, everything else frozen:
    CombLM's recipe, a combination learned on held-out data (the select split) after the
    experts. Adam on the exact loss; the gate starts at strength x 1, so the loss before is the
    ungated plugin's (epoch 0). The gate of the best epoch is kept, as a plugin's best epoch is.
    Returns {"select_loss_ungated", "select_loss_gated", "best_epoch", "epochs"}."""
    if plugin.gate is None:
        raise ValueError("the plugin has no gate (PluginConfig.gate)")
    for p in plugin.parameters():
        p.requires_grad_(p is plugin.gate.weight or p is plugin.gate.bias)
    opt = torch.optim.Adam(plugin.gate.parameters(), lr=lr)
    before = best = evaluate(plugin, data)
    best_epoch, best_state = 0, {k: v.clone() for k, v in plugin.gate.state_dict().items()}
    rng = random.Random(seed)
    for epoch in range(epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            loss, n = batch_loss(plugin, data, order[i:i + batch_size], share_prompts=True)
            opt.zero_grad(set_to_none=True)
            (loss / n).backward()
            opt.step()
        after = evaluate(plugin, data)
        log(f"gate epoch {epoch + 1}: select {after:.4f} (ungated {before:.4f})")
        if after < best:
            best, best_epoch, best_state = after, epoch + 1, {k: v.clone() for k, v in plugin.gate.state_dict().items()}
    plugin.gate.load_state_dict(best_state)
    for p in plugin.parameters():
        p.requires_grad_(True)
    return {"select_loss_ungated": before, "select_loss_gated": best, "best_epoch": best_epoch, "epochs": epochs}


def sampled_batch_loss(plugin: PluginLM, data: PairSet, idx: list[int], negatives: int, candidate_k: int = 32,
                       seed: int = 0, share_prompts: bool = False):
    """``batch_loss`` with a sampled softmax: (summed cross-entropy, target-token count).

    The product's log-normaliser ``log sum_x p_base(x) exp(z(x))`` (z: the plugin's logits) is
    exact over E, the base's top-``candidate_k`` tokens at every position of the batch plus every
    target, and estimated over the rest R of the vocabulary from ``negatives`` tokens s_j drawn
    uniformly from R with replacement: ``sum_R ~= |R| / negatives * sum_j p_base(s_j) exp(z(s_j))``,
    an unbiased estimate of that sum (its log is slightly low on average, by Jensen's
    inequality). Both heads then cost |E| + ``negatives`` columns instead of the vocabulary.
    The draw is seeded by ``seed`` and the batch's examples, so a batch always sees the same
    negatives. When E already covers the vocabulary the loss is exact.
    """
    if plugin.gate is not None:
        raise ValueError("a gated plugin needs the exact loss: its gate reads each expert's entropy")
    if plugin.index_of is not None:
        raise ValueError("a shortlisted plugin's exact loss already costs only its shortlist: use batch_loss")
    if plugin.candidate_score is not None:
        raise ValueError("a plugin with candidate scores trains with the exact loss (batch_loss)")
    hidden, rows, targets = target_hidden(plugin, data, idx, share_prompts)
    vocab = plugin.config.vocab_size
    candidates = (data.base.candidates(min(candidate_k, vocab))[rows].flatten() if data.base is not None
                  else targets)
    exact = torch.unique(torch.cat([candidates, targets]))  # sorted
    in_rest = torch.ones(vocab, dtype=torch.bool)
    in_rest[exact] = False
    rest = in_rest.nonzero()[:, 0]
    cols = exact
    if len(rest):
        draw = torch.Generator().manual_seed(hash((seed, *idx)) & 0x7FFFFFFF)
        cols = torch.cat([exact, rest[torch.randint(len(rest), (negatives,), generator=draw)]])
    scores = with_copy_score(plugin, data, idx, hidden, F.linear(hidden, plugin.head_weight()[cols], plugin.out_bias[cols]),
                             cols)
    if data.base is not None:
        scores = scores + data.base.log_probs_at(rows, cols)
    e = len(exact)
    log_z = scores[:, :e].logsumexp(-1)
    if len(rest):
        log_z = torch.logaddexp(log_z, scores[:, e:].logsumexp(-1) + math.log(len(rest) / negatives))
    target_scores = scores.gather(1, torch.searchsorted(exact, targets)[:, None])[:, 0]
    return (log_z - target_scores).sum(), len(targets)


def shortlist_batch_loss(plugin: PluginLM, data: PairSet, idx: list[int], share_prompts: bool = False,
                         feed: torch.Tensor | None = None, choose: bool = False):
    """``batch_loss`` of a shortlisted plugin, exact, at the cost of its shortlist: (summed
    cross-entropy, target-token count).

    Every token off the shortlist gets the plugin's one rest logit z_r, so the product's
    normaliser over the vocabulary splits into the columns E that differ (the shortlist, the
    batch's targets, and for copy scores its prompts' tokens) and the rest R, which share z_r:
    ``log Z = logsumexp_E(log p_base + z) (+) (z_r + log p_base(R))`` with ``p_base(R) =
    1 - p_base(E)``. So the base's head is computed at |E| columns, not V (the full cache's
    ``log_probs_at``; a top-k cache's view is exact too), and without a base ``p_base`` is
    uniform. A gate reads the plugin's entropy over the vocabulary from the same split and the
    base's from ``data.base.entropy`` (one pass, cached), and scales z and z_r alike. Equal to
    ``batch_loss`` of the same plugin through ``plugin.head`` (tested). ``choose``: the argmax
    over E and the base's candidates (added to E: ``BaseLogits.candidates()``, its top 32 or a
    top-k cache's own k), not the loss: a token off those could win only by the shared rest
    logit, which the choice leaves out.
    """
    hidden, rows, targets = target_hidden(plugin, data, idx, share_prompts, feed)
    extra = [targets]
    if plugin.copy_score is not None:
        extra += [torch.tensor(data.ts.prompts[p]) for p in {data.ts.example_prompt[e] for e in idx}]
    candidates = base_candidates(plugin, data, rows)
    if candidates is not None:
        extra.append(candidates.flatten())
    if choose and data.base is not None:
        extra.append(data.base.candidates()[rows].flatten())
    cols = torch.unique(torch.cat([plugin.shortlist(), *extra]))  # sorted: E
    row_logits = plugin.head_rows(hidden)
    z = with_copy_score(plugin, data, idx, hidden, row_logits[:, plugin.index_of[cols]], cols)
    base = None if data.base is None else data.base.log_probs_at(rows, cols)
    if candidates is not None:
        z = plugin.add_candidate_score(hidden, z, base, torch.searchsorted(cols, candidates))
    z_rest = row_logits[:, -1]
    rest = plugin.config.vocab_size - len(cols)  # |R|
    if plugin.gate is not None and data.base is not None:
        plugin_entropy = entropy_with_flat(z, z_rest[:, None], torch.full_like(z_rest[:, None], rest))
        gate = plugin.strength_of(hidden, data.base.entropy(rows), plugin_entropy)
        z, z_rest = gate[:, None] * z, gate * z_rest
    scores = z if base is None else z + base
    if not rest:
        log_rest = torch.full_like(z_rest, -math.inf)
    elif base is None:  # a uniform base
        log_rest = torch.full_like(z_rest, math.log(rest))
    else:  # p_base(R) = 1 - p_base(E), in float64 (float32 loses it when E holds nearly all the mass)
        log_rest = torch.log1p(-base.double().logsumexp(-1).exp().clamp(max=1.0)).float()
    if choose:
        return cols[scores.argmax(-1)]
    log_z = torch.logaddexp(scores.logsumexp(-1), z_rest + log_rest)
    target_scores = scores.gather(1, torch.searchsorted(cols, targets)[:, None])[:, 0]
    return (log_z - target_scores).sum(), len(targets)


@torch.no_grad()
def evaluate(plugin: PluginLM | None, data: PairSet, batch_size: int = 64, negatives: int = 0,
             candidate_k: int = 32) -> float:
    """Mean per-token cross-entropy (nats); with ``plugin=None`` the base alone. ``negatives``:
    the sampled-softmax estimate (``sampled_batch_loss``) instead of the exact one."""
    if plugin is not None:
        plugin.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        idx = list(range(i, min(i + batch_size, len(data))))
        if negatives and plugin is not None:
            loss, n = sampled_batch_loss(plugin, data, idx, negatives, candidate_k, share_prompts=True)
        else:
            loss, n = batch_loss(plugin, data, idx, share_prompts=True)  # eval mode: exactly the plain forward
        total, count = total + loss.item(), count + n
    return total / count


def train(plugin: PluginLM, fit: PairSet, select: PairSet, cfg: TrainConfig, out_dir: str | Path,
          resume: bool = True, progress: bool = True, log=print) -> dict:
    """Fit the plugin with ``training.loop``; the best-on-select weights end up in
    ``out_dir/checkpoint``, a resume point in ``out_dir/resume``, and the
    metrics (``loop.summary`` plus the base's fit loss) in ``out_dir/metrics.json``, returned.

    ``resume``: continue from ``out_dir/resume`` if it holds a point (written at the end of every
    epoch and every ``loop.SAVE_EVERY_S`` seconds within one).

    Raises:
        TrainingDivergedError: the training loss, the gradient norm or the select loss went
            NaN/inf; raised before that step updates the weights, and before any save.
        ResumeError: ``out_dir/resume`` is corrupt or incomplete.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    opt = loop.optimizer(plugin, cfg)
    state, resume_dir = LoopState(), out_dir / "resume"
    if resume and (resume_dir / "state.json").is_file():
        state = loop.load_point(resume_dir, opt, lambda f: plugin.load_state_dict(load_plugin(f / "model").state_dict()))
        log(f"resuming at epoch {state.epoch + 1}, batch {state.batch + 1} (best select loss {state.best_select_loss})")
    with_base = select.base is not None
    # The sampled loss and a shortlisted plugin's exact one read the base's log-normaliser: one
    # pass over the vocabulary each, for the whole run (cached beside the base's log-probs).
    if (cfg.negatives or plugin.index_of is not None) and with_base:
        fit.base.candidates(cfg.candidate_k)
        select.base.candidates(cfg.candidate_k)
    base_select = evaluate(None, select) if with_base else None
    base_fit = evaluate(None, fit) if with_base else None

    def kept(s: LoopState) -> str:
        return (f"the best checkpoint ({out_dir / 'checkpoint'}, epoch {s.best_epoch}) and the resume point "
                f"(after epoch {s.epoch}) are untouched" if s.best_epoch else "no checkpoint was written")

    if cfg.negatives:
        def fit_loss(idx):
            return sampled_batch_loss(plugin, fit, idx, cfg.negatives, cfg.candidate_k, cfg.seed, cfg.group_by_prompt)
    else:
        def fit_loss(idx):
            feed = (own_inputs(plugin, fit, idx, cfg.scheduled_sampling, cfg.seed * 1000 + state.epoch,
                               cfg.group_by_prompt) if cfg.scheduled_sampling else None)
            return batch_loss(plugin, fit, idx, cfg.group_by_prompt, feed)
    loop.fit(plugin, opt, cfg, state, len(fit), batch_loss=fit_loss,
             select_loss=lambda: evaluate(plugin, select, negatives=cfg.negatives, candidate_k=cfg.candidate_k),
             save_best=lambda: save_plugin(plugin, out_dir / "checkpoint"),
             save_point=lambda s: loop.save_point(resume_dir, opt, s, lambda f: save_plugin(plugin, f / "model")),
             save_every_s=loop.SAVE_EVERY_S, kept=kept,
             note=f"  (base alone {base_select:.4f})" if with_base else "", progress=progress, log=log,
             order=(lambda epoch: fit.grouped_order(cfg.seed * 1000 + epoch)) if cfg.group_by_prompt else None)
    extra = {}
    if cfg.negatives and state.best_epoch:  # the estimate chose the epoch; report the exact loss too
        extra["best_select_loss_exact"] = evaluate(load_plugin(out_dir / "checkpoint"), select)
    metrics = loop.summary(cfg, state, base_select_loss=base_select, base_fit_loss=base_fit, fit_examples=len(fit),
                           select_examples=len(select), fit_target_tokens=fit.ts.num_target_tokens, **extra)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
