"""Tiny random models for tests and smoke runs: a Llama base (HF folder vLLM loads) and plugins.

Weights are scaled up so both experts have peaked distributions: greedy decoding then has
clear winners, and an exact token-for-token comparison between two implementations is
meaningful rather than a coin toss between near-ties.
"""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS_WORDS = (
    "the a is in of and near with to serves food coffee shop pub restaurant city centre riverside "
    "family friendly not cheap high low average price range customer rating Italian French Chinese "
    "English Japanese fast Indian name area eat type near Alimentum Aromi Bibimbap Blue Spice Cocum "
    "Cotto Fitzbillies Giraffe Green Man Loch Fyne Strada Punter Vaults Wildwood Zizzi"
).split()


def tiny_tokenizer(folder: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(CORPUS_WORDS[i:] + CORPUS_WORDS[:i]) for i in range(len(CORPUS_WORDS))]
    corpus += [f"{w} -- {v}\n" for w, v in zip(CORPUS_WORDS, reversed(CORPUS_WORDS))]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant: "
    fast.save_pretrained(folder)
    return fast


def tiny_base(folder: str | Path, seed: int = 0, vocab_size: int = 384, hidden: int = 64,
              layers: int = 2, scale: float = 8.0) -> Path:
    """A random Llama with the tiny tokenizer, saved as an HF folder (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(folder, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # peaked next-token distributions
    model.save_pretrained(folder)
    (folder / "generation_config.json").unlink(missing_ok=True)
    return folder


def tiny_plugin(vocab_size: int, architecture: str = "gru", seed: int = 1, d_model: int = 32,
                scale: float = 2.0, fingerprint: str = "", **kw):
    """A random plugin whose log-probs are strong enough to change what the base would pick."""
    from .model import PluginConfig, build_plugin

    torch.manual_seed(seed)
    config = PluginConfig(vocab_size=vocab_size, architecture=architecture, d_model=d_model, n_heads=2,
                          max_len=kw.pop("max_len", 256), tokenizer_fingerprint=fingerprint, dropout=0.0,
                          tie_embeddings=False, **kw)
    model = build_plugin(config)
    if model.index_of is not None:  # a seeded random shortlist
        model.set_shortlist(torch.randperm(vocab_size)[:config.shortlist_size].sort().values)
    with torch.no_grad():
        model.embed.weight.mul_(scale)
        model.out_proj.weight.mul_(scale)
        model.out_bias.normal_(0, 1.0)
        if model.gate is not None:  # a gate with opinions: the strength varies by position
            model.gate.weight.normal_(0, 1.0)
        if model.copy_score is not None:  # copy scores with opinions: a bonus for prompt tokens that varies
            model.copy_score.weight.normal_(0, 1.0)
            model.copy_score.bias.fill_(2.0)
        if model.pending_score is not None:  # and for those not generated yet, one that outweighs it
            model.pending_score.weight.normal_(0, 1.0)
            model.pending_score.bias.fill_(4.0)
        if model.example_score is not None:  # and one on the examples' own tokens
            model.example_score.weight.normal_(0, 1.0)
            model.example_score.bias.fill_(4.0)
        if model.bag is not None:  # an input bag that shifts the hidden state as much as a token does
            model.bag.weight.normal_(0, 1.0)
        if model.candidate_score is not None:  # and one on the base's top tokens, by rank bucket
            model.candidate_score.weight.normal_(0, 1.0)
            model.candidate_score.bias.normal_(0, 3.0)
    return model.eval()
