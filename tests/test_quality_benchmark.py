"""The quality benchmark end to end on the tiny base: train, generate through vLLM, score, write."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks.quality import setting_label

from .test_data import write_e2e
from .test_training import synthetic_rows


def test_quality_benchmark_chooses_decoding_on_select_and_writes_the_results_format(tiny, tmp_path):
    data = tmp_path / "data"
    (data / "e2e").mkdir(parents=True)
    rows = synthetic_rows(29)  # devel: 24 MRs, two of each of 12 venues; test: 5 MRs
    write_e2e(data / "e2e" / "devel.csv", rows[:48])
    # Two of the five test MRs name a venue that devel never names (as 596 of E2E's test MRs do).
    test_rows = [(mr.replace(mr[5:mr.index("]")], "Aromi"), ref.replace(mr[5:mr.index("]")], "Aromi"))
                 if i < 4 else (mr, ref) for i, (mr, ref) in enumerate(rows[48:])]
    env = {**os.environ, "VLLM_PLUGIN_DATA": str(data)}

    def quality_main(args):  # its own process: a second in-process engine would break the shared one
        proc = subprocess.run([sys.executable, "-m", "benchmarks.quality", *args], env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # plugin_recurrent_w0.3 is not a listed system: any strength can be asked for by name.
    # lora: a second engine, on the merged fine-tune. plugin_recurrent_gate: the recurrent plugin's
    # training, then a gate fitted on select.
    systems = ("zero_shot,zero_shot_chat,icl_1,plugin_alone,weighted_mix,plugin_recurrent,plugin_recurrent_w0.3,"
               "plugin_recurrent_gate,lora")
    # beam2: beam search joins the grid for every system, LoRA and plugins alike.
    grid = [{"repetition_penalty": 1.0, "frequency_penalty": 0.0}, {"repetition_penalty": 1.1, "frequency_penalty": 0.5},
            {"beam_width": 2}]
    # A dotted base name (like qwen2.5-coder-0.5b) must not lose its tail to a file suffix.
    args = ["--dataset", "e2e", "--base", str(tiny.base_dir), "--base-name", "tiny-0.5b", "--systems", systems,
            "--epochs", "1", "--lora-epochs", "6", "--max-tokens", "8", "--eager", "--chunk", "3",
            "--decoding-grid", "1.0:0,1.1:0.5,beam2",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    # Choosing needs no test set at all: it runs, and chooses, before test.csv exists.
    quality_main(args + ["--select-only"])
    run_dir = tmp_path / "runs" / "e2e-tiny-0.5b"
    (choice_file,) = run_dir.rglob("decoding_choice.json")
    choice = json.loads(choice_file.read_text())
    assert not (run_dir / "generations" / "test-all").exists()
    assert [p.name for p in (tmp_path / "res").glob("*.json")] == ["e2e_tiny-0.5b_select.json"]
    report = json.loads((tmp_path / "res" / "e2e_tiny-0.5b_select.json").read_text())
    assert report["decoding"]["chosen"] == json.loads(next(run_dir.rglob("decoding_choice.json")).read_text())["chosen"]
    assert "**" in (tmp_path / "res" / "e2e_tiny-0.5b_select.md").read_text()
    assert choice["grid"] == grid and set(choice["chosen"]) == set(systems.split(","))
    for system, setting in choice["chosen"].items():
        scores = choice["select_scores"][system]
        best = max(scores, key=lambda label: (scores[label]["bleu"], scores[label]["rouge_l"]))
        assert scores[best] == scores[setting_label(setting)] and "beam2" in scores
        assert set(scores[best]) - {"venue_seen", "venue_unseen"} == {"bleu", "rouge_l"}  # what the choice reads
        # Select inputs are sliced by whether the fit split saw their venue (split by venue).
        assert scores[best]["venue_unseen"]["n_inputs"] >= 1 and scores[best]["venue_seen"]["n_inputs"] >= 1
    beams = sorted(run_dir.rglob("*@beam2.jsonl"))
    assert len(beams) == len(systems.split(","))
    for path in beams:  # the best beam, cut at a newline like greedy's stop
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and all("\n" not in r["output"] and r["token_ids"] for r in rows), path

    write_e2e(data / "e2e" / "test.csv", test_rows)
    quality_main(args)
    result = json.loads((tmp_path / "res" / "e2e_tiny-0.5b.json").read_text())
    assert result["dataset"] == "e2e" and result["base_model"] == "tiny-0.5b" and result["n_test_inputs"] == 5
    assert result["decoding"]["chosen"] == choice["chosen"] and result["decoding"]["grid"] == grid
    sizes = result["split_sizes"]
    assert sizes["fit_inputs"] + sizes["select_inputs"] == 24 and 1 <= sizes["select_inputs_venue_unseen"] < 10
    assert list(result["systems"]) == systems.split(",")
    for scores in result["systems"].values():
        assert {"bleu", "rouge_l", "meteor", "cider", "nist"} <= set(scores)
        assert 0 <= scores["bleu"] <= 100
        assert scores["venue_seen"]["n_inputs"] == 3 and scores["venue_unseen"]["n_inputs"] == 2
    assert 0.0 <= result["mixture_weight"] <= 1.0
    gains = result["targets"]["bleu_gain_over_zero_shot"]
    assert set(gains) == {"plugin_recurrent", "plugin_recurrent_w0.3", "plugin_recurrent_gate"}
    assert set(result["training"]) == {"recurrent", "small", "gated", "lora"}
    assert result["training"]["recurrent"]["epochs_run"] == 1 and result["training"]["recurrent"]["training_seconds"] > 0
    gated, recurrent = result["training"]["gated"], result["training"]["recurrent"]  # one training, not two
    assert (gated["epochs_run"], gated["best_select_loss"]) == (1, recurrent["best_select_loss"])
    assert "select_loss_gated" in gated
    assert gains["plugin_recurrent"] == result["systems"]["plugin_recurrent"]["bleu"] - result["systems"]["zero_shot"]["bleu"]
    # The headline plugin row is named from select scores only (no top-20 row in this run).
    at_choice = {n: choice["select_scores"][n][setting_label(c)] for n, c in choice["chosen"].items()}
    assert result["chosen"] == max(gains, key=lambda n: (at_choice[n]["bleu"], at_choice[n]["rouge_l"]))
    assert result["chosen_top20"] is None
    md = (tmp_path / "res" / "e2e_tiny-0.5b.md").read_text()
    assert md.startswith("**e2e**") and "does not occur in devel (2)" in md
    assert (tmp_path / "res" / "e2e_tiny-0.5b.png").stat().st_size > 1000
    # Cached: a re-run trains and generates nothing new.
    generations = sorted((tmp_path / "runs").rglob("*.jsonl"))
    mtimes = [g.stat().st_mtime for g in generations]
    quality_main(args)
    assert [g.stat().st_mtime for g in generations] == mtimes
    quality_main(args + ["--score-partial"])  # scoring what exists, as for a run in progress
    partial = json.loads((tmp_path / "res" / "e2e_tiny-0.5b_partial.json").read_text())
    assert partial["partial"] and partial["n_test_inputs"] == 5 and set(partial["systems"]) == set(systems.split(","))
    assert partial["systems"]["zero_shot"]["bleu"] == result["systems"]["zero_shot"]["bleu"]
    # A run cut short after 3 inputs: they are scored, and they are the first 3 of the test
    # stage's seeded random order, not of the file.
    test_dir = run_dir / "generations" / "test-all" / "max8-float32"
    for f in list(test_dir.glob("*.jsonl")):
        f.rename(f.with_suffix(".done"))
        (test_dir / f"{f.stem}.partial.jsonl").write_text("".join(f.with_suffix(".done").read_text().splitlines(True)[:3]))
    quality_main(args + ["--score-partial"])
    partial = json.loads((tmp_path / "res" / "e2e_tiny-0.5b_partial.json").read_text())
    assert partial["n_test_inputs"] == 3 and partial["of_test_inputs"] == 5 and "random" in partial["note"]
    # Resuming: each job goes on from its own last full line. zero_shot as if added to the run
    # later (nothing written), plugin_recurrent killed mid-line; the others keep their 3 rows.
    for f in test_dir.glob("zero_shot@*.partial.jsonl"):
        f.write_text("")
    for f in test_dir.glob("plugin_recurrent@*.partial.jsonl"):
        f.write_text(f.read_text() + '{"prompt": "cut sh')
    quality_main(args)
    for f in test_dir.glob("*.done"):
        assert f.with_suffix(".jsonl").read_text() == f.read_text(), f.name
        f.unlink()
    assert not list(test_dir.glob("*.partial.jsonl"))

    # What the chunked, prefix-cached, all-systems-at-once generation produced at each system's
    # chosen setting is what the reference decoder produces with the same penalties, token for
    # token (up to the newline stop).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_plugin.checkpoint import load_plugin
    from vllm_plugin.decode import reference_generate

    tok = AutoTokenizer.from_pretrained(tiny.base_dir)

    def check(system, model, chat=False, **kw):
        setting = result["decoding"]["chosen"][system]
        label = f"rp{setting['repetition_penalty']:g}-fp{setting['frequency_penalty']:g}"
        rows = [json.loads(line) for line in (test_dir / f"{system}@{label}.jsonl").read_text().splitlines()]
        assert len(rows) == 5
        for row in rows:
            text = row["prompt"] if not chat else tok.apply_chat_template(
                [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True)
            (want,) = reference_generate(model, [tok(text).input_ids], max_new_tokens=8, **setting, **kw)
            got = row["token_ids"]
            assert got == want[:len(got)] and (len(got) == 8 or "\n" in tok.decode(got[-1:])), (system, row)
        return rows

    plugin = load_plugin(run_dir / "recurrent" / "checkpoint")
    for system, weight in (("plugin_recurrent", 1.0), ("plugin_recurrent_w0.3", 0.3)):
        check(system, tiny.base, plugin=plugin, weight=weight)
    gated_plugin = load_plugin(run_dir / "gated" / "checkpoint")
    assert gated_plugin.gate is not None
    check("plugin_recurrent_gate", tiny.base, plugin=gated_plugin)
    zero_rows = check("zero_shot", tiny.base)
    # The chat row sends the same prompt as one user turn of the base's chat template.
    chat_rows = check("zero_shot_chat", tiny.base, chat=True)
    assert [r["token_ids"] for r in chat_rows] != [r["token_ids"] for r in zero_rows]
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "lora" / "merged").eval()
    lora_rows = check("lora", merged)
    assert [r["token_ids"] for r in lora_rows] != [r["token_ids"] for r in zero_rows]  # the fine-tune is served


def test_e2e_venue_split_mirrors_test():
    """Select holds about a third of its inputs from venues the fit split never sees; the rest,
    and every fit venue, as in the paper's split; no input on both sides; seeded."""
    from vllm_plugin.training.data import Example, split_examples

    examples = [Example(group=f"name[V{v}], food[F{i}]", prompt=f"p{v}-{i}", target=f"t{r}", meta=(("venue", f"V{v}"),))
                for v in range(12) for i in range(3 + v) for r in range(2)]
    fit, select = split_examples(examples, "venue")
    assert split_examples(examples, "venue") == (fit, select)
    fit_groups, select_groups = {e.group for e in fit}, {e.group for e in select}
    assert not fit_groups & select_groups and len(fit_groups) + len(select_groups) == len({e.group for e in examples})
    assert len(fit_groups) == round(0.6 * len({e.group for e in examples}))
    fit_venues = {dict(e.meta)["venue"] for e in fit}
    unseen = {e.group for e in select if dict(e.meta)["venue"] not in fit_venues}
    assert 0.2 <= len(unseen) / len(select_groups) <= 0.5
    assert split_examples(examples, "venue", seed=1) != (fit, select)
    with pytest.raises(ValueError, match="split 'venue' needs examples with a venue"):
        split_examples([Example("a", "p", "t"), Example("b", "q", "u")], "venue")


def test_e2e_origin_split_keeps_each_original_mr_on_one_side():
    """``origin``: the venue split, but cleaned MRs sharing an original MR, directly or through a
    chain (a cleaned MR can come from two originals), land on one side; same sizes within a
    family's size; seeded; the venue split itself is unchanged by the units (singletons)."""
    from benchmarks.protocols import Protocol, split_sizes
    from vllm_plugin.training.data import Example, split_examples

    # Venue v has 3 + v MRs; MR i of a venue shares its original with MR i + 1 when i is even,
    # and MR 1 also comes from a second original that MR 4 shares: families of up to five.
    examples = [Example(group=f"name[V{v}], food[F{i}]", prompt=f"p{v}-{i}", target=f"t{r}",
                        meta=(("venue", f"V{v}"), ("origin", f"O{v}-{i // 2 * 2}" if r == 0 or i not in (1, 4)
                                                   else f"O{v}-x")))
                for v in range(12) for i in range(3 + v) for r in range(2)]
    fit, select = split_examples(examples, "origin")
    assert split_examples(examples, "origin") == (fit, select)
    origins = lambda side: {dict(e.meta)["origin"] for e in side}
    assert not origins(fit) & origins(select)
    fit_groups, select_groups = {e.group for e in fit}, {e.group for e in select}
    n = len({e.group for e in examples})
    assert not fit_groups & select_groups and len(fit_groups) + len(select_groups) == n
    assert abs(len(select_groups) - (n - round(0.6 * n))) <= 5
    fit_venues = {dict(e.meta)["venue"] for e in fit}
    assert {dict(e.meta)["venue"] for e in select} - fit_venues  # whole venues still held out
    sharing = "select_inputs_sharing_an_origin_with_fit"
    assert split_sizes(Protocol("e2e_by_origin", "e2e", "origin", examples, fit, select, ""))[sharing] == 0
    by_venue = split_examples(examples, "venue")
    assert split_sizes(Protocol("e2e", "e2e", "venue", examples, *by_venue, ""))[sharing] > 0
    plain = [Example(e.group, e.prompt, e.target, e.meta[:1]) for e in examples]
    plain_split = split_examples(plain, "venue")
    assert [e.group for e in plain_split[1]] == [e.group for e in by_venue[1]]
    assert sharing not in split_sizes(Protocol("e2e", "e2e", "venue", plain, *plain_split, ""))
    with pytest.raises(ValueError, match="'origin' kept together needs examples with their origin .*orig_mr"):
        split_examples(plain, "origin")


def test_webnlg_category_split_holds_out_whole_categories():
    """Select is filled with whole categories the fit split never sees, never past its 40%; the
    rest of select is drawn by entry from the fit categories; seeded; sliced by category."""
    from benchmarks.protocols import Protocol, select_slices, split_sizes
    from vllm_plugin.training.data import Example, split_examples

    sizes = {"A": 30, "B": 25, "C": 20, "D": 12, "E": 8, "F": 5}
    examples = [Example(group=f"{c}/{i}", prompt=f"{c}-{i}", target="t", meta=(("category", c),))
                for c, n in sizes.items() for i in range(n)]
    fit, select = split_examples(examples, "category")
    assert split_examples(examples, "category") == (fit, select)
    n_select = len({e.group for e in select})
    assert n_select == len(examples) - round(0.6 * len(examples))
    fit_categories = {dict(e.meta)["category"] for e in fit}
    whole = {dict(e.meta)["category"] for e in select} - fit_categories
    assert whole and sum(sizes[c] for c in whole) <= n_select  # whole categories only, never past select's size
    assert all(sum(dict(e.meta)["category"] == c for e in select) == sizes[c] for c in whole)
    protocol = Protocol("webnlg", "webnlg", "category", examples, fit, select, "")
    slices = select_slices(protocol)
    assert len(slices["category_unseen"]) == sum(sizes[c] for c in whole) == split_sizes(protocol)[
        "select_inputs_category_unseen"]
    assert len(slices["category_seen"]) == n_select - len(slices["category_unseen"])
    with pytest.raises(ValueError, match="split 'category' needs examples with a category"):
        split_examples([Example("a", "p", "t", (("venue", "V"),)), Example("b", "q", "u")], "category")


def test_e2e_examples_carry_their_venue(tmp_path):
    from vllm_plugin.training.data import load_e2e

    path = write_e2e(tmp_path / "d.csv", [("name[Blue Spice], area[city centre]", "x."), ("area[riverside]", "y.")])
    assert [dict(e.meta)["venue"] for e in load_e2e(path)] == ["Blue Spice", ""]
    assert [dict(e.meta)["origin"] for e in load_e2e(path)] == ["name[Blue Spice], area[city centre]", "area[riverside]"]


def test_systems_are_named_or_added_to_the_default_list():
    import pytest

    from benchmarks.quality import ALL_SYSTEMS, parse_systems, plugin_of

    assert parse_systems("zero_shot, plugin_recurrent_w0.3") == ["zero_shot", "plugin_recurrent_w0.3"]
    assert parse_systems("+plugin_recurrent_w0.25,icl_1") == ALL_SYSTEMS + ["plugin_recurrent_w0.25"]
    assert plugin_of("plugin_recurrent_w0.25") == "recurrent" and plugin_of("icl_1") is None
    with pytest.raises(SystemExit, match="plugin_recurrent_wx"):
        parse_systems("zero_shot,plugin_recurrent_wx")
    # make paper's lists (not run by CI: a misspelt system would first fail hours into the target)
    import re
    from pathlib import Path

    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    lists = dict(re.findall(r"^(\w+_SYSTEMS) = (\S+)$", makefile, re.M))
    assert {"WEBNLG_SYSTEMS", "SHORTLIST_SYSTEMS", "NEAREST_SYSTEMS", "BY_MR_SYSTEMS", "QWEN_SYSTEMS",
            "WEBNLG_TARGET_SYSTEMS", "WIDE_SYSTEMS"} <= set(lists)
    for name, systems in lists.items():
        assert parse_systems(systems) == systems.split(","), name


def test_a_plugin_trained_behind_examples_decodes_behind_them():
    """A ``*_icl<k>`` plugin row sends the engine icl_k's prompt, the one it was trained against
    (``RunSpec.shots``); a ``*_nearest`` row the prompt after the fit example most like it;
    other plugin rows send the plain prompt."""
    import pytest

    from benchmarks.quality import NEEDS, SAME_TRAINING, Shots, system_input
    from vllm_plugin.training.data import Example, NearestShot, with_shots

    drawn = [Example(f"g{i}", f"prompt {i}: ", f"target {i}") for i in range(3)]
    fit = [Example("a", "Attributes:\nname -- A\narea -- riverside\n", "A is by the river."),
           Example("b", "Attributes:\nname -- B\nfood -- Thai\neatType -- pub\n", "B is a Thai pub."),
           Example("b", "Attributes:\nname -- B\nfood -- Thai\neatType -- pub\n", "B serves Thai food.")]
    shots = Shots(drawn, NearestShot(fit))
    task = "Attributes:\nname -- C\nfood -- Thai\neatType -- restaurant\n"
    assert system_input("icl_1_nearest", task, shots, None) == system_input(
        "plugin_shortlist_copy_task_gate_icl1_nearest", task, shots, None) == with_shots(task, fit[1:2])
    assert shots.nearest(fit[1]) == fit[0]  # never the input itself
    assert NEEDS["plugin_shortlist_copy_task_gate_icl1_nearest"] in SAME_TRAINING
    assert system_input("plugin_shortlist_copy_gate_icl1", "P", shots, None) == system_input("icl_1", "P", shots, None) \
        == with_shots("P", drawn[:1]) == "prompt 0: target 0\n\nP"
    assert system_input("icl_3", "P", shots, None) == with_shots("P", drawn)
    assert system_input("plugin_shortlist_copy_gate", "P", shots, None) == system_input("zero_shot", "P", shots, None) == "P"
    with pytest.raises(ValueError, match="plugin_x_icl5: 5 in-context examples, but only 3 are drawn"):
        system_input("plugin_x_icl5", "P", shots, None)
    # The gated row starts from its ungated twin's training, prompted the same way.
    assert SAME_TRAINING[NEEDS["plugin_shortlist_copy_gate_icl1"]] == NEEDS["plugin_shortlist_copy_icl1"]
    assert SAME_TRAINING[NEEDS["plugin_shortlist_copy_task_top20_gate_icl1"]] == NEEDS["plugin_shortlist_copy_task_top20_icl1"]
    # Each top-20 row is scored against a full-logit twin sent the same prompt.
    from benchmarks.quality import TOP20_TWIN
    for top, full in TOP20_TWIN.items():
        assert top in NEEDS and full in NEEDS
        assert system_input(top, "P", shots, None) == system_input(full, "P", shots, None)


def test_decoding_grid_takes_penalty_pairs_and_beam_widths():
    from benchmarks.quality import parse_grid

    assert parse_grid("1.0:0, 1.1:0.5,beam4") == [{"repetition_penalty": 1.0, "frequency_penalty": 0.0},
                                                 {"repetition_penalty": 1.1, "frequency_penalty": 0.5},
                                                 {"beam_width": 4}]
    for bad in ("beam0", "beamx", "beam", "1.1", "1.1:x:2", ","):
        with pytest.raises(SystemExit, match="decoding-grid"):
            parse_grid(bad)


def test_targets_are_computed_from_the_scores():
    from benchmarks.quality import against_targets

    row = lambda bleu, rouge: {"bleu": bleu, "rouge_l": rouge}  # noqa: E731
    t = against_targets({"zero_shot": row(10, 0.3), "icl_3": row(12, 0.25), "weighted_mix": row(11, 0.33),
                         "plugin_recurrent": row(18, 0.4), "plugin_recurrent_top20": row(16, 0.35)})
    assert t["bleu_gain_over_zero_shot"] == {"plugin_recurrent": 8, "plugin_recurrent_top20": 6}
    assert t["best_baseline_bleu"] == {"system": "icl_3", "score": 12}
    assert t["best_baseline_rouge_l"] == {"system": "weighted_mix", "score": 0.33}
    assert t["top20_share_of_full_logit_bleu_gain"] == pytest.approx(0.75)
    assert t["top20_share_by_row"] == {"plugin_recurrent_top20": pytest.approx(0.75)}
    # Each top-20 row is read against its own full-logit twin.
    twins = against_targets({"zero_shot": row(10, 0.3), "plugin_shortlist_copy_gate": row(20, 0.4),
                             "plugin_shortlist_copy_top20_gate": row(19, 0.4), "plugin_recurrent_top20": row(12, 0.3)})
    assert twins["top20_share_by_row"] == {"plugin_shortlist_copy_top20_gate": pytest.approx(0.9)}
    assert against_targets({"icl_1": row(1, 0.1)}) == {}
    # When the full-logit plugin loses to zero-shot there is no gain to keep a share of.
    lost = against_targets({"zero_shot": row(10, 0.3), "plugin_recurrent": row(6, 0.2),
                            "plugin_recurrent_top20": row(2, 0.1)})
    assert "top20_share_of_full_logit_bleu_gain" not in lost
    assert "share_of_lora_bleu_gain" not in lost
    with_lora = against_targets({"zero_shot": row(10, 0.3), "plugin_recurrent": row(18, 0.4), "lora": row(20, 0.5)})
    assert with_lora["share_of_lora_bleu_gain"] == {"plugin_recurrent": pytest.approx(0.8)}


def test_top20_share_interval_is_a_seeded_paired_bootstrap_of_corpus_bleu():
    """The interval of a top-20 row's share of its twin's gain resamples the test inputs, the same
    draw for the three systems: its BLEU is sacrebleu's corpus BLEU of each resample, so it holds
    the share on the inputs as drawn; it is the same for the same seed, and a share that no
    resample can move (the part system is the full one) has a zero-width interval."""
    import random

    import sacrebleu

    from benchmarks.metrics import _reference_streams, bleu_gain_share_interval

    rng = random.Random(0)
    words = "the pub near the river serves cheap english food with a high rating in the city centre".split()
    references = [[" ".join(rng.sample(words, 8)) for _ in range(rng.randint(1, 3))] for _ in range(40)]
    full = [rs[0] for rs in references]
    zero = [" ".join(rng.sample(words, 6)) for _ in references]
    part = [f if i % 2 else z for i, (f, z) in enumerate(zip(full, zero))]
    hyps = {"part": part, "full": full, "zero": zero}
    bleu = {n: sacrebleu.corpus_bleu(h, _reference_streams(references)).score for n, h in hyps.items()}
    share = (bleu["part"] - bleu["zero"]) / (bleu["full"] - bleu["zero"])
    interval = bleu_gain_share_interval(hyps, references, "part", "full", "zero", resamples=200)
    assert interval["low"] < share < interval["high"] and interval["undefined"] == 0
    assert interval == bleu_gain_share_interval(hyps, references, "part", "full", "zero", resamples=200)
    same = bleu_gain_share_interval(hyps, references, "full", "full", "zero", resamples=50)
    assert same["low"] == pytest.approx(1.0) and same["high"] == pytest.approx(1.0)


def test_scores_are_kept_per_generation_file_until_it_changes(tmp_path, monkeypatch):
    """A generation file is scored once: the cache answers while outputs, references and slices
    are unchanged, and any change of them scores again."""
    import benchmarks.metrics
    from benchmarks.quality import score_sliced, scores_file

    for name in ("x@rp1-fp0.5.jsonl", "x@rp1-fp0.5.partial.jsonl"):  # dotted settings keep their tail
        assert scores_file(tmp_path / name) == tmp_path / "x@rp1-fp0.5.scores.json"

    calls = []
    real = benchmarks.metrics.score
    monkeypatch.setattr(benchmarks.metrics, "score", lambda *a, **k: calls.append(1) or real(*a, **k))
    outputs, prompts = ["a cheap pub", "a pub near the river"], ["p1", "p2"]
    references = [["a cheap pub"], ["the pub is near the river"]]
    cache = tmp_path / "x@rp1-fp0.5.scores.json"
    first = score_sliced(outputs, prompts, references, {"seen": {"p1"}}, cache=cache)
    assert len(calls) == 2 and cache.is_file()  # all inputs, then the slice
    assert score_sliced(outputs, prompts, references, {"seen": {"p1"}}, cache=cache) == first
    assert len(calls) == 2
    changed = score_sliced(["a pub", "a pub near the river"], prompts, references, {"seen": {"p1"}}, cache=cache)
    assert len(calls) == 4 and changed["bleu"] != first["bleu"]
    score_sliced(outputs, prompts, references, {"seen": {"p2"}}, cache=cache)
    assert len(calls) == 6


def test_every_lever_is_a_valid_run_and_prompt():
    """A typo in a lever's training (a RunSpec or TrainConfig field) or prompt fails here, not an
    hour into a run."""
    from benchmarks.levers import LEVERS, REFERENCES
    from vllm_plugin.training.pipeline import RunSpec
    from vllm_plugin.training.train import TrainConfig

    for name, lever in LEVERS.items():
        fields = {k: v for k, v in lever.training.items() if k != "train"}
        spec = RunSpec(train=TrainConfig(**lever.training.get("train", {})), **fields)
        assert lever.prompt in REFERENCES, name
        if spec.shots:  # a plugin trained behind k examples decodes behind the same k, chosen alike
            assert lever.prompt == f"icl_{spec.shots}" + ("_nearest" if spec.nearest_shot else ""), name


def test_levers_are_measured_on_select_only(tiny, tmp_path):
    """The lever search reads no test data (there is none here), shares one training between
    levers that differ only in decoding or prompt, and reports select scores, slices and
    cross-entropy, with the in-context base beside the lever that prompts the same way."""
    data = tmp_path / "data"
    (data / "e2e").mkdir(parents=True)
    write_e2e(data / "e2e" / "devel.csv", synthetic_rows(24))
    env = {**os.environ, "VLLM_PLUGIN_DATA": str(data)}
    args = ["--base", str(tiny.base_dir), "--base-name", "tiny",
            "--levers", "default,expert_penalty,on_icl_1,sampled,gate", "--select-subset", "6",
            "--max-tokens", "6", "--eager", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "res")]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.levers", *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "res" / "levers_e2e_tiny.json").read_text())
    assert list(result["rows"]) == ["zero_shot", "icl_1", "default", "expert_penalty", "on_icl_1", "sampled", "gate"]
    assert result["select_inputs"] == 6
    trained = sorted(p.name for p in (tmp_path / "runs" / "e2e-tiny").iterdir() if p.name != "generations")
    # Only sampled and gate get folders of their own; gate starts from the default's training.
    assert len(trained) == 3 and trained[2] == "recurrent"
    gate = result["rows"]["gate"]["training"]
    assert gate["epochs_run"] == result["rows"]["default"]["training"]["epochs_run"]
    assert gate["best_epoch"] == result["rows"]["default"]["training"]["best_epoch"]
    for name in ("default", "expert_penalty", "sampled"):
        row = result["rows"][name]
        assert row["training"]["select_ce"] < row["training"]["base_select_ce"]
        assert {"venue_seen", "venue_unseen"} <= set(row["select"])
    assert result["rows"]["expert_penalty"]["training"]["decoding"] == {"plugin_expert_repetition_penalty": 1.1}
    assert result["rows"]["on_icl_1"]["training"]["prompt"] == "icl_1" and result["rows"]["icl_1"]["training"] is None
    assert "| expert_penalty |" in (tmp_path / "res" / "levers_e2e_tiny.md").read_text()
    # A later run of other levers adds its rows to the same table and keeps the others.
    args[args.index("--levers") + 1] = "shortlist_copy"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.levers", *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads((tmp_path / "res" / "levers_e2e_tiny.json").read_text())
    assert list(merged["rows"]) == list(result["rows"]) + ["shortlist_copy"]
    assert merged["rows"]["default"] == result["rows"]["default"]
    short = merged["rows"]["shortlist_copy"]["training"]
    assert short["select_ce"] < short["base_select_ce"]


def test_select_values_view_redraws_values_and_keeps_venues(tmp_path, monkeypatch):
    """``levers --select-view values``: the same select inputs (venues, slices), their stated values
    redrawn among those fit and select hold, references rewritten alike; nothing from test."""
    from benchmarks.levers import values_view
    from benchmarks.protocols import grouped_test, load_protocol, select_slices
    from vllm_plugin.training.data import parse_mr

    data = tmp_path / "data"
    (data / "e2e").mkdir(parents=True)
    write_e2e(data / "e2e" / "devel.csv", synthetic_rows(24))
    monkeypatch.setenv("VLLM_PLUGIN_DATA", str(data))
    protocol = load_protocol("e2e", "venue")
    prompts, references = grouped_test(protocol.select, 6)
    view, view_refs, slices = values_view(protocol, prompts)
    assert view == values_view(protocol, prompts)[0] and len(view) == len(view_refs) <= len(prompts)
    assert {k: len(v) for k, v in slices.items()} == {k: len(v & set(prompts)) for k, v in select_slices(protocol).items()}
    names = {e.prompt: dict(parse_mr(e.group))["name"] for e in protocol.select}
    assert sorted(p.split("name -- ")[1].split("\n")[0] for p in view) == sorted(names[p] for p in prompts)
    assert set(view).isdisjoint(prompts)  # every input names food (and area): each is rewritten
    for prompt, refs in zip(view, view_refs):
        food = prompt.split("food -- ")[1].split("\n")[0]
        assert all(f"serves {food} food" in r for r in refs)


def test_shots_benchmark_chooses_the_example_on_select(tiny, tmp_path, monkeypatch):
    """``benchmarks.shots`` decodes select behind each seed's drawn example (seed 0's is the
    levers' ``icl_1``, reused from its file) and names the seed of the best select BLEU chosen."""
    from benchmarks.protocols import load_protocol
    from benchmarks.quality import icl_shots

    data = tmp_path / "data"
    (data / "e2e").mkdir(parents=True)
    write_e2e(data / "e2e" / "devel.csv", synthetic_rows(24))
    env = {**os.environ, "VLLM_PLUGIN_DATA": str(data)}
    args = ["--base", str(tiny.base_dir), "--base-name", "tiny", "--seeds", "3", "--select-subset", "6",
            "--max-tokens", "6", "--eager", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "res")]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.shots", *args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "res" / "shots_e2e_tiny.json").read_text())
    assert list(result["rows"]) == ["0", "1", "2"] and result["select_inputs"] == 6
    bleu = {int(k): r["select"]["bleu"] for k, r in result["rows"].items()}
    assert bleu[result["chosen"]] == max(bleu.values())
    gen = tmp_path / "runs" / "e2e-tiny" / "generations" / "select6" / "max6-float32"
    assert sorted(p.name for p in gen.glob("*.jsonl")) == ["icl_1@rp1-fp0.jsonl", "icl_1_shot1@rp1-fp0.jsonl",
                                                          "icl_1_shot2@rp1-fp0.jsonl"]
    monkeypatch.setenv("VLLM_PLUGIN_DATA", str(data))
    protocol = load_protocol("e2e", None)
    for seed, row in result["rows"].items():
        example = icl_shots(protocol, int(seed)).drawn[0]
        assert (row["example"]["input"], row["example"]["prompt"]) == (example.group, example.prompt)


def test_quality_benchmark_refuses_bad_input_before_any_work(tiny, tmp_path, monkeypatch):
    import pytest

    from benchmarks.quality import main

    def refused(args, match):
        with pytest.raises(SystemExit, match=match):
            main(["--runs", str(tmp_path / "runs"), *args])
        assert not (tmp_path / "runs").exists()  # nothing trained, nothing generated

    monkeypatch.setenv("VLLM_PLUGIN_DATA", str(tmp_path / "no-data"))
    refused(["--results", str(tmp_path / "res"), "--base", str(tiny.base_dir)], "e2e data: .*does not exist")
    (tmp_path / "data" / "e2e").mkdir(parents=True)
    rows = synthetic_rows(20)
    write_e2e(tmp_path / "data" / "e2e" / "devel.csv", rows[:30])
    write_e2e(tmp_path / "data" / "e2e" / "test.csv", rows[30:])
    monkeypatch.setenv("VLLM_PLUGIN_DATA", str(tmp_path / "data"))
    refused(["--results", str(tmp_path / "res"), "--base", str(tmp_path / "no-model")], "no such folder")
    (tmp_path / "a-file").write_text("")
    refused(["--results", str(tmp_path / "a-file" / "res"), "--base", str(tiny.base_dir)], "not writable")
    (tmp_path / "empty-base").mkdir()
    refused(["--results", str(tmp_path / "res"), "--base", str(tmp_path / "empty-base")], "cannot be loaded")
    lift = ["--results", str(tmp_path / "res"), "--base", str(tiny.base_dir), "--systems",
            "zero_shot,plugin_shortlist_copy_task_top20_lift_gate_icl1"]
    refused(lift, "plugin_shortlist_copy_task_top20_lift_gate_icl1: pass --copy-tail-offset")
    refused([*lift, "--copy-tail-offset", "0.5"], r"nats in \[-50, 0\].*got 0.5")
    prior = ["--results", str(tmp_path / "res"), "--base", str(tiny.base_dir), "--systems",
             "zero_shot,plugin_shortlist_copy_task_top20_prior_gate_icl1"]
    refused(prior, "plugin_shortlist_copy_task_top20_prior_gate_icl1: pass --tail-prior")
    refused([*prior, "--tail-prior", "0"], "a positive smoothing count.*got 0.0")


def test_webnlg_protocol_holds_out_whole_categories():
    from benchmarks.quality import load_protocol, load_test
    from vllm_plugin.training.fetch import local_data_root

    if local_data_root() is None:  # no download here (tests/test_fetch.py covers it)
        pytest.skip("task data not on this machine ($VLLM_PLUGIN_DATA or shared/data)")
    p = load_protocol("webnlg")
    train, fit, test, protocol = p.train_examples, p.fit, load_test(p), p.description
    held_out = {"Building", "Food", "University"}
    assert all(dict(e.meta)["category"] in held_out for e in test)
    assert not any(dict(e.meta)["category"] in held_out for e in train)
    assert len({e.group for e in train}) == len(train)  # one reference per training entry
    assert {e.group for e in fit} < {e.group for e in train} and "held-out categories" in protocol
    assert len({e.prompt for e in test}) == 350  # dev entries of the held-out categories


def test_webnlg_target_protocol_is_the_papers():
    """The plugin's half and the scored half of the target categories' entries share no entry;
    the plugin's half has one reference per entry, the scored half all of them."""
    from benchmarks.protocols import WEBNLG_TARGET_CATEGORIES, load_protocol, load_test
    from vllm_plugin.training.fetch import local_data_root

    if local_data_root() is None:
        pytest.skip("task data not on this machine ($VLLM_PLUGIN_DATA or shared/data)")
    p = load_protocol("webnlg", "target")
    test = load_test(p)
    assert p.name == "webnlg_target" and "the paper's" in p.description
    assert {dict(e.meta)["category"] for e in p.train_examples + test} == set(WEBNLG_TARGET_CATEGORIES)
    assert not {e.group for e in p.train_examples} & {e.group for e in test}
    assert len({e.group for e in p.train_examples}) == len(p.train_examples)
    assert len(test) > len({e.group for e in test})  # every reference
    assert abs(len({e.group for e in test}) - len(p.train_examples)) <= 1
    assert {e.group for e in p.fit} | {e.group for e in p.select} == {e.group for e in p.train_examples}


def test_e2e_slots_counts_unasked_and_missed_mentions(tmp_path):
    """The reading aid's shares: an output mentioning an attribute its MR lacks is unasked, one
    leaving out an attribute its MR holds is missed; a prompt that is no E2E MR is refused, one
    that ends in an MR after in-context examples reads as that MR."""
    from benchmarks.e2e_slots import attribute_shares, mention_shares

    mrs = {"p1": {"name": "A", "customer rating": "high"}, "p2": {"name": "B", "area": "riverside"}}
    path = tmp_path / "x@rp1-fp0.5.jsonl"
    path.write_text(json.dumps({"prompt": "p1", "output": "A is by the riverside."}) + "\n"
                    + json.dumps({"prompt": "p2", "output": "B has a high rating, near the river."}) + "\n")
    got = mention_shares(path, mrs)
    assert got["outputs"] == 2
    assert got["customer rating"] == {"unasked": 1.0, "missed": 1.0, "rows_lacking": 1, "rows_having": 1}
    assert got["area"]["unasked"] == 1.0 and got["area"]["missed"] == 0.0
    assert got["priceRange"]["unasked"] == 0.0 and got["priceRange"]["missed"] is None  # no MR holds one
    assert attribute_shares(mrs) == {"area": 0.5, "customer rating": 0.5, "name": 1.0}
    assert got["words"] == pytest.approx(6.5)
    path.write_text(json.dumps({"prompt": "p3", "output": "C"}) + "\n")
    with pytest.raises(ValueError, match="not E2E devel or test MRs"):
        mention_shares(path, mrs)
    # A lever's file keeps the in-context example before the task's MR: the last MR counts.
    path.write_text(json.dumps({"prompt": "p2 B is by the river.\n\np1", "output": "A, highly rated."}) + "\n")
    got = mention_shares(path, mrs)
    assert got["customer rating"]["missed"] == 0.0 and got["area"]["rows_lacking"] == 1
