"""The plugin's step API reproduces its full-sequence forward."""
import pytest
import torch

from vllm_plugin.testing import tiny_plugin

V = 97


@pytest.mark.parametrize("arch", ["gru", "transformer"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_step_api_equals_forward(arch, n_layers):
    plugin = tiny_plugin(V, arch, n_layers=n_layers, max_len=64)
    torch.manual_seed(0)
    seqs = [torch.randint(0, V, (n,)).tolist() for n in (5, 9, 1, 13)]
    prompt_lens = [3, 6, 1, 4]
    state = plugin.new_state(8)
    slots = torch.tensor([6, 0, 3, 5])  # arbitrary, non-contiguous slots
    with torch.no_grad():
        # Prefill all prompts in one ragged batch, then step one token at a time.
        width = max(prompt_lens)
        prompts = torch.zeros(4, width, dtype=torch.long)
        for r, (s, p) in enumerate(zip(seqs, prompt_lens)):
            prompts[r, :p] = torch.tensor(s[:p])
        plugin.advance(state, slots, prompts, prompt_lens, [0] * 4)
        stepped = {r: [plugin.logits(state, slots[r:r + 1])[0]] for r in range(4)}
        pos = list(prompt_lens)
        while True:
            live = [r for r in range(4) if pos[r] < len(seqs[r])]
            if not live:
                break
            toks = torch.tensor([[seqs[r][pos[r]]] for r in live])
            plugin.advance(state, slots[live], toks, None, [pos[r] for r in live])
            out = plugin.logits(state, slots[live])
            for i, r in enumerate(live):
                stepped[r].append(out[i])
                pos[r] += 1
        for r, s in enumerate(seqs):
            full = plugin.head(plugin(torch.tensor([s])))[0]
            expected = full[prompt_lens[r] - 1:]
            got = torch.stack(stepped[r])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_catch_up_from_midway_equals_forward():
    """A state fed some tokens, then several at once (resumed or chunked rows), matches forward."""
    for arch in ("gru", "transformer"):
        plugin = tiny_plugin(V, arch, max_len=64)
        seq = torch.randint(0, V, (12,))
        state = plugin.new_state(2)
        slot = torch.tensor([1])
        with torch.no_grad():
            plugin.advance(state, slot, seq[None, :5], [5], [0])
            plugin.advance(state, slot, seq[None, 5:], [7], [5])
            full = plugin.head(plugin(seq[None]))[0, -1]
            torch.testing.assert_close(plugin.logits(state, slot)[0], full, atol=1e-4, rtol=1e-4)


def test_reset_forgets_previous_sequence():
    plugin = tiny_plugin(V, "gru")
    state = plugin.new_state(1)
    slot = torch.tensor([0])
    with torch.no_grad():
        plugin.advance(state, slot, torch.tensor([[1, 2, 3]]), None, [0])
        plugin.reset(state, slot)
        plugin.advance(state, slot, torch.tensor([[4]]), None, [0])
        torch.testing.assert_close(plugin.logits(state, slot)[0], plugin.head(plugin(torch.tensor([[4]])))[0, -1])


def test_flops_per_token_counts_head():
    plugin = tiny_plugin(V, "gru", d_model=32)
    assert plugin.flops_per_token() == 2 * (6 * 32 * 32 + 32 * V)


@pytest.mark.parametrize("arch", ["gru", "transformer"])
def test_bank_resets_a_recycled_slot_even_for_a_one_token_prompt(arch):
    """A slot that held another sequence must not leak its state into a 1-token prompt."""
    import numpy as np

    from vllm_plugin.bank import PluginBank

    plugin = tiny_plugin(V, arch, max_len=64)
    bank = PluginBank({"p": plugin}, 2, "cpu")
    for seq in ([5, 6, 7, 8], [9]):  # the same slot, reassigned
        bank.assign(1, "p", 1.0)
        logits = torch.zeros(1, V)
        ids = torch.tensor([seq])
        bank.apply(logits, np.array([0]), np.array([1]), np.array([len(seq)]),
                   lambda sel, _rows, ids=ids: ids[0, -1:].expand(len(sel)),
                   lambda sel, start, length, ids=ids: ids[:, int(start[0]):int(start[0] + length[0])])
        with torch.no_grad():
            want = torch.log_softmax(plugin.head(plugin(ids))[0, -1], -1)
        # Without a penalty the added scores are the log-probs up to a per-row constant.
        torch.testing.assert_close(torch.log_softmax(logits[0], -1), want, atol=1e-5, rtol=1e-5)


def test_copy_start_finds_the_last_marker_alike_in_lists_and_batches():
    """The reference's and training's ``copy_start`` (one prompt) and the processor's
    ``copy_starts`` (a padded batch) agree: the last occurrence of the marker, 0 without one
    (-1 from ``copy_starts``, which the processor reads as 0 and warns about), never a match that
    runs into the padding."""
    from vllm_plugin.model import copy_start, copy_starts

    marker = [7, 8]
    prompts = [[1, 7, 8, 2, 7, 8, 3], [7, 8, 5], [1, 2, 3], [4, 7], [9, 7, 8]]
    assert [copy_start(p, marker) for p in prompts] == [4, 0, 0, 0, 1]
    assert copy_start([1, 2], []) == 0
    width = 9
    tokens = torch.tensor([p + [8] * (width - len(p)) for p in prompts])  # padding that could complete [7, 8]
    lengths = torch.tensor([len(p) for p in prompts])
    got = copy_starts(tokens, lengths, torch.tensor(marker))
    assert got.clamp(min=0).tolist() == [copy_start(p, marker) for p in prompts]
    assert got.tolist() == [4, 0, -1, -1, 1]
    assert copy_starts(tokens[:, :1], lengths.clamp(max=1), torch.tensor(marker)).tolist() == [-1] * len(prompts)
    assert copy_starts(tokens, lengths, torch.tensor([], dtype=torch.long)).tolist() == [0] * len(prompts)


def test_bank_warns_once_when_a_prompt_lacks_the_copy_marker():
    """A plugin with a copy marker served a prompt without it reads the whole prompt, and the
    server log says so once; a prompt holding it (at its start too) raises nothing."""
    import numpy as np

    from vllm_plugin.bank import PluginBank

    plugin = tiny_plugin(V, "gru", copy=True, copy_after=[7, 8])
    for seq, warned in (([7, 8, 5, 6], False), ([1, 7, 8, 3], False), ([5, 6, 9, 3], True)):
        bank = PluginBank({"p": plugin}, 1, "cpu")
        bank.assign(0, "p", 1.0, prompt_len=len(seq))
        ids = torch.tensor([seq])
        bank.apply(torch.zeros(1, V), np.array([0]), np.array([0]), np.array([len(seq)]),
                   lambda sel, _rows, ids=ids: ids[0, -1:].expand(len(sel)),
                   lambda sel, start, length, ids=ids: ids[:, int(start[0]):int(start[0] + length[0])])
        assert ("marker" in bank._warned) == warned, seq
        want = torch.zeros(V, dtype=torch.bool)
        want[seq[0 if warned else (0 if seq[0] == 7 else 1):]] = True
        assert torch.equal(bank.copy_mask[0], want)
