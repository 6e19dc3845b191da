"""The frozen base's next-token distributions on every target token, computed once and cached.

Four sources, one cache format:

- ``full``: a local transformers forward. Each distinct prompt is forwarded once; its
  references continue from its KV cache. We store the base's final hidden state per target
  token (H floats instead of V) plus its output layer, which rebuilds the exact full
  log-probs on the fly at training time.
- ``vllm``: top-k log-probs from a vLLM engine's ``prompt_logprobs`` (the closed-API regime).
- ``openai``: top-k log-probs from any OpenAI-compatible ``/v1/completions`` endpoint
  (``echo`` + ``logprobs``), e.g. a ``vllm serve`` of the base.
- ``full_topk``: the top-k view of the ``full`` cache: the same numbers ``vllm`` returns
  (tested), in minutes instead of a second pass over the base.

Top-k treatment of the tail: top-k sources keep the k best log-probs; the probability mass
left over is spread evenly over the tokens not listed (or, for a plugin trained with a tail
prior, by the fit references' word frequencies: ``BaseLogits.with_tail_prior``). The target token's exact log-prob
(APIs return it with ``echo``) is stored but deliberately *not* put into the distribution:
lifted alone out of the flat tail, it tells the plugin which tail token is right, so the plugin
can learn to raise the whole tail and let the base pick, which no base does at decoding time.
(Removing that leak did not make the E2E top-20 plugin work: see README, "Reproducing the paper".)
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from vllm_plugin.experts import entropy
from vllm_plugin.paths import atomic_folder

CACHE_VERSION = 1


class BaseLogitsError(ValueError):
    pass


@dataclass
class TokenizedSet:
    """Examples as token ids; examples sharing a prompt point at one entry of ``prompts``."""

    prompts: list[list[int]]
    example_prompt: list[int]
    targets: list[list[int]]  # each ends with EOS

    @property
    def num_target_tokens(self) -> int:
        return sum(len(t) for t in self.targets)

    def flat_targets(self) -> torch.Tensor:
        """Every target token, example-major: the row order of a base-logit cache."""
        return torch.tensor([t for ex in self.targets for t in ex])

    def read_from(self, start) -> "TokenizedSet":
        """The same examples with each prompt ``p`` cut to ``p[start(p):]`` (the plugin's view of a
        plugin that reads the task only, ``model.read_start``); targets, and so the rows of a
        base-logit cache, unchanged."""
        return TokenizedSet([p[start(p):] for p in self.prompts], self.example_prompt, self.targets)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.prompts, self.example_prompt, self.targets]).encode())
        return h.hexdigest()[:24]


def tokenize_examples(examples, tokenizer, max_target_tokens: int = 256) -> TokenizedSet:
    from .data import DataError

    if not examples:
        raise DataError("no examples to tokenize")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; targets need one to end on")
    prompt_index: dict[str, int] = {}
    prompts, example_prompt, targets = [], [], []
    for e in examples:
        if e.prompt not in prompt_index:
            prompt_index[e.prompt] = len(prompts)
            prompts.append(tokenizer(e.prompt).input_ids)
        target = tokenizer(e.target, add_special_tokens=False).input_ids + [eos]
        if len(target) > max_target_tokens:
            raise DataError(
                f"target of {len(target)} tokens exceeds max_target_tokens={max_target_tokens}: "
                f"{e.target[:80]!r}... (raise --max-target-tokens or drop the row)"
            )
        example_prompt.append(prompt_index[e.prompt])
        targets.append(target)
    return TokenizedSet(prompts, example_prompt, targets)


@dataclass
class BaseLogits:
    """Per target token (flat, example-major) base log-probs in compact form."""

    kind: str  # "full" or "topk"
    vocab_size: int
    meta: dict = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # full: [N, H]
    head_weight: torch.Tensor | None = None  # full: [V, H]
    head_bias: torch.Tensor | None = None
    softcap: float | None = None
    topk_ids: torch.Tensor | None = None  # topk: [N, k]
    topk_logprobs: torch.Tensor | None = None
    target_logprobs: torch.Tensor | None = None  # topk: [N], exact log-prob of the target token
    # topk, ``with_lift``: the tokens each row's prompt holds, lifted out of the flat tail
    # (``experts.top_k_with_flat_tail``): [P, m] ids per prompt (-1 pads), the prompt of each row [N]
    lift_ids: torch.Tensor | None = None
    lift_prompt: torch.Tensor | None = None
    lift_offset: float = 0.0
    # topk, ``with_tail_prior``: [V] log-probs the tail follows instead of spreading evenly, and
    # [N] each row's log-normaliser after the cap (``experts.prior_tail_log_norm``)
    tail_log_prior: torch.Tensor | None = None
    tail_log_norm: torch.Tensor | None = None
    # full, once ``candidates`` ran: [N, k] top-k ids, [N] log-normaliser and [N] entropy (in a
    # sidecar beside the cache); a top-k cache's entropy once ``entropy`` ran
    candidate_ids: torch.Tensor | None = field(default=None, init=False, repr=False)
    log_normaliser: torch.Tensor | None = field(default=None, init=False, repr=False)
    entropies: torch.Tensor | None = field(default=None, init=False, repr=False)
    folder: Path | None = field(default=None, init=False, repr=False)  # where it is cached, if it is

    def __len__(self):
        return len(self.hidden) if self.kind == "full" else len(self.topk_ids)

    def log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary base log-probs for flat rows ``rows`` -> [n, V]."""
        return torch.log_softmax(self.scores(rows), dim=-1)

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """Base log-probs up to a per-row constant (what a softmax or cross-entropy needs).

        For the full source these are the raw logits, sparing a log-softmax over the vocabulary.
        """
        if self.kind == "full":
            return self._capped(F.linear(self.hidden[rows].float(), self.head_weight, self.head_bias))
        return self._topk_log_probs(rows)

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The base's final logit soft-capping (Gemma-style), if it has one."""
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def candidates(self, k: int = 32, rows_per_batch: int = 1024) -> torch.Tensor:
        """[N, k] the base's k most likely token ids at every target token (a top-k cache: its
        own ids, whatever ``k``). For the full source this is one pass over the vocabulary,
        which also keeps each position's log-normaliser for ``log_probs_at`` and its entropy for
        ``entropy``; computed once."""
        if self.kind == "topk":
            if self.candidate_ids is None:
                self.candidate_ids = self.topk_ids.long()
            return self.candidate_ids
        if self.candidate_ids is not None and self.candidate_ids.shape[1] == k:
            return self.candidate_ids
        sidecar = None if self.folder is None else self.folder / f"candidates_top{k}.safetensors"
        if sidecar is not None and sidecar.is_file():
            try:
                saved = load_file(str(sidecar))
                if saved["ids"].shape == (len(self), k):
                    self.candidate_ids, self.log_normaliser, self.entropies = (saved["ids"], saved["log_normaliser"],
                                                                              saved["entropy"])
                    return self.candidate_ids
            except (SafetensorError, KeyError, OSError):
                pass  # recomputed and rewritten below
        ids, lse, ent = torch.empty(len(self), k, dtype=torch.long), torch.empty(len(self)), torch.empty(len(self))
        with torch.no_grad():
            for start in tqdm(range(0, len(self), rows_per_batch), desc=f"base top-{k} candidates", unit="batch",
                              disable=len(self) < 50_000):
                rows = torch.arange(start, min(start + rows_per_batch, len(self)))
                logits = self.scores(rows)
                ids[rows], lse[rows], ent[rows] = logits.topk(k).indices, logits.logsumexp(-1), entropy(logits)
        self.candidate_ids, self.log_normaliser, self.entropies = ids, lse, ent
        if sidecar is not None:  # beside the cache, written whole or not at all
            tmp = sidecar.with_suffix(f".tmp{os.getpid()}")
            save_file({"ids": ids, "log_normaliser": lse, "entropy": ent}, str(tmp))
            os.replace(tmp, sidecar)
        return self.candidate_ids

    def entropy(self, rows: torch.Tensor, rows_per_batch: int = 256) -> torch.Tensor:
        """[n] entropy (nats) of the base's next-token distribution at flat rows ``rows``, as the
        plugin sees the base (a top-k cache: its view), the feature a gate reads
        (``PluginLM.strength``). One pass over the vocabulary for every row, on the first call
        (for the full source, ``candidates``'); then a lookup."""
        if self.kind == "full" and self.entropies is None:
            self.candidates()
        if self.entropies is None:
            with torch.no_grad():
                self.entropies = torch.cat([entropy(self.scores(torch.arange(i, min(i + rows_per_batch, len(self)))))
                                            for i in range(0, len(self), rows_per_batch)])
        return self.entropies[rows]

    def log_probs_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """[n, m] exact base log-probs of tokens ``cols`` (int64 [m]) at flat rows ``rows`` (int64
        [n]), without touching the rest of the vocabulary: the full source computes only those
        columns of the head (the first call runs ``candidates``, for the normaliser); a top-k cache
        reads its top-k log-probs and the flat tail elsewhere. Differentiable in nothing."""
        cols, repeat = torch.unique(cols, return_inverse=True)  # a token asked for twice: one column, read twice
        if self.kind == "full":
            if self.log_normaliser is None:
                self.candidates()
            logits = self._capped(F.linear(self.hidden[rows].float(), self.head_weight[cols],
                                           None if self.head_bias is None else self.head_bias[cols]))
            return (logits - self.log_normaliser[rows, None])[:, repeat]
        top, ids, lifted, lift, tail = self._view(rows)
        out = self._tail_at(tail, top, cols).expand(len(rows), len(cols)).clone()
        column = torch.full((self.vocab_size,), -1, dtype=torch.long)
        column[cols] = torch.arange(len(cols))
        for tokens, value in ((lifted, lift), (ids, top)):  # top-k last: a lifted token is never among them
            if tokens is None:
                continue
            where = torch.where(tokens >= 0, column[tokens.clamp(min=0)], -1)  # [n, *]: each one's column, or -1
            hit = where >= 0
            out[torch.arange(len(rows))[:, None].expand_as(tokens)[hit], where[hit]] = value.expand_as(tokens)[hit]
        return out[:, repeat]

    def target_log_probs(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """[n] base log-prob of ``targets[i]`` at flat row ``rows[i]`` without a pass over the
        vocabulary (a top-k cache: its view, as ``scores``); None where that needs one (a full
        cache before ``candidates`` ran)."""
        if self.kind == "full":
            if self.log_normaliser is None:
                return None
            logits = (self.hidden[rows].float() * self.head_weight[targets]).sum(-1)
            if self.head_bias is not None:
                logits = logits + self.head_bias[targets]
            return self._capped(logits) - self.log_normaliser[rows]
        top, ids, lifted, lift, tail = self._view(rows)
        match = ids == targets[:, None]
        if lifted is not None:
            tail = torch.where((lifted == targets[:, None]).any(-1, keepdim=True), lift, tail)
        tail = self._tail_at(tail, top, targets[:, None])
        return torch.where(match.any(-1), top.masked_fill(~match, float("-inf")).amax(-1), tail[:, 0])

    def _topk_log_probs(self, rows: torch.Tensor) -> torch.Tensor:
        from vllm_plugin.experts import top_k_with_flat_tail

        if self.tail_log_prior is not None:  # renormalised there, from the listed log-probs
            return top_k_with_flat_tail(self.topk_ids[rows].long(), self.topk_logprobs[rows].float(), self.vocab_size,
                                        tail_prior=self.tail_log_prior)
        top, ids, lifted, _, _ = self._view(rows)
        mask = None
        if lifted is not None:
            mask = torch.zeros(len(rows), self.vocab_size + 1, dtype=torch.bool)
            mask.scatter_(1, torch.where(lifted >= 0, lifted, self.vocab_size), True)  # -1 pads: a spare column
            mask = mask[:, :-1]
        return top_k_with_flat_tail(ids, top, self.vocab_size, mask, self.lift_offset)

    def _view(self, rows: torch.Tensor):
        """A top-k cache's view at ``rows`` [n], in parts: top-k log-probs and ids [n, k]; the
        lifted tokens outside them [n, m] (-1 pads; None without ``with_lift``); a lifted
        token's log-prob and every other tail token's, [n, 1] each (``experts.lifted_tail``; with
        ``with_tail_prior``, what each tail token adds to its prior before the cap, ``_tail_at``)."""
        from vllm_plugin.experts import flat_tail, lifted_tail, prior_tail

        top, ids = self.topk_logprobs[rows].float(), self.topk_ids[rows].long()
        if self.tail_log_prior is not None:  # renormalised after the cap, as experts.top_k_with_flat_tail
            norm = self.tail_log_norm[rows, None]
            return top - norm, ids, None, None, prior_tail(top, ids, self.tail_log_prior) - norm
        if self.lift_ids is None:
            return top, ids, None, None, flat_tail(top, self.vocab_size)
        lifted = self.lift_ids[self.lift_prompt[rows]]
        lifted = lifted.masked_fill((lifted[:, :, None] == ids[:, None, :]).any(-1), -1)
        lift, tail = lifted_tail(top, (lifted >= 0).sum(-1, keepdim=True), self.vocab_size, self.lift_offset)
        return top, ids, lifted, lift, tail

    def _tail_at(self, tail: torch.Tensor, top: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The view's log-prob of tail ``tokens`` (int64, [m] or [n, 1]) given ``_view``'s ``tail``
        and ``top`` [n, k]: ``tail`` itself, or with a tail prior the prior added and capped at the
        k-th log-prob (``experts.top_k_with_flat_tail``)."""
        from vllm_plugin.experts import capped_prior_tail

        if self.tail_log_prior is None:
            return tail
        return capped_prior_tail(tail, self.tail_log_prior[tokens], top)

    def with_lift(self, ts: TokenizedSet, after: list[int], offset: float) -> "BaseLogits":
        """This top-k cache with each row's prompt tokens (from the last ``after`` marker on, the
        tokens a plugin's copy scores lift: ``model.copy_start``) lifted out of the flat tail to
        ``offset`` nats from the k-th log-prob (``PluginConfig.copy_tail_offset``), as the
        processor's view lifts them. ``ts``: the examples this cache's rows are the targets of.

        Raises:
            BaseLogitsError: a full cache (its view is exact; nothing to lift), or ``ts`` does not
                match the cache's rows.
        """
        from dataclasses import replace

        from vllm_plugin.model import copy_start

        if self.kind != "topk" or self.tail_log_prior is not None:
            raise BaseLogitsError("only a top-k cache with a flat tail (no tail prior) has one to lift tokens out of")
        if ts.num_target_tokens != len(self):
            raise BaseLogitsError(f"{ts.num_target_tokens} target tokens for a cache of {len(self)} rows")
        tokens = [sorted(set(p[copy_start(p, after):])) for p in ts.prompts]
        width = max(map(len, tokens), default=0)
        ids = torch.tensor([t + [-1] * (width - len(t)) for t in tokens], dtype=torch.long).reshape(len(tokens), width)
        prompt = torch.tensor([ts.example_prompt[e] for e, t in enumerate(ts.targets) for _ in t], dtype=torch.long)
        return replace(self, lift_ids=ids, lift_prompt=prompt, lift_offset=float(offset))

    def with_tail_prior(self, log_prior: torch.Tensor) -> "BaseLogits":
        """This top-k cache with its tail shared in proportion to ``log_prior`` ([V] log-probs
        summing to 1, ``unigram_log_prior``) instead of evenly, as the processor's view of a
        plugin with ``PluginConfig.tail_prior`` shares it.

        Raises:
            BaseLogitsError: a full cache (its view is exact), one that lifts tokens (``with_lift``),
                or a prior of another size.
        """
        from dataclasses import replace

        from vllm_plugin.experts import prior_tail_log_norm

        if self.kind != "topk" or self.lift_ids is not None:
            raise BaseLogitsError("only a top-k cache without lifted tokens has a flat tail to share by a prior")
        if log_prior.shape != (self.vocab_size,):
            raise BaseLogitsError(f"a tail prior of {tuple(log_prior.shape)} for a vocabulary of {self.vocab_size}")
        log_prior = log_prior.float()
        norm = torch.empty(len(self))
        with torch.no_grad():  # one pass over the vocabulary, in blocks: the view's [V] rows are made only here
            for start in range(0, len(self), 256):
                rows = slice(start, min(start + 256, len(self)))
                norm[rows] = prior_tail_log_norm(self.topk_ids[rows].long(), self.topk_logprobs[rows].float(),
                                                 log_prior)[:, 0]
        return replace(self, tail_log_prior=log_prior, tail_log_norm=norm)

    # ----- storage -------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        with atomic_folder(folder) as tmp:
            tensors = {k: getattr(self, k).contiguous() for k in
                       ("hidden", "head_weight", "head_bias", "topk_ids", "topk_logprobs", "target_logprobs")
                       if getattr(self, k) is not None}
            save_file(tensors, str(tmp / "base_logits.safetensors"))
            meta = {**self.meta, "kind": self.kind, "vocab_size": self.vocab_size,
                    "softcap": self.softcap, "cache_version": CACHE_VERSION}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "BaseLogits":
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            tensors = load_file(str(folder / "base_logits.safetensors"))
        except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as e:
            raise BaseLogitsError(f"base-logit cache {folder} is unreadable ({e}); delete it to rebuild") from e
        if meta.get("cache_version") != CACHE_VERSION:
            raise BaseLogitsError(f"base-logit cache {folder} has an old format; delete it to rebuild")
        kind, vocab = meta.pop("kind"), meta.pop("vocab_size")
        softcap = meta.pop("softcap", None)
        result = cls(kind=kind, vocab_size=vocab, meta=meta, softcap=softcap, **tensors)
        result.folder = folder
        return result


# ----- source: local transformers forward (full logits) ------------------------------------
def unigram_log_prior(ts: TokenizedSet, vocab_size: int, smoothing: float, power: float = 1.0) -> torch.Tensor:
    """[V] log-probs: the unigram distribution of ``ts``'s target tokens, add-``smoothing``
    (every token of the vocabulary counted ``smoothing`` more times), raised to ``power`` and
    renormalised (0: uniform): the tail prior of a plugin with ``PluginConfig.tail_prior`` and
    ``tail_prior_power``, from its fit split's references."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    counts.index_add_(0, ts.flat_targets(), torch.ones(ts.num_target_tokens, dtype=torch.float64))
    return torch.log_softmax(power * (counts + smoothing).log(), 0).float()


def _head_of(model):
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return head.weight.detach().float().clone(), None if bias is None else bias.detach().float().clone(), softcap


@torch.no_grad()
def extract_full(model, ts: TokenizedSet, prompts_per_batch: int = 8, progress: bool = True,
                 hidden_dtype=torch.float32) -> BaseLogits:
    """Forward every distinct prompt once, then all its references from the prompt's KV cache."""
    model.eval()
    by_prompt: list[list[int]] = [[] for _ in ts.prompts]
    for e, p in enumerate(ts.example_prompt):
        by_prompt[p].append(e)
    offsets = [0]
    for t in ts.targets:
        offsets.append(offsets[-1] + len(t))
    hidden_size = model.config.get_text_config().hidden_size
    hidden = torch.empty(offsets[-1], hidden_size, dtype=hidden_dtype)
    order = sorted((p for p in range(len(ts.prompts)) if by_prompt[p]), key=lambda p: len(ts.prompts[p]))
    bar = tqdm(total=ts.num_target_tokens, unit="tok", desc="base logits (full)", disable=not progress)
    core = model.get_decoder()
    for i in range(0, len(order), prompts_per_batch):
        chunk = order[i:i + prompts_per_batch]
        lens = torch.tensor([len(ts.prompts[p]) for p in chunk])
        ids = torch.zeros(len(chunk), int(lens.max()), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, :lens[r]] = torch.tensor(ts.prompts[p])
            mask[r, :lens[r]] = 1
        out = core(input_ids=ids, attention_mask=mask, use_cache=True)
        last = out.last_hidden_state[torch.arange(len(chunk)), lens - 1]
        rows = [r for r, p in enumerate(chunk) for _ in by_prompt[p]]
        exs = [e for p in chunk for e in by_prompt[p]]
        cont_len = max(len(ts.targets[e]) - 1 for e in exs)
        cont_hidden = None
        if cont_len > 0:
            cache = out.past_key_values
            cache.batch_select_indices(torch.tensor(rows))
            cont = torch.zeros(len(exs), cont_len, dtype=torch.long)
            cont_mask = torch.zeros_like(cont)
            for j, e in enumerate(exs):
                n = len(ts.targets[e]) - 1
                cont[j, :n] = torch.tensor(ts.targets[e][:-1])
                cont_mask[j, :n] = 1
            rows_t = torch.tensor(rows)
            position_ids = lens[rows_t][:, None] + torch.arange(cont_len)[None, :]
            out2 = core(input_ids=cont, attention_mask=torch.cat([mask[rows_t], cont_mask], 1),
                        position_ids=position_ids, past_key_values=cache, use_cache=True)
            cont_hidden = out2.last_hidden_state
        for j, (r, e) in enumerate(zip(rows, exs)):
            n = len(ts.targets[e])
            hidden[offsets[e]] = last[r].to(hidden_dtype)
            if n > 1:
                hidden[offsets[e] + 1:offsets[e + 1]] = cont_hidden[j, :n - 1].to(hidden_dtype)
            bar.update(n)
    bar.close()
    weight, bias, softcap = _head_of(model)
    return BaseLogits(kind="full", vocab_size=weight.shape[0], hidden=hidden, head_weight=weight,
                      head_bias=bias, softcap=softcap)


# ----- sources: top-k log-probs --------------------------------------------------------------
def _topk_from_position(entries: dict[int, float], target: int, k: int):
    """entries: token id -> log-prob at one position (top-k plus possibly the target)."""
    best = sorted(entries.items(), key=lambda kv: -kv[1])[:k]
    if len(best) < k:
        raise BaseLogitsError(f"the source returned {len(best)} log-probs at a position, expected {k}")
    if target not in entries:
        raise BaseLogitsError("the source did not return the target token's log-prob (echo)")
    return [t for t, _ in best], [lp for _, lp in best], entries[target]


def _pack_topk(per_position, vocab_size: int, k: int, meta: dict) -> BaseLogits:
    ids = torch.tensor([p[0] for p in per_position], dtype=torch.int32).view(-1, k)
    lps = torch.tensor([p[1] for p in per_position], dtype=torch.float32).view(-1, k)
    tlp = torch.tensor([p[2] for p in per_position], dtype=torch.float32)
    return BaseLogits(kind="topk", vocab_size=vocab_size, topk_ids=ids, topk_logprobs=lps,
                      target_logprobs=tlp, meta=meta)


@torch.no_grad()
def topk_view(full: BaseLogits, ts: TokenizedSet, k: int = 20, rows_per_batch: int = 512,
              progress: bool = True) -> BaseLogits:
    """The top-k view of a full-logit cache: what ``prompt_logprobs=k`` would return, without a
    second pass over the base (that pass ran at ~56 tok/s for a 152k-vocabulary base here)."""
    targets = ts.flat_targets()
    if len(targets) != len(full):
        raise BaseLogitsError(f"full cache has {len(full)} positions, the data {len(targets)}")
    ids = torch.empty(len(full), k, dtype=torch.int32)
    lps = torch.empty(len(full), k)
    tlp = torch.empty(len(full))
    for start in tqdm(range(0, len(full), rows_per_batch), desc=f"top-{k} view of the full cache",
                      unit="batch", disable=not progress):
        rows = torch.arange(start, min(start + rows_per_batch, len(full)))
        lp = full.log_probs(rows)
        top = lp.topk(k)
        ids[rows], lps[rows] = top.indices.int(), top.values
        tlp[rows] = lp.gather(1, targets[rows, None])[:, 0]
    return BaseLogits(kind="topk", vocab_size=full.vocab_size, topk_ids=ids, topk_logprobs=lps,
                      target_logprobs=tlp, meta={"source": "full_topk", "k": k})


def extract_topk_vllm(llm, ts: TokenizedSet, k: int = 20, progress: bool = True) -> BaseLogits:
    """Top-k prompt log-probs from a vLLM engine (``LLM(..., max_logprobs>=k)``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False)
    inputs = [TokensPrompt(prompt_token_ids=ts.prompts[p] + t) for p, t in zip(ts.example_prompt, ts.targets)]
    outputs = llm.generate(inputs, params, use_tqdm=progress)
    per_position = []
    for (p, target), out in zip(zip(ts.example_prompt, ts.targets), outputs):
        start = len(ts.prompts[p])
        for j, tok in enumerate(target):
            entries = {tid: lp.logprob for tid, lp in out.prompt_logprobs[start + j].items()}
            per_position.append(_topk_from_position(entries, tok, k))
    vocab = llm.llm_engine.model_config.get_vocab_size()
    return _pack_topk(per_position, vocab, k, {"source": "vllm", "k": k})


def _parse_token_key(key: str, vocab_lookup) -> int:
    if key.startswith("token_id:"):
        return int(key[len("token_id:"):])
    if vocab_lookup is None:
        raise BaseLogitsError(f"endpoint returned token text {key!r}, not ids; pass a tokenizer")
    if key not in vocab_lookup:
        raise BaseLogitsError(f"endpoint returned token {key!r} that the tokenizer does not know")
    return vocab_lookup[key]


def extract_topk_openai(base_url: str, model: str, ts: TokenizedSet, vocab_size: int, k: int = 20,
                        api_key: str | None = None, concurrency: int = 4, timeout: float = 300.0,
                        tokenizer=None, progress: bool = True) -> BaseLogits:
    """Top-k log-probs from an OpenAI-compatible ``/v1/completions`` endpoint, prompt echoed back.

    Asks for ``return_tokens_as_token_ids`` (vLLM's extension) so tokens come back as ids; with
    other servers a tokenizer maps returned token text back to ids.
    """
    import httpx

    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key or os.environ.get('OPENAI_API_KEY', 'EMPTY')}"}
    lookup = None
    if tokenizer is not None:
        lookup = {tokenizer.decode([i]): i for i in range(len(tokenizer))}

    def one(args):
        p, target = args
        body = {"model": model, "prompt": ts.prompts[p] + target, "max_tokens": 1, "temperature": 0.0,
                "echo": True, "logprobs": k, "return_tokens_as_token_ids": True}
        r = client.post(url, json=body, headers=headers, timeout=timeout)
        if r.status_code != 200:
            raise BaseLogitsError(f"{url} answered {r.status_code}: {r.text[:300]}")
        lp = r.json()["choices"][0]["logprobs"]
        start = len(ts.prompts[p])
        rows = []
        for j, tok in enumerate(target):
            top = lp["top_logprobs"][start + j] or {}
            entries = {_parse_token_key(key, lookup): v for key, v in top.items()}
            entries.setdefault(tok, lp["token_logprobs"][start + j])
            rows.append(_topk_from_position(entries, tok, k))
        return rows

    per_position = []
    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
        jobs = list(zip(ts.example_prompt, ts.targets))
        for rows in tqdm(pool.map(one, jobs), total=len(jobs), desc="base logits (endpoint)",
                         disable=not progress):
            per_position.extend(rows)
    return _pack_topk(per_position, vocab_size, k, {"source": "openai", "k": k, "url": base_url})


# ----- cache ---------------------------------------------------------------------------------
def cache_key(ts: TokenizedSet, base: str, tokenizer_fp: str, source: str, k: int | None) -> str:
    payload = json.dumps({"base": str(base), "fp": tokenizer_fp, "source": source, "k": k,
                          "data": ts.digest(), "v": CACHE_VERSION})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached(folder: Path, build, refresh: bool = False) -> BaseLogits:
    """Load the cache at ``folder`` or build and save it; epochs and sweeps never recompute."""
    folder = Path(folder)
    if not refresh and (folder / "meta.json").is_file():
        return BaseLogits.load(folder)
    result = build()
    result.save(folder)
    result.folder = folder
    return result
