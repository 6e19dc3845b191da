"""Text-generation metrics, multi-reference, from maintained packages that work offline.

| metric  | implementation |
|---------|----------------|
| BLEU    | sacrebleu `corpus_bleu` (0-100, default 13a tokenisation) |
| ROUGE-L | rouge-score `rougeL` F-measure, best reference per output, averaged |
| METEOR  | nltk `meteor_score` (WordNet from Debian's `wordnet-base`), averaged |
| CIDEr   | CIDEr-D as in the COCO caption scripts (pycocoevalcap's definition), lower-cased words |
| NIST    | nltk `corpus_nist`, n=5 |
"""
from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from pathlib import Path

IMPLEMENTATIONS = {
    "bleu": "sacrebleu corpus_bleu (0-100)",
    "rouge_l": "rouge-score rougeL F, max over references",
    "meteor": "nltk meteor_score with WordNet 3.0",
    "cider": "CIDEr-D (COCO definition), sigma=6, x10",
    "nist": "nltk corpus_nist, n=5",
}


def _tokens(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]", text.lower())


def _ensure_wordnet() -> None:
    """nltk wants WordNet under NLTK_DATA/corpora/wordnet; Debian ships it in /usr/share/wordnet."""
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        return
    except LookupError:
        pass
    src = Path("/usr/share/wordnet")
    if not (src / "data.noun").is_file():
        raise RuntimeError("METEOR needs WordNet: `apt-get install wordnet-base wordnet-sense-index`")
    root = Path(os.environ.get("VLLM_PLUGIN_CACHE", Path.home() / ".cache" / "vllm_plugin")) / "nltk_data"
    dest = root / "corpora" / "wordnet"
    if not (dest / "data.noun").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file():
                shutil.copy(f, dest / f.name)
        if not (dest / "lexnames").is_file():
            names = ["adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
                     "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
                     "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
                     "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
                     "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
                     "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
                     "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
                     "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl"]
            (dest / "lexnames").write_text("".join(f"{i:02d}\t{n}\t{0}\n" for i, n in enumerate(names)))
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))


def cider_d(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D: tf-idf n-gram cosine with a length penalty and clipping, x10 (COCO definition)."""
    def grams(words, k):
        return Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1))

    doc_freq = [Counter() for _ in range(n)]
    for rs in refs:
        for k in range(n):
            seen = set()
            for r in rs:
                seen |= set(grams(r, k + 1))
            doc_freq[k].update(seen)
    log_n = math.log(float(len(refs)))

    def vec(words, k):
        counts = grams(words, k + 1)
        v = {g: c * (log_n - math.log(max(1.0, doc_freq[k][g]))) for g, c in counts.items()}
        return v, math.sqrt(sum(x * x for x in v.values())), len(words)

    scores = []
    for h, rs in zip(hyps, refs):
        total = 0.0
        for k in range(n):
            vh, nh, lh = vec(h, k)
            for r in rs:
                vr, nr, lr = vec(r, k)
                dot = sum(min(vh[g], vr[g]) * vr[g] for g in vh if g in vr)
                sim = dot / (nh * nr) if nh and nr else 0.0
                total += sim * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        scores.append(total / n / len(rs) * 10.0)
    return sum(scores) / len(scores)


def _reference_streams(references: list[list[str]]) -> list[list[str]]:
    """sacrebleu's reference streams from one reference set per output: an output with fewer
    references than the most repeats its first."""
    width = max(map(len, references))
    return [[rs[i] if i < len(rs) else rs[0] for rs in references] for i in range(width)]


def bleu_gain_share_interval(hypotheses: dict[str, list[str]], references: list[list[str]], part: str, full: str,
                             zero: str, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the share of ``full``'s BLEU gain over ``zero`` that
    ``part`` keeps, (BLEU(part) - BLEU(zero)) / (BLEU(full) - BLEU(zero)), the three systems'
    outputs (``hypotheses[name]``, one per input of ``references``) resampled by input with
    replacement, the same draw for all three (a paired bootstrap, Koehn 2004). Each resample's
    corpus BLEU sums per-input n-gram statistics, as sacrebleu's own paired bootstrap does
    (``sacrebleu.significance``), so it is exactly ``sacrebleu.corpus_bleu`` of that resample.
    A resample where ``full`` does not beat ``zero`` has no share: counted in ``undefined``, left
    out of the interval. Returns {"low", "high", "level", "resamples", "undefined", "seed"}."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    metric, streams = BLEU(), _reference_streams(references)
    stats = {n: np.asarray(metric._extract_corpus_statistics(hypotheses[n], streams)) for n in (part, full, zero)}
    draws = np.random.default_rng(seed).integers(0, len(references), size=(resamples, len(references)))
    shares = []
    for rows in draws:
        bleu = {n: metric._compute_score_from_stats(s[rows].sum(0)).score for n, s in stats.items()}
        if bleu[full] > bleu[zero]:
            shares.append((bleu[part] - bleu[zero]) / (bleu[full] - bleu[zero]))
    low, high = (np.quantile(shares, [(1 - level) / 2, (1 + level) / 2]).tolist() if shares else (None, None))
    return {"low": low, "high": high, "level": level, "resamples": resamples, "undefined": resamples - len(shares),
            "seed": seed}


def score(hypotheses: list[str], references: list[list[str]], only: tuple[str, ...] | None = None) -> dict:
    """All five metrics for outputs against their reference sets; ``only=("bleu", "rouge_l")``
    computes just those two (what choosing on select reads: METEOR dominates the time)."""
    import sacrebleu
    from nltk.translate.meteor_score import meteor_score
    from nltk.translate.nist_score import corpus_nist
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError("need one non-empty reference set per output")
    bleu = sacrebleu.corpus_bleu(hypotheses, _reference_streams(references)).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = sum(max(scorer.score(r, h)["rougeL"].fmeasure for r in rs)
                for h, rs in zip(hypotheses, references)) / len(hypotheses)
    if only is not None:
        unknown = set(only) - {"bleu", "rouge_l"}
        if unknown:
            raise ValueError(f"only bleu and rouge_l can be computed alone, not {sorted(unknown)}")
        return {k: v for k, v in {"bleu": bleu, "rouge_l": rouge}.items() if k in only}
    hyp_tok = [_tokens(h) for h in hypotheses]
    ref_tok = [[_tokens(r) for r in rs] for rs in references]
    _ensure_wordnet()
    meteor = sum(meteor_score(rs, h) for h, rs in zip(hyp_tok, ref_tok)) / len(hypotheses)
    try:
        nist = corpus_nist(ref_tok, hyp_tok, n=5)
    except ZeroDivisionError:
        nist = 0.0
    return {"bleu": bleu, "rouge_l": rouge, "meteor": meteor, "cider": cider_d(hyp_tok, ref_tok), "nist": nist}
