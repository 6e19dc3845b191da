"""The LoRA upper bound: it learns, and the merged folder is the fine-tuned model."""
import json

from .test_data import write_e2e
from .test_training import synthetic_rows


def test_lora_fine_tune_learns_and_merges(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    from vllm_plugin.training.base_logits import tokenize_examples
    from vllm_plugin.training.data import load_e2e, split_by_input
    from vllm_plugin.training.lora import LoraTrainConfig, mean_loss, pad_token_id, train_lora

    examples = load_e2e(write_e2e(tmp_path / "e2e.csv", synthetic_rows(20)))
    merged_dir = train_lora(str(tiny.base_dir), examples, tmp_path / "lora",
                            LoraTrainConfig(epochs=2, batch_size=8, lr=5e-3, warmup_steps=2), log=lambda *_: None)
    m = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert m["best_select_loss"] < m["base_select_loss"] and m["best_epoch"] >= 1
    _, select = split_by_input(examples)
    select_ts = tokenize_examples(select, tiny.tokenizer)
    pad = pad_token_id(tiny.tokenizer)
    # Before training LoRA is the identity: the recorded base loss is the base's own.
    assert abs(mean_loss(tiny.base, select_ts, 8, pad) - m["base_select_loss"]) < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert abs(mean_loss(merged, select_ts, 8, pad) - m["best_select_loss"]) < 1e-3
