"""Checkpoints round-trip and every unusable one is refused by name."""
import json

import pytest
import torch

from vllm_plugin.checkpoint import CheckpointError, load_plugin, read_config, save_plugin
from vllm_plugin.testing import tiny_plugin

V = 101


@pytest.fixture
def saved(tmp_path):
    plugin = tiny_plugin(V, "gru", fingerprint="sha256:abc", training={"dataset": "e2e"})
    return plugin, save_plugin(plugin, tmp_path / "ckpt")


@pytest.mark.parametrize("arch", ["gru", "transformer"])
def test_round_trip(tmp_path, arch):
    plugin = tiny_plugin(V, arch, prompt_template="{input}")
    folder = save_plugin(plugin, tmp_path / arch)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_plugin(folder, vocab_size=V)
    assert loaded.config == plugin.config
    for (k, a), (_, b) in zip(plugin.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    save_plugin(loaded, folder)  # overwriting in place works and leaves no temporaries
    assert sorted(p.name for p in tmp_path.iterdir()) == [arch]


@pytest.mark.parametrize("index_of", ["out_of_range", "row_twice"])
def test_shortlist_round_trips_and_a_broken_one_is_refused(tmp_path, index_of):
    """A shortlisted plugin keeps its shortlist through a checkpoint; an ``index_of`` that is not
    a shortlist (a row past the rest row would fail inside the engine's decode step, a row used
    twice would serve two tokens one logit silently) is refused, naming the tensor."""
    from safetensors.torch import load_file, save_file

    plugin = tiny_plugin(V, "gru", shortlist_size=20)
    folder = save_plugin(plugin, tmp_path / "s")
    loaded = load_plugin(folder, vocab_size=V)
    assert torch.equal(loaded.shortlist(), plugin.shortlist()) and len(plugin.shortlist()) == 20
    tensors = load_file(str(folder / "model.safetensors"))
    first, second = plugin.shortlist()[:2]
    if index_of == "out_of_range":
        tensors["index_of"][0] = 21
    else:
        tensors["index_of"][second] = tensors["index_of"][first]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "vllm_plugin/1"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'index_of' is not a shortlist of 20 tokens.*retrain"):
        load_plugin(folder, vocab_size=V)
    with pytest.raises(ValueError, match="shortlist_size=101 must be 0"):
        tiny_plugin(V, "gru", shortlist_size=V)


def test_wrong_vocab(saved):
    with pytest.raises(CheckpointError, match="vocabulary of 101 tokens.*has 50"):
        load_plugin(saved[1], vocab_size=50)


def test_wrong_tokenizer(saved):
    with pytest.raises(CheckpointError, match="tokenizer sha256:abc.*sha256:other"):
        load_plugin(saved[1], vocab_size=V, tokenizer_fingerprint="sha256:other")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_plugin(tmp_path / "nope")


def test_missing_weights(saved):
    (saved[1] / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_plugin(saved[1])


def test_missing_config(saved):
    (saved[1] / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_plugin(saved[1])


def test_corrupt_weights(saved):
    path = saved[1] / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_plugin(saved[1])


def test_pickle_is_never_loaded(saved):
    torch.save(saved[0].state_dict(), saved[1] / "model.safetensors")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        load_plugin(saved[1])


def test_corrupt_config(saved):
    (saved[1] / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_plugin(saved[1])


def test_unknown_architecture(saved):
    cfg = json.loads((saved[1] / "config.json").read_text())
    cfg["architecture"] = "lstm"
    (saved[1] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown plugin architecture 'lstm'"):
        read_config(saved[1])


def test_weights_not_matching_config(saved):
    cfg = json.loads((saved[1] / "config.json").read_text())
    cfg["d_model"] = 64
    (saved[1] / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        load_plugin(saved[1])


def test_not_a_plugin_config(saved):
    (saved[1] / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a vllm_plugin checkpoint"):
        load_plugin(saved[1])


def _corrupt(tensors: dict, how: str) -> str:
    """Make one tensor non-finite in place, as the issue measured; returns its name."""
    if how == "nan_bias":
        tensors["out_bias"][:] = float("nan")
        return "out_bias"
    if how == "inf_bias_entry":
        tensors["out_bias"][7] = float("inf")
        return "out_bias"
    tensors["embed.weight"][11] = float("nan")  # one token's embedding row
    return "embed.weight"


EXPECTED_COUNT = {"nan_bias": V, "inf_bias_entry": 1, "nan_embedding_row": 32}  # d_model 32


@pytest.mark.parametrize("how", list(EXPECTED_COUNT))
def test_non_finite_weights_are_refused_by_name(saved, how):
    """A NaN/inf anywhere would be served (token 0 every step, a forced token, or prompts with
    one token broken); load refuses it, naming the file, the tensor and how many values."""
    from safetensors.torch import load_file, save_file

    path = saved[1] / "model.safetensors"
    tensors = load_file(str(path))
    name = _corrupt(tensors, how)
    save_file(tensors, str(path), metadata={"format": "vllm_plugin/1"})
    count = EXPECTED_COUNT[how]
    with pytest.raises(CheckpointError, match=rf"model\.safetensors holds non-finite values .*'{name}' "
                                              rf"\({count} of \d+ values\).*[Rr]etrain.*restore"):
        load_plugin(saved[1], vocab_size=V)


@pytest.mark.parametrize("how", list(EXPECTED_COUNT))
def test_save_refuses_non_finite_weights_and_keeps_the_old_checkpoint(saved, tmp_path, how):
    plugin, folder = saved
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with torch.no_grad():
        name = _corrupt(dict(plugin.named_parameters()), how)
    with pytest.raises(CheckpointError, match=rf"refusing to save .*'{name}' \({EXPECTED_COUNT[how]} of"):
        save_plugin(plugin, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # untouched
    with pytest.raises(CheckpointError, match="refusing to save"):
        save_plugin(plugin, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries left


def test_plugin_prompt_is_the_prompt_the_plugin_was_trained_on(tmp_path, capsys):
    """`plugin_prompt` / `vllm-plugin prompt`: the checkpoint's template (its in-context example
    first) around one input, formatted as the training data was; bad input named."""
    from vllm_plugin.checkpoint import plugin_prompt
    from vllm_plugin.cli import main
    from vllm_plugin.training.data import PROMPT_TEMPLATES, Example, format_prompt, with_shots

    shot = Example(group="g", prompt=format_prompt("e2e", "name[The Eagle], area[riverside]"),
                   target="The Eagle is by the river.")
    template = with_shots(PROMPT_TEMPLATES["e2e"], [shot])
    folder = save_plugin(tiny_plugin(V, "gru", prompt_template=template, training={"dataset": "e2e"}),
                         tmp_path / "e2e")
    got = plugin_prompt(folder, "name[Aromi], food[Chinese]")
    assert got == with_shots(format_prompt("e2e", "name[Aromi], food[Chinese]"), [shot])
    assert got.startswith(shot.prompt + shot.target + "\n\n") and got.endswith("food -- Chinese\n\nSentence:\n")
    assert main(["prompt", "--plugin", str(folder), "name[Aromi]", "name[Zizzi]"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x) for x in lines] == [plugin_prompt(folder, "name[Aromi]"), plugin_prompt(folder, "name[Zizzi]")]
    # A plugin of no known dataset: its template around the input as given.
    own = save_plugin(tiny_plugin(V, "gru", prompt_template="Q: {input}\nA:"), tmp_path / "own")
    assert plugin_prompt(own, "2+2?") == "Q: 2+2?\nA:"
    with pytest.raises(ValueError, match=r"not a meaning representation.*give an MR such as 'name\[Aromi\]"):
        plugin_prompt(folder, "just text")
    nearest = save_plugin(tiny_plugin(V, "gru", prompt_template=PROMPT_TEMPLATES["e2e"],
                                      training={"dataset": "e2e", "nearest_shot": True}), tmp_path / "nearest")
    with pytest.raises(ValueError, match="--nearest-shot.*put that example before this prompt"):
        plugin_prompt(nearest, "name[Aromi]")
    assert main(["prompt", "--plugin", str(tmp_path / "nope"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
