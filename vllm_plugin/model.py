"""Plugin language models: they read the base's token ids and score the base's vocabulary.

Two architectures share one interface, so training, the reference decoder and the vLLM
processor never care which one they hold:

- ``forward(ids) -> hidden``: teacher forcing over whole sequences (training);
- ``head(hidden) -> logits``: the output layer over the base vocabulary;
- ``new_state(num_slots)``: preallocated per-sequence state, one slot per sequence;
- ``advance(state, slots, tokens, lengths, start)``: feed each slot its next tokens (a whole
  prompt, the one token sampled last step, or anything in between);
- ``logits(state, slots)``: the next-token logits of those slots.

``gru`` (default) keeps a fixed-size recurrent state per sequence: one step per new token.
``transformer`` is the paper's 1-layer GPT-2-style plugin; its state is its KV cache.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from .experts import entropy

ARCHITECTURES = ("gru", "transformer")
MAX_CANDIDATES = 20


def candidate_buckets(k: int) -> torch.Tensor:
    """int64 [k]: the bucket of each of the base's top ``k`` ranks for candidate scores, by
    powers of two (rank 1; 2-3; 4-7; 8-15; 16-20)."""
    return torch.log2(torch.arange(1, k + 1, dtype=torch.float64)).floor().long()


@dataclass
class PluginConfig:
    vocab_size: int
    architecture: str = "gru"
    d_model: int = 256
    n_layers: int = 1
    n_heads: int = 4  # transformer only
    max_len: int = 512  # transformer only: positions its KV cache holds
    tie_embeddings: bool = True
    dropout: float = 0.1
    # A learned per-position strength (CombLM-style): the request's weight times
    # 2 * sigmoid(gate([hidden, base entropy, plugin entropy])); see PluginLM.strength.
    gate: bool = False
    # Copy scores (pointer-style): every token of the sequence's prompt gets a learned
    # per-position bonus on the plugin's logits, so the plugin can leave to the base the names
    # and values that only the input holds; see PluginLM.add_copy_score.
    copy: bool = False
    # Token ids from whose last occurrence in the prompt on (the marker included) the copy scores
    # read it ([]: the whole prompt): the task's own input, not the in-context examples before
    # it, whose names and values the output must not repeat. ``copy_start`` finds it; the same
    # rule in training and serving.
    copy_after: list[int] = field(default_factory=list)
    # The plugin reads the prompt from that same marker on, not the in-context examples before it:
    # a plugin behind an example chosen per input (kNN prompting) then reads what the plain
    # prompt's plugin reads, while the base still reads the example. Needs copy_after; gru only.
    read_task_only: bool = False
    # Coverage (See et al., 2017, in spirit): a second learned bonus on the copied tokens that the
    # output has not generated yet, so the plugin can tell the input's content still to say from
    # content said already (E2E outputs of the plain copy plugin omit an attribute in about a
    # quarter of the MRs that hold it). Needs copy=True.
    copy_pending: bool = False
    # Example scores: a third learned bonus (of either sign) on the tokens of the in-context
    # examples before the marker that the task's segment does not hold, the names and values a
    # base prompted with an example tends to repeat from it. Needs copy_after; the plugin reads
    # the whole prompt (not read_task_only).
    copy_example: bool = False
    # Input bag: a learned vector per token, averaged over the distinct tokens of the task's
    # segment (from the copy_after marker on) and added to the hidden state at every position,
    # so that which names, attributes and values the input holds stays in view however long the
    # output runs (a GRU's state fades; E2E plugins name attributes the input lacks). Set once per
    # sequence, when its prompt is whole (``set_bag``). Needs copy_after; gru only.
    input_bag: bool = False
    # Candidate scores (conditioning on the base, as IPA restricts to the base's top tokens): a
    # learned per-position bonus on each of the base's K most likely next tokens, one value per
    # rank bucket (rank 1, 2-3, 4-7, 8-15, 16-20), so the plugin can defer to what the base
    # proposes (the names and values it reads from the input) or push past it. K <= 20, what a
    # closed API returns, so full-logit and top-20 plugins see the same feature (the base's
    # real top K, never a top-k view's flat tail). 0: none.
    base_candidates: int = 0
    # A shortlist (vocabulary-restricted plugin): 0 scores every token of the base's vocabulary;
    # K > 0 scores K tokens of its own (those its training data holds, ``PluginLM.index_of``) and
    # gives every other token one shared logit, so that a token the plugin never saw is left to
    # the base, and training and the head cost K + 1 columns instead of the vocabulary.
    shortlist_size: int = 0
    # The closed-API view with the prompt in mind: in the base's top-k view (a plugin trained from
    # top-k log-probs), the tokens its copy scores lift that are not among the k sit this many nats
    # (<= 0) from the k-th log-prob instead of in the flat tail (``experts.lifted_tail``). Of the
    # reference tokens copied from the input, the few the base ranks below its top 20 sit a median
    # 2 nats below the 20th and 5 to 6 above the flat tail (``benchmarks/top20_reach.py``).
    # None: the plain flat tail. Needs copy=True.
    copy_tail_offset: float | None = None
    # The closed-API view with the task in mind: in the base's top-k view, the mass the top k leave
    # is shared by the other tokens in proportion to the fit targets' unigram frequencies, add-this
    # smoothed (``tail_log_prior``, a buffer), instead of evenly over the vocabulary, where a
    # reference token the base ranks below its top 20 sits 4 to 6 nats below its real log-prob
    # (``benchmarks/top20_reach.py``). None: the plain flat tail. Not with copy_tail_offset.
    tail_prior: float | None = None
    # The power those frequencies are raised to (then renormalised): 1 the unigram prior, 0 the
    # flat tail, in between a tempered one, less sure of the task's words where the base is not.
    tail_prior_power: float = 1.0
    # What the plugin was trained against; checked when it is loaded onto a base.
    tokenizer_fingerprint: str = ""
    base_model: str = ""
    prompt_template: str = ""
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown plugin architecture {self.architecture!r}; expected one of {ARCHITECTURES}"
            )
        if self.vocab_size <= 0 or self.d_model <= 0 or self.n_layers <= 0:
            raise ValueError(f"plugin sizes must be positive: {self}")
        if not 0 <= self.shortlist_size < self.vocab_size:
            raise ValueError(f"shortlist_size={self.shortlist_size} must be 0 (the whole vocabulary) or below "
                             f"vocab_size={self.vocab_size}")
        if self.copy_after and not self.copy:
            raise ValueError(f"copy_after={self.copy_after} is for a plugin with copy scores (copy=True)")
        if self.read_task_only and not self.copy_after:
            raise ValueError("read_task_only reads the prompt from the copy_after marker on: it needs one")
        if self.read_task_only and self.architecture != "gru":
            # A transformer's max_len bounds the positions it reads, which admission checks
            # against the whole prompt; a GRU reads any length.
            raise ValueError("read_task_only is for the gru plugin")
        if self.copy_example and (not self.copy_after or self.read_task_only):
            raise ValueError("copy_example scores the examples before the copy_after marker: it needs one, and a "
                             "plugin that reads them (not read_task_only)")
        if self.input_bag and (not self.copy_after or self.architecture != "gru"):
            raise ValueError("input_bag averages the task's tokens from the copy_after marker on: it needs one, "
                             "and the gru plugin")
        if self.copy_pending and not self.copy:
            raise ValueError("copy_pending is for a plugin with copy scores (copy=True)")
        if self.copy_tail_offset is not None and (
                not self.copy or isinstance(self.copy_tail_offset, bool)
                or not isinstance(self.copy_tail_offset, (int, float)) or not -50 <= self.copy_tail_offset <= 0):
            raise ValueError(f"copy_tail_offset={self.copy_tail_offset!r} must be a number of nats between -50 and 0, "
                             f"for a plugin with copy scores (copy=True), or None")
        if self.tail_prior is not None and (
                isinstance(self.tail_prior, bool) or not isinstance(self.tail_prior, (int, float))
                or not 0 < self.tail_prior <= 1e6 or self.copy_tail_offset is not None):
            raise ValueError(f"tail_prior={self.tail_prior!r} must be a positive smoothing count (or None), and "
                             f"not with copy_tail_offset")
        if isinstance(self.tail_prior_power, bool) or not isinstance(self.tail_prior_power, (int, float)) or not (
                0 <= self.tail_prior_power <= 1):
            raise ValueError(f"tail_prior_power={self.tail_prior_power!r} must be a number in [0, 1]")
        if self.tail_prior is None and self.tail_prior_power != 1.0:
            raise ValueError("tail_prior_power tempers the tail prior: it needs tail_prior")
        if (type(self.base_candidates) is not int or not 0 <= self.base_candidates <= MAX_CANDIDATES
                or self.base_candidates > self.vocab_size):
            raise ValueError(f"base_candidates={self.base_candidates!r} must be an integer between 0 (none) and "
                             f"{MAX_CANDIDATES} (what a closed API returns), and at most vocab_size")
        trained_k = self.training.get("top_k") if isinstance(self.training, dict) else None
        if type(trained_k) is int and 0 < trained_k < self.base_candidates:
            raise ValueError(f"base_candidates={self.base_candidates} is more than the {trained_k} top log-probs "
                             f"the plugin was trained from (training.top_k)")
        if not isinstance(self.copy_after, list) or not all(
                type(t) is int and 0 <= t < self.vocab_size for t in self.copy_after):
            raise ValueError(f"copy_after must be a list of token ids below vocab_size={self.vocab_size}, "
                             f"got {self.copy_after!r}")
        if self.architecture == "transformer" and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


def copy_start(prompt, marker) -> int:
    """Where copy scores start reading ``prompt`` (token ids): the last occurrence of ``marker``
    (``PluginConfig.copy_after``), else 0, the whole prompt (also for an empty marker)."""
    m, prompt, marker = len(marker), list(prompt), list(marker)
    for i in range(len(prompt) - m, -1, -1) if m else ():
        if prompt[i:i + m] == marker:
            return i
    return 0


def read_start(config: PluginConfig, prompt) -> int:
    """Where the plugin starts reading ``prompt`` (token ids): ``copy_start`` for a plugin that
    reads the task only (``PluginConfig.read_task_only``), else 0."""
    return copy_start(prompt, config.copy_after) if config.read_task_only else 0


def copy_starts(tokens: torch.Tensor, lengths: torch.Tensor, marker: torch.Tensor) -> torch.Tensor:
    """``copy_start`` of many prompts at once, but -1 where a prompt lacks the marker (its caller
    reads those whole, and can tell): int64 [n] for ``tokens`` [n, L] (row r's prompt is its first
    ``lengths[r]`` ids, the rest padding) and ``marker`` int64 [m] (empty: 0, the whole prompt)."""
    n, width = tokens.shape
    m = marker.numel()
    if not m:
        return torch.zeros(n, dtype=torch.long, device=tokens.device)
    if width < m:
        return torch.full((n,), -1, dtype=torch.long, device=tokens.device)
    at = torch.arange(width - m + 1, device=tokens.device)
    hit = (tokens.unfold(1, m, 1) == marker).all(-1) & (at[None, :] + m <= lengths[:, None])
    return torch.where(hit, at[None, :], -1).amax(1)


class PluginLM(nn.Module):
    """Shared embedding and tied head; subclasses supply the sequence core.

    Two ways to run one: ``forward(ids)`` for teacher forcing (training, the reference), and a
    per-sequence state for decoding (the processor, the reference decoder):
    ``state = new_state(num_slots)``, ``reset(state, slots)`` for a new sequence in a slot,
    ``advance(state, slots, tokens, lengths, start)`` to feed each slot its unseen tokens, then
    ``logits(state, slots)``. The state is a dict of tensors whose first dimension is the slot:
    ``out`` [num_slots, d_model], the last hidden state after ``ln_f``, and the core's own
    (GRU: ``h`` [num_slots, n_layers, d_model]; transformer: ``k``/``v`` [num_slots, n_layers,
    n_heads, max_len, d_model / n_heads]).

    A shortlisted plugin (``config.shortlist_size`` K > 0) has K + 1 rows of embedding and head:
    ``index_of`` [V] maps each token of the base's vocabulary to its row, K (the shared "rest"
    row) for every token off the shortlist; ``set_shortlist`` fills it.
    """

    def __init__(self, config: PluginConfig):
        super().__init__()
        self.config = config
        rows = config.shortlist_size + 1 if config.shortlist_size else config.vocab_size
        self.embed = nn.Embedding(rows, config.d_model)
        self.ln_f = nn.LayerNorm(config.d_model)
        self.out_proj = None if config.tie_embeddings else nn.Linear(config.d_model, rows, bias=False)
        self.out_bias = nn.Parameter(torch.zeros(rows))
        # None (no state-dict entry) for a plugin of the whole vocabulary.
        self.register_buffer("index_of", torch.full((config.vocab_size,), config.shortlist_size, dtype=torch.long)
                             if config.shortlist_size else None)
        self.drop = nn.Dropout(config.dropout)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.gate = nn.Linear(config.d_model + 2, 1) if config.gate else None
        if self.gate is not None:  # starts at strength x 1: the ungated plugin
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.copy_score = nn.Linear(config.d_model, 1) if config.copy else None
        if self.copy_score is not None:  # starts at no bonus: the plugin without copy scores
            nn.init.zeros_(self.copy_score.weight)
            nn.init.zeros_(self.copy_score.bias)
        self.pending_score = nn.Linear(config.d_model, 1) if config.copy_pending else None
        self.example_score = nn.Linear(config.d_model, 1) if config.copy_example else None
        self.candidate_score = (nn.Linear(config.d_model, int(candidate_buckets(config.base_candidates)[-1]) + 1)
                                if config.base_candidates else None)
        self.register_buffer("candidate_bucket", candidate_buckets(config.base_candidates) if config.base_candidates
                             else None, persistent=False)
        for score in (self.pending_score, self.example_score, self.candidate_score):
            if score is not None:  # starts at no bonus too
                nn.init.zeros_(score.weight)
                nn.init.zeros_(score.bias)
        # [V] log-probs a top-k view's tail follows (``experts.top_k_with_flat_tail``); uniform
        # until ``set_tail_prior``. None (no state-dict entry) without ``config.tail_prior``.
        self.register_buffer("tail_log_prior", torch.full((config.vocab_size,), -math.log(config.vocab_size))
                             if config.tail_prior is not None else None)
        self.bag = nn.Embedding(rows, config.d_model) if config.input_bag else None
        if self.bag is not None:  # starts at no shift: the plugin without it
            nn.init.zeros_(self.bag.weight)

    def set_shortlist(self, token_ids) -> None:
        """Make ``token_ids`` (``config.shortlist_size`` distinct ids, sorted) the shortlist: token
        ``token_ids[i]`` gets row i, every other token the rest row.

        Raises:
            ValueError: the plugin has no shortlist, or ``token_ids`` is not K distinct valid ids.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        k, v = self.config.shortlist_size, self.config.vocab_size
        if not k or len(ids) != k or len(torch.unique(ids)) != k or int(ids.min()) < 0 or int(ids.max()) >= v:
            raise ValueError(f"a shortlist must be {k} distinct token ids below {v}, got {len(ids)} "
                             f"({len(torch.unique(ids))} distinct)")
        self.index_of.fill_(k)
        self.index_of[ids] = torch.arange(k, device=self.index_of.device)

    def set_tail_prior(self, log_prior: torch.Tensor) -> None:
        """Make ``log_prior`` ([V] float log-probs, finite, summing to 1) the tail prior.

        Raises:
            ValueError: the plugin has no tail prior (``config.tail_prior``), or ``log_prior`` is
                not a finite [V] distribution.
        """
        v = self.config.vocab_size
        if self.tail_log_prior is None:
            raise ValueError("this plugin's top-k view has a flat tail (config.tail_prior is None)")
        if (log_prior.shape != (v,) or not torch.isfinite(log_prior).all()
                or abs(log_prior.double().exp().sum().item() - 1.0) > 1e-4):
            raise ValueError(f"a tail prior must be {v} finite log-probs summing to 1")
        self.tail_log_prior.copy_(log_prior)

    def shortlist(self) -> torch.Tensor | None:
        """int64 [K]: the shortlisted token ids, sorted (None: the whole vocabulary)."""
        return None if self.index_of is None else (self.index_of < self.config.shortlist_size).nonzero()[:, 0]

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (any shape) -> their embeddings [..., d_model] (off the shortlist: the rest row)."""
        return self.embed(ids if self.index_of is None else self.index_of[ids])

    def to_vocab(self, row_logits: torch.Tensor) -> torch.Tensor:
        """[..., rows] head outputs -> [..., V] logits over the base's vocabulary (a shortlisted
        plugin: each token reads its row, the rest row for tokens off the shortlist)."""
        return row_logits if self.index_of is None else row_logits.index_select(-1, self.index_of)

    def add_copy_score(self, hidden: torch.Tensor, logits: torch.Tensor, in_prompt: torch.Tensor,
                       pending: torch.Tensor | None = None, in_example: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` [n, C] plus the learned bonus ``copy_score(hidden)`` ([n], from ``hidden``
        [n, d_model]) on the columns whose token occurs in the sequence's prompt (``in_prompt``
        [n, C] bool; C: the vocabulary, or the columns a sampled softmax scores). A pointer-style
        copy feature (See et al., 2017, for one score per prompt token): the plugin cannot know
        a name it never saw, but it can learn where the output copies from the input, and then
        stop standing in the base's way. A plugin with ``copy_pending`` adds ``pending_score(hidden)``
        on ``pending`` ([n, C] bool: those of ``in_prompt`` that the output has not generated
        yet), and one with ``copy_example`` ``example_score(hidden)`` on ``in_example`` ([n, C]
        bool: the tokens of the prompt before its marker that ``in_prompt`` does not hold).
        ``logits`` itself for a plugin without copy scores.

        Raises:
            ValueError: a plugin with ``copy_pending`` called without ``pending``, or with
                ``copy_example`` without ``in_example``.
        """
        if self.copy_score is None:
            return logits
        copy, still, example = self.copy_bonuses(hidden)
        logits = logits + copy.to(logits.dtype) * in_prompt
        if still is not None:
            if pending is None:
                raise ValueError("this plugin has pending-copy scores (copy_pending): pass the prompt's tokens "
                                 "not generated yet")
            logits = logits + still.to(logits.dtype) * pending
        if example is not None:
            if in_example is None:
                raise ValueError("this plugin has example scores (copy_example): pass the examples' tokens")
            logits = logits + example.to(logits.dtype) * in_example
        return logits

    def copy_bonuses(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """[n, 1] each, float32: the copy score, the pending-copy score and the example score
        (None without them) at ``hidden`` [n, d_model], the bonuses ``add_copy_score`` adds (the
        processor's shortlisted path adds them itself)."""
        x = hidden.to(self.copy_score.weight.dtype)
        return tuple(None if score is None else score(x).float()
                     for score in (self.copy_score, self.pending_score, self.example_score))

    def bag_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """[n, d_model]: the input bag of each of ``tokens`` [n, V] bool (the task's tokens,
        ``PluginConfig.input_bag``): the mean of ``bag`` over their distinct rows (a shortlisted
        plugin's tokens off the shortlist share the rest row, counted once); zeros for an empty row."""
        if self.index_of is not None:
            row, token = tokens.nonzero(as_tuple=True)
            tokens = torch.zeros(len(tokens), self.bag.num_embeddings, dtype=torch.bool, device=tokens.device)
            tokens[row, self.index_of[token]] = True
        rows = tokens.to(self.bag.weight.dtype)
        return rows @ self.bag.weight / rows.sum(-1, keepdim=True).clamp(min=1)

    def candidate_bonus(self, hidden: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """[n, K] float32: the candidate scores' bonus on the base's K most likely tokens at
        ``hidden`` [n, d_model], given the base's scores of those tokens ``values`` [n, K] (logits or
        log-probs, in rank order). A token's bucket follows the number of candidates strictly above
        it, so tied tokens share one (whatever order ``topk`` gave them); a token vLLM's constraints
        masked (-inf) gets none."""
        rank = (values[:, None, :] > values[:, :, None]).sum(-1)  # [n, K]: candidates above each
        bonus = self.candidate_score(hidden.to(self.candidate_score.weight.dtype)).float()
        bonus = bonus.gather(1, self.candidate_bucket[rank])
        return torch.where(torch.isfinite(values), bonus, 0.0)

    def add_candidate_score(self, hidden: torch.Tensor, logits: torch.Tensor, base_scores: torch.Tensor,
                            candidates: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` [n, C] plus candidate scores on the base's K most likely tokens: the columns
        ``candidates`` [n, K] (int64, in rank order) of ``logits`` and ``base_scores`` [n, C] (the
        base's scores over the same columns), or by default the K that ``base_scores`` ranks
        highest (serving: the base's logits after vLLM's constraints, before any top-k view, whose
        flat tail could outrank a confident base's lower listed tokens; training passes the cache's
        own). ``logits`` itself for a plugin without candidate scores."""
        if self.candidate_score is None:
            return logits
        if candidates is None:
            values, candidates = base_scores.topk(self.config.base_candidates)
        else:
            values = base_scores.gather(1, candidates)
        return logits.scatter_add(1, candidates, self.candidate_bonus(hidden, values).to(logits.dtype))

    def strength(self, hidden: torch.Tensor, base_scores: torch.Tensor, plugin_logits: torch.Tensor) -> torch.Tensor | None:
        """[n] per-position multiplier of the request's strength, in (0, 2): ``2 sigmoid(gate(
        [hidden, H(base), H(plugin)]))``, H the entropy (nats) of each expert's next-token
        distribution (``base_scores`` [n, V]: the base's logits or log-probs as the plugin sees
        the base, ``plugin_logits`` [n, V]). None for a plugin without a gate (strength x 1)."""
        if self.gate is None:
            return None
        return self.strength_of(hidden, entropy(base_scores), entropy(plugin_logits))

    def strength_of(self, hidden: torch.Tensor, base_entropy: torch.Tensor, plugin_entropy: torch.Tensor) -> torch.Tensor:
        """``strength`` from the experts' entropies ([n] each, nats), for callers that have them
        without the vocabulary-wide scores (the shortlisted loss)."""
        features = torch.cat([hidden.float(), base_entropy[:, None].float(), plugin_entropy[:, None].float()], -1)
        return 2 * torch.sigmoid(self.gate(features))[:, 0]

    def head_weight(self) -> torch.Tensor:
        """[rows, d_model] (rows: V, or K + 1 for a shortlist): the embedding (tied) or the
        output projection."""
        return self.embed.weight if self.out_proj is None else self.out_proj.weight

    def head_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d_model] hidden states -> [..., rows] logits of the head's rows."""
        return F.linear(hidden, self.head_weight(), self.out_bias)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., d_model] hidden states -> [..., V] logits over the base's vocabulary."""
        return self.to_vocab(self.head_rows(hidden))

    def logits(self, state: dict, slots: torch.Tensor) -> torch.Tensor:
        """[len(slots), V] next-token logits of the sequences in ``slots`` (int64 [n])."""
        return self.head(state["out"][slots])

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one decode step: the core's step plus the head over its rows."""
        return 2 * (self._core_macs_per_token() + self.config.d_model * self.out_bias.numel())


class GRUPlugin(PluginLM):
    """The default plugin: embedding -> GRU (``n_layers``) -> LayerNorm -> head. Its decode state
    is ``n_layers x d_model`` floats per sequence, whatever the length."""

    def __init__(self, config: PluginConfig):
        super().__init__(config)
        d = config.d_model
        self.rnn = nn.GRU(d, d, config.n_layers, batch_first=True,
                          dropout=config.dropout if config.n_layers > 1 else 0.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, d_model] hidden states (position t has read ids[:, :t + 1])."""
        out, _ = self.rnn(self.drop(self.embed_ids(ids)))
        return self.ln_f(self.drop(out))

    def forward_shared(self, prompts: torch.Tensor, prompt_lens: torch.Tensor, conts: torch.Tensor,
                       prompt_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing where sequences share prompts: each prompt is read once.

        prompts [P, Lp] (right-padded; true lengths ``prompt_lens`` [P]); continuation e of
        ``conts`` [E, Lc] follows prompt ``prompt_of[e]``. Returns the hidden state after each
        prompt [P, d_model] and those along each continuation [E, Lc, d_model]: in eval mode
        exactly ``forward`` of the concatenated sequences at those positions.

        The prompts' common prefix (a template's opening text, an in-context example drawn for
        all) is read once, by one row; in training mode its dropout masks are then shared too."""
        lens = prompt_lens.cpu()
        agree = (prompts == prompts[:1]).all(0).long()  # [Lp]: every prompt has prompt 0's token
        k = min(int(agree.cumprod(0).sum()), int(lens.min()) - 1)  # leave each prompt a token
        h0 = None
        if k > 0 and len(prompts) > 1:
            _, h0 = self.rnn(self.drop(self.embed_ids(prompts[:1, :k])))  # [n_layers, 1, d]
            h0 = h0.expand(-1, len(prompts), -1).contiguous()
            prompts, lens = prompts[:, k:], lens - k
        packed = pack_padded_sequence(self.drop(self.embed_ids(prompts)), lens, batch_first=True,
                                      enforce_sorted=False)
        _, h = self.rnn(packed, h0)  # [n_layers, P, d]: each prompt's state after its last token
        out, _ = self.rnn(self.drop(self.embed_ids(conts)), h[:, prompt_of].contiguous())
        return self.ln_f(self.drop(h[-1])), self.ln_f(self.drop(out))

    def new_state(self, num_slots: int, device=None, dtype=torch.float32) -> dict:
        """Zeroed decode state for ``num_slots`` sequences: ``h`` [num_slots, n_layers, d_model],
        ``out`` [num_slots, d_model], and with an input bag ``bag`` [num_slots, d_model]."""
        c = self.config
        state = {
            "h": torch.zeros(num_slots, c.n_layers, c.d_model, device=device, dtype=dtype),
            "out": torch.zeros(num_slots, c.d_model, device=device, dtype=dtype),
        }
        if c.input_bag:
            state["bag"] = torch.zeros(num_slots, c.d_model, device=device, dtype=dtype)
        return state

    def reset(self, state: dict, slots: torch.Tensor) -> None:
        """Start a new sequence in each of ``slots`` (int64 [n]). An input bag is left as it is:
        ``set_bag`` gives the sequence its own once its prompt is whole, which may come first."""
        state["h"][slots] = 0.0
        state["out"][slots] = 0.0

    def set_bag(self, state: dict, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Give the sequences in ``slots`` (int64 [n]) the input bag of ``tokens`` [n, V] bool (their
        task's tokens, ``bag_of``), in ``out`` too: every later hidden state carries it."""
        bag = self.bag_of(tokens).to(state["bag"].dtype)
        state["out"][slots] += bag - state["bag"][slots]
        state["bag"][slots] = bag

    def advance(self, state: dict, slots: torch.Tensor, tokens: torch.Tensor,
                lengths: list[int] | None, start: list[int]) -> None:
        """Feed ``tokens[r, :lengths[r]]`` (int64 [n, T]; all T if ``lengths`` is None) to slot
        ``slots[r]`` (int64 [n]), updating ``h`` and ``out``. ``start[r]``: how many tokens the
        slot has seen (the GRU does not need it)."""
        if tokens.shape[1] == 1 and not self.training:  # the decode step: the fused cell, a few times cheaper
            x, h = self.embed_ids(tokens[:, 0]), state["h"][slots]
            layers = []
            for i in range(self.config.n_layers):
                x = torch.gru_cell(x, h[:, i], *(getattr(self.rnn, f"{w}_l{i}")
                                                 for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")))
                layers.append(x)
            state["h"][slots] = torch.stack(layers, 1)
            state["out"][slots] = self.ln_f(x) if self.bag is None else self.ln_f(x) + state["bag"][slots]
            return
        h0 = state["h"][slots].transpose(0, 1).contiguous()
        x = self.embed_ids(tokens)
        if lengths is None or min(lengths) == tokens.shape[1]:
            _, hn = self.rnn(x, h0)
        else:
            packed = pack_padded_sequence(x, torch.as_tensor(lengths, dtype=torch.long),
                                          batch_first=True, enforce_sorted=False)
            _, hn = self.rnn(packed, h0)
        state["h"][slots] = hn.transpose(0, 1)
        state["out"][slots] = self.ln_f(hn[-1]) if self.bag is None else self.ln_f(hn[-1]) + state["bag"][slots]

    def _core_macs_per_token(self) -> int:
        d = self.config.d_model
        return self.config.n_layers * 6 * d * d


class Block(nn.Module):
    """A pre-LayerNorm GPT-2 block (causal self-attention, then a 4x GELU MLP)."""

    def __init__(self, d: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> [B, n_heads, T, d / n_heads]."""
        b, t, d = x.shape
        return x.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> [B, T, d], causal (teacher forcing; decoding attends over the cache in
        ``TransformerPlugin.advance``)."""
        b, t, d = x.shape
        q, k, v = (self.split_heads(z) for z in self.qkv(self.ln1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerPlugin(PluginLM):
    """The paper's plugin: a GPT-2-style decoder, 1 layer by default, trained from scratch."""

    def __init__(self, config: PluginConfig):
        super().__init__(config)
        self.pos = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads, config.dropout)
                                    for _ in range(config.n_layers))
        nn.init.normal_(self.pos.weight, std=0.01)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, T, d_model] hidden states, causal.

        Raises:
            ValueError: T exceeds ``config.max_len`` (no position embedding past it).
        """
        t = ids.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence of {t} tokens exceeds the plugin's max_len={self.config.max_len}")
        x = self.drop(self.embed_ids(ids) + self.pos(torch.arange(t, device=ids.device)))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def new_state(self, num_slots: int, device=None, dtype=torch.float32) -> dict:
        """Decode state for ``num_slots`` sequences: the KV cache ``k``/``v`` [num_slots, n_layers,
        n_heads, max_len, d_model / n_heads] and ``out`` [num_slots, d_model]."""
        c = self.config
        shape = (num_slots, c.n_layers, c.n_heads, c.max_len, c.d_model // c.n_heads)
        return {
            "k": torch.zeros(shape, device=device, dtype=dtype),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "out": torch.zeros(num_slots, c.d_model, device=device, dtype=dtype),
        }

    def reset(self, state: dict, slots: torch.Tensor) -> None:
        """Start a new sequence in each of ``slots`` (int64 [n])."""
        state["out"][slots] = 0.0  # stale keys are masked by position, never read

    def advance(self, state: dict, slots: torch.Tensor, tokens: torch.Tensor,
                lengths: list[int] | None, start: list[int]) -> None:
        """Feed ``tokens[r, :lengths[r]]`` (int64 [n, T]; all T if ``lengths`` is None) at positions
        ``start[r]...`` of slot ``slots[r]``, writing their keys/values into the cache and the last
        one's hidden state into ``out``. Positions past ``max_len`` are clamped: callers keep such
        rows out (the processor stops the plugin there; admission refuses such requests)."""
        r, t = tokens.shape
        device = tokens.device
        lengths_t = torch.as_tensor(lengths if lengths is not None else [t] * r, device=device)
        start_t = torch.as_tensor(start, device=device)
        pos = start_t[:, None] + torch.arange(t, device=device)[None, :]  # [r, t]
        valid = torch.arange(t, device=device)[None, :] < lengths_t[:, None]
        max_len = self.config.max_len
        pos_c = pos.clamp(max=max_len - 1)  # rows past max_len are disabled by the caller
        x = self.embed_ids(tokens) + self.pos(pos_c)
        # A query at position p sees cache positions <= p of its own slot.
        key_pos = torch.arange(max_len, device=device)
        mask = key_pos[None, None, None, :] <= pos_c[:, None, :, None]  # [r, 1, t, max_len]
        row_idx = slots[:, None].expand(r, t)[valid]
        col_idx = pos_c[valid]
        for i, block in enumerate(self.blocks):
            d = x.shape[-1]
            q, k, v = block.qkv(block.ln1(x)).split(d, dim=2)
            k, v = block.split_heads(k), block.split_heads(v)  # [r, h, t, hd]
            # Write the new keys/values, then attend over the slot's whole cache.
            state["k"][row_idx, i, :, col_idx] = k.transpose(1, 2)[valid]
            state["v"][row_idx, i, :, col_idx] = v.transpose(1, 2)[valid]
            k_all, v_all = state["k"][slots, i], state["v"][slots, i]
            y = F.scaled_dot_product_attention(block.split_heads(q), k_all, v_all, attn_mask=mask)
            x = x + block.proj(y.transpose(1, 2).reshape(r, t, d))
            x = x + block.mlp(block.ln2(x))
        last = (lengths_t - 1).clamp(min=0)
        state["out"][slots] = self.ln_f(x[torch.arange(r, device=device), last])

    def _core_macs_per_token(self) -> int:
        d = self.config.d_model
        # qkv + proj + mlp, plus attention over an average half-full cache
        return self.config.n_layers * (12 * d * d + d * self.config.max_len)


def build_plugin(config: PluginConfig) -> PluginLM:
    """A fresh plugin of ``config.architecture`` (``gru`` or ``transformer``)."""
    return {"gru": GRUPlugin, "transformer": TransformerPlugin}[config.architecture](config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
