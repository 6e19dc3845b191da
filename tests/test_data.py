"""Task data loads, groups and splits as the paper does; bad data is refused by name."""
import json

import pytest

from vllm_plugin.training.base_logits import tokenize_examples
from vllm_plugin.training.data import (DataError, format_prompt, group_references, load_e2e, load_examples, load_jsonl,
                           load_webnlg, parse_mr, split_by_input)

E2E_ROWS = [
    ("name[Aromi], eatType[coffee shop], area[city centre]", "Aromi is a coffee shop in the city centre."),
    ("name[Aromi], eatType[coffee shop], area[city centre]", "In the city centre there is Aromi, a coffee shop."),
    ("name[Zizzi], food[Italian]", "Zizzi serves Italian food."),
    ("name[Cotto], priceRange[cheap]", "Cotto is cheap."),
    ("name[Strada], area[riverside]", "Strada is by the riverside."),
]


def write_e2e(path, rows=E2E_ROWS):
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref", "fixed", "orig_mr"])
        for mr, ref in rows:
            w.writerow([mr, ref, 0, mr])
    return path


def test_parse_mr():
    assert parse_mr("name[The Vaults], priceRange[more than £30], near[Café Brazil]") == [
        ("name", "The Vaults"), ("priceRange", "more than £30"), ("near", "Café Brazil")]
    with pytest.raises(ValueError):
        parse_mr("no brackets here")


def test_e2e_prompt_and_groups(tmp_path):
    ex = load_e2e(write_e2e(tmp_path / "e2e.csv"))
    assert len(ex) == 5 and len({e.group for e in ex}) == 4
    assert ex[0].prompt.endswith("Attributes:\nname -- Aromi\neatType -- coffee shop\narea -- city centre\n\nSentence:\n")
    refs = group_references(ex)
    assert refs[ex[0].prompt] == [E2E_ROWS[0][1], E2E_ROWS[1][1]]


def test_split_is_by_distinct_input(tmp_path):
    rows = [(f"name[N{i}], area[riverside]", f"ref {i} {j}") for i in range(50) for j in range(i % 3 + 1)]
    ex = load_e2e(write_e2e(tmp_path / "e2e.csv", rows))
    fit, select = split_by_input(ex, 0.6, seed=3)
    fit_groups, select_groups = {e.group for e in fit}, {e.group for e in select}
    assert not fit_groups & select_groups
    assert len(fit_groups) == 30 and len(select_groups) == 20
    assert split_by_input(ex, 0.6, seed=3) == (fit, select)  # seeded


def test_real_e2e_devel_shape(tmp_path):
    from vllm_plugin.training.fetch import local_data_root
    from vllm_plugin.training.pipeline import default_data_file

    if local_data_root("e2e") is None:  # no download here (tests/test_fetch.py covers it)
        pytest.skip("E2E data not on this machine ($VLLM_PLUGIN_DATA or shared/data)")
    path = default_data_file("e2e")
    ex = load_e2e(path)
    assert len(ex) == 4299 and len({e.group for e in ex}) == 1484
    fit, select = split_by_input(ex)
    assert len({e.group for e in fit}) == round(0.6 * 1484)


def test_webnlg(tmp_path):
    p = tmp_path / "w.jsonl"
    p.write_text(json.dumps({"eid": "Id1", "category": "Airport", "size": 1,
                             "triples": ["Aarhus | leaderName | Jacob_Bundsgaard"],
                             "refs": ["The leader of Aarhus is Jacob Bundsgaard.", "Jacob leads Aarhus."]}) + "\n")
    with open(p, "a") as f:  # WebNLG numbers entries per (category, size): same eid, other entry
        f.write(json.dumps({"eid": "Id1", "category": "Airport", "size": 2, "triples": ["A | b | C", "C | d | E"],
                            "refs": ["A b C, which d E."]}) + "\n")
    ex = load_webnlg(p)
    assert len(ex) == 3 and ex[0].group == ex[1].group == "Airport/1/Id1" and ex[2].group == "Airport/2/Id1"
    assert "Triples:\nAarhus | leaderName | Jacob_Bundsgaard\n\nSentence:\n" in ex[0].prompt
    assert dict(ex[0].meta)["category"] == "Airport"


def test_generic_jsonl(tmp_path):
    p = tmp_path / "own.jsonl"
    p.write_text('{"prompt": "Q: 2+2?\\nA:", "completion": " 4"}\n\n{"prompt": "Q: 3+3?\\nA:", "completion": "6"}\n')
    ex = load_jsonl(p)
    assert [e.prompt for e in ex] == ["Q: 2+2?\nA:", "Q: 3+3?\nA:"] and ex[0].target == "4"


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("a,b\n1,2\n", "expected CSV columns 'mr' and 'ref'"),
    ("mr,ref\n,some text\n", ":2: empty 'mr' or 'ref'"),
    ("mr,ref\nname[X],\n", ":2: empty 'mr' or 'ref'"),
    ("mr,ref\nnot an mr,text\n", ":2: not a meaning representation"),
    ("mr,ref\n", "has no rows"),
])
def test_bad_e2e(tmp_path, content, message):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        load_e2e(p)


@pytest.mark.parametrize("loader, content, message", [
    (load_jsonl, '{"prompt": "x", "completion": "y"}\n{broken\n', ":2: not valid JSON"),
    (load_jsonl, '["a list"]\n', ":1: expected a JSON object"),
    (load_jsonl, '{"prompt": "x"}\n', ":1: expected non-empty string fields"),
    (load_webnlg, '{"triples": [], "refs": ["x"]}\n', ":1: expected non-empty 'triples'"),
    (load_webnlg, '{"triples": ["a | b | c"], "refs": []}\n', "no entries with references"),
])
def test_bad_jsonl(tmp_path, loader, content, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        loader(p)


def test_missing_file_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples("e2e", tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unknown dataset 'squad'"):
        load_examples("squad", tmp_path / "nope.csv")


def test_tokenize_shares_prompts_and_limits_targets(tmp_path, tiny):
    ex = load_e2e(write_e2e(tmp_path / "e2e.csv"))
    ts = tokenize_examples(ex, tiny.tokenizer)
    assert len(ts.prompts) == 4 and ts.example_prompt[:2] == [0, 0]
    assert all(t[-1] == tiny.tokenizer.eos_token_id for t in ts.targets)
    with pytest.raises(DataError, match="exceeds max_target_tokens=3"):
        tokenize_examples(ex, tiny.tokenizer, max_target_tokens=3)


def test_format_prompt_custom_template():
    assert format_prompt("jsonl", "hello", "<<{input}>>") == "<<hello>>"


def test_swap_names_invents_venues_consistently(tmp_path):
    from vllm_plugin.training.data import swap_names

    rows = [("name[Aromi], eatType[pub], near[Café Rouge]", "Aromi is a pub near Café Rouge."),
            ("name[Aromi], eatType[pub], near[Café Rouge]", "Near Café Rouge, Aromi is a pub."),
            ("name[Cotto], food[Italian]", "Cotto serves Italian food."),
            ("name[Zizzi], area[riverside]", "Zizzi is by the riverside."),
            ("eatType[pub]", "A pub."),
            ("name[Bar], food[Barbecue]", "The bar serves Barbecue food; bar none.")]
    examples = load_e2e(write_e2e(tmp_path / "e.csv", rows))
    swapped = swap_names(examples, 1.0, seed=3)
    assert swapped == swap_names(examples, 1.0, seed=3) and swap_names(examples, 0.0) == examples
    assert swapped[4] == examples[4]  # no name to swap
    # Whole words only, any case; other fields and the words around are left alone.
    assert "food[Barbecue]" in swapped[5].group and "food -- Barbecue" in swapped[5].prompt
    assert swapped[5].target.startswith("The ") and "serves Barbecue food; " in swapped[5].target
    assert "bar" not in swapped[5].target.lower().replace("barbecue", "")
    assert swapped[5].prompt == format_prompt("e2e", swapped[5].group)
    for old, new in zip(examples[:4], swapped):
        venue = dict(old.meta)["venue"]
        assert venue not in new.prompt and venue not in new.target and venue not in new.group
        assert dict(new.meta)["venue"] in new.prompt and dict(new.meta)["venue"] in new.target
    assert swapped[0].group == swapped[1].group and "Café Rouge" not in swapped[0].target  # near[...] too
    assert dict(swapped[0].meta)["venue"] == dict(swapped[1].meta)["venue"]
    assert 0 < sum(a != b for a, b in zip(examples, swap_names(examples, 0.5, seed=1))) < 6


def test_swap_values_rewrites_stated_values_within_their_field(tmp_path):
    from vllm_plugin.training.data import swap_values

    rows = [("name[Aromi], eatType[pub], food[Chinese]", "Aromi is a pub serving Chinese food."),
            ("name[Aromi], eatType[pub], food[Chinese]", "Chinese food at the PUB Aromi."),
            ("name[Cotto], eatType[coffee shop], food[Italian]", "Cotto is a coffee shop with Italian dishes."),
            ("name[Zizzi], eatType[restaurant], food[Japanese]", "Zizzi, a Japanese place."),  # no eatType said
            ("name[Bibimbap], priceRange[high], customer rating[high]", "Bibimbap: high prices, high rating."),
            ("name[Strada], area[riverside]", "Strada is by the river.")]
    examples = load_e2e(write_e2e(tmp_path / "e.csv", rows))
    swapped = swap_values(examples, 1.0, seed=2)
    assert swapped == swap_values(examples, 1.0, seed=2) and swap_values(examples, 0.0) == examples
    fields = [dict(parse_mr(e.group)) for e in swapped]
    # Each value moves to another one its field takes in the examples; names and meta stay.
    assert fields[0]["eatType"] in {"coffee shop", "restaurant"} and fields[0]["food"] in {"Italian", "Japanese"}
    assert swapped[0].group == swapped[1].group and fields[0]["name"] == "Aromi"
    assert swapped[0].target == f"Aromi is a {fields[0]['eatType']} serving {fields[0]['food']} food."
    assert swapped[1].target == f"{fields[0]['food']} food at the {fields[0]['eatType']} Aromi."
    assert [e.meta for e in swapped] == [e.meta for e in examples]
    assert all(e.prompt == format_prompt("e2e", e.group) for e in swapped)
    # A value the references do not state, or that two fields share, is kept; so is a lone value.
    assert fields[3]["eatType"] == "restaurant" and fields[3]["food"] != "Japanese"
    assert swapped[4] == examples[4] and swapped[5] == examples[5]
