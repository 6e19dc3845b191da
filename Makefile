# `make demo`: set up (first time) and run the main job on the embedded default.
# `make test`: set up (first time) and run the tests.
VENV ?= .venv
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo test bench paper

install:
	scripts/install.sh

demo: install
	$(VENV)/bin/vllm-plugin demo

test: install
	$(VENV)/bin/python -m pytest -q tests

bench: install
	$(VENV)/bin/python -m benchmarks.pipeline_cost

# The paper's comparison (hours on 2 CPU cores; each step resumes where it stopped). Every system
# decodes at the penalty setting it does best with on the select split. E2E: select split by
# venue (the default), then the paper's by-MR split, with the LoRA upper bound (one full epoch,
# about an hour here). WebNLG: category shift, its select split by whole seen categories (the
# default), then the paper's target-category protocol with a LoRA; strengths measured on select only.
# WebNLG: the baselines, the default plugin (also at strength 0.5, benchmarks.strength's choice on
# select) and the fast plugin with copy scores and gate, on the plain prompt and behind icl_1's
# example (copy scores on the whole prompt, and on the task's input only), about 75 minutes here,
# its select stage on 150 inputs, half of it the base's log-prob pass on the one-example prompts;
# and the nearest-example prompt (icl_1_nearest); the E2E table's other rows can be added with --systems.
WEBNLG_SYSTEMS = zero_shot,zero_shot_chat,icl_1,icl_3,plugin_recurrent,plugin_shortlist_copy_gate,plugin_shortlist_copy_gate_icl1,plugin_recurrent_w0.5,plugin_shortlist_copy_task_gate_icl1,icl_1_nearest
# E2E, the fast recipe's rows (benchmarks/results/shortlist): on the plain prompt, behind icl_1's
# example, with copy scores on the task's input only, and that plugin's top-20 twin; beside them
# the strongest prompt measured, one example per input chosen by similarity (icl_1_nearest).
SHORTLIST_SYSTEMS = zero_shot,icl_1,plugin_shortlist_copy_gate,plugin_shortlist_copy_gate_icl1,plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_top20_gate_icl1,icl_1_nearest
# E2E, the plugin behind the nearest example with example scores (benchmarks/results/nearest) beside
# that prompt alone, the chosen plugin and the chosen plugin with example scores: about 40 minutes here
# once their base log-probs are cached.
NEAREST_SYSTEMS = icl_1_nearest,plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_example_gate_icl1_nearest,plugin_shortlist_copy_task_example_gate_icl1
# Qwen2.5-Coder-0.5B (vocabulary 151,936): the baselines and the fast recipe, full logits and top-20,
# with and without the gate, and behind icl_1's example with copy scores on the task's input only
# (the first eight rows about 80 minutes on an older CPU, 22 of them the base's log-prob pass; the
# two rows behind the example 55 more on a newer one, 35 of them their base pass); and the
# nearest-example prompt (icl_1_nearest), the strongest prompt measured on SmolLM2.
# E2E, the paper's split by MR (benchmarks/results/e2e_by_mr_*): the baselines that matter most and the chosen
# recipe with its top-20 twin, about 50 minutes here (the full default list would take many hours).
# WebNLG, the paper's target-category protocol (benchmarks/results/webnlg_target_*): the baselines, the
# fast plugin on the plain prompt and behind icl_1's example (copy scores on the whole prompt, on the task's
# input only), a LoRA of the base and the nearest-example prompt, on 200 of the 801 test entries (the
# LoRA's one epoch took 463 s here).
WEBNLG_TARGET_SYSTEMS = zero_shot,icl_1,icl_3,plugin_shortlist_copy_gate,plugin_shortlist_copy_gate_icl1,plugin_shortlist_copy_task_gate_icl1,lora,icl_1_nearest
# E2E, the chosen recipe at the paper's plugin width (d_model 768) and its top-20 twin beside the same recipe at
# d_model 256, the nearest-example prompt and zero-shot (benchmarks/results/wide): about 35 minutes here.
WIDE_SYSTEMS = zero_shot,icl_1_nearest,plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_gate_d768_icl1,plugin_shortlist_copy_task_top20_gate_d768_icl1
# E2E on the origin split (fit/select without near-twin MRs, benchmarks/results/origin): about 45 minutes on a
# 2-core CPU without AVX-512, with the base's log-prob pass.
ORIGIN_SYSTEMS = zero_shot,icl_1,plugin_shortlist_copy_task_gate_icl1
BY_MR_SYSTEMS = zero_shot,icl_1,icl_1_nearest,plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_top20_gate_icl1
# E2E, the chosen recipe with half the fit inputs' values swapped (--value-swap 0.5), its gate fitted on
# redrawn values and its top-20 twin, beside the chosen recipe and the strongest prompts (benchmarks/results/values):
# about 45 minutes here.
VALUES_SYSTEMS = zero_shot,icl_1,icl_1_nearest,plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_values_gate_icl1,plugin_shortlist_copy_task_values_gatev_icl1,plugin_shortlist_copy_task_values_top20_gate_icl1
# Qwen2.5-Coder-0.5B, the value-swap recipe and its top-20 twin beside the prompts (benchmarks/results/values_qwen):
# about 95 minutes here on a fresh machine, about 40 of them the base's log-prob pass on the one-example prompts.
QWEN_VALUES_SYSTEMS = zero_shot,icl_1,plugin_shortlist_copy_task_values_gate_icl1,plugin_shortlist_copy_task_values_top20_gate_icl1
# Qwen2.5-Coder-0.5B, the closed-API view with the task's tokens lifted out of the flat tail: how far the base ranks
# each select reference token (benchmarks/results/top20_reach_e2e_*.json, which chooses the offset on select), then the
# chosen recipe, its top-20 twin and its lifted-tail twin beside zero-shot (benchmarks/results/lift_qwen).
QWEN_LIFT_SYSTEMS = zero_shot,plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_top20_gate_icl1,plugin_shortlist_copy_task_top20_lift_gate_icl1
# Qwen2.5-Coder-0.5B, the closed-API view whose tail follows the fit targets' unigram frequencies (the smoothing
# top20_reach chooses on select), and their square roots, beside the chosen recipe and its flat-tail twin
# (benchmarks/results/prior_qwen); the same five on SmolLM2 under the same protocol (benchmarks/results/prior_smollm2),
# and what each twin says of the MR on select (e2e_slots).
QWEN_PRIOR_SYSTEMS = zero_shot,plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_top20_gate_icl1,plugin_shortlist_copy_task_top20_prior_gate_icl1,plugin_shortlist_copy_task_top20_prior_half_gate_icl1
PRIOR_SLOT_SYSTEMS = plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_top20_gate_icl1,plugin_shortlist_copy_task_top20_prior_gate_icl1,plugin_shortlist_copy_task_top20_prior_half_gate_icl1
QWEN_SYSTEMS = zero_shot,zero_shot_chat,icl_1,icl_3,plugin_shortlist_copy,plugin_shortlist_copy_gate,plugin_shortlist_copy_top20,plugin_shortlist_copy_top20_gate,plugin_shortlist_copy_task_gate_icl1,plugin_shortlist_copy_task_top20_gate_icl1,icl_1_nearest

paper: install
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --systems +lora,plugin_recurrent_gate,plugin_recurrent_copy,plugin_recurrent_copy_gate --lora-epochs 1 --top20-source full_topk
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --systems $(SHORTLIST_SYSTEMS) --top20-source full_topk --results benchmarks/results/shortlist
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --systems $(NEAREST_SYSTEMS) --top20-source full_topk --results benchmarks/results/nearest
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --systems $(WIDE_SYSTEMS) --top20-source full_topk --results benchmarks/results/wide
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --split origin --systems $(ORIGIN_SYSTEMS) --top20-source full_topk --results benchmarks/results/origin
	$(VENV)/bin/python -m benchmarks.protocols --out benchmarks/results/splits_e2e.json
	$(VENV)/bin/python -m benchmarks.e2e_slots --generations runs/quality/e2e-smollm2-135m/generations/select300/max64-float32 runs/quality/e2e-smollm2-135m/generations/test-all/max64-float32 --systems $(NEAREST_SYSTEMS) --results benchmarks/results/nearest
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.shots --dataset e2e --split venue --seeds 8
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --shot-seed 6 --systems zero_shot,icl_1,plugin_shortlist_copy_task_gate_icl1 --top20-source full_topk --results benchmarks/results/shot6
	$(VENV)/bin/python -m benchmarks.e2e_slots --generations runs/quality/e2e-smollm2-135m-shot6/generations/select300/max64-float32 runs/quality/e2e-smollm2-135m-shot6/generations/test-all/max64-float32 --systems zero_shot,icl_1,plugin_shortlist_copy_task_gate_icl1 --results benchmarks/results/shot6
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --systems $(VALUES_SYSTEMS) --top20-source full_topk --results benchmarks/results/values
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --split input --systems $(BY_MR_SYSTEMS) --top20-source full_topk
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset webnlg --systems $(WEBNLG_SYSTEMS) --select-subset 150
	$(VENV)/bin/python -m benchmarks.strength --dataset webnlg
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset webnlg --split target --systems $(WEBNLG_TARGET_SYSTEMS) --lora-epochs 1 --subset 200 --select-subset 100
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --base qwen2.5-coder-0.5b --subset 300 --select-subset 150 --top20-source full_topk --systems $(QWEN_SYSTEMS)
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --base qwen2.5-coder-0.5b --subset 300 --select-subset 150 --top20-source full_topk --systems $(QWEN_VALUES_SYSTEMS) --results benchmarks/results/values_qwen
	$(VENV)/bin/python -m benchmarks.top20_reach --base smollm2-135m
	$(VENV)/bin/python -m benchmarks.top20_reach --base qwen2.5-coder-0.5b
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --base qwen2.5-coder-0.5b --subset 300 --select-subset 150 --top20-source full_topk --copy-tail-offset -2 --systems $(QWEN_LIFT_SYSTEMS) --results benchmarks/results/lift_qwen
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --base qwen2.5-coder-0.5b --subset 300 --select-subset 150 --top20-source full_topk --tail-prior 0.01 --systems $(QWEN_PRIOR_SYSTEMS) --results benchmarks/results/prior_qwen
	VLLM_CPU_KVCACHE_SPACE=4 $(VENV)/bin/python -m benchmarks.quality --dataset e2e --base smollm2-135m --subset 300 --select-subset 150 --top20-source full_topk --tail-prior 0.1 --systems $(QWEN_PRIOR_SYSTEMS) --results benchmarks/results/prior_smollm2
	$(VENV)/bin/python -m benchmarks.e2e_slots --generations runs/quality/e2e-smollm2-135m/generations/select150/max64-float32 --systems $(PRIOR_SLOT_SYSTEMS) --decoding rp1-fp0.5 --results benchmarks/results/prior_smollm2
	$(VENV)/bin/python -m benchmarks.e2e_slots --generations runs/quality/e2e-qwen2.5-coder-0.5b/generations/select150/max64-float32 --systems $(PRIOR_SLOT_SYSTEMS) --decoding rp1-fp0.5 --results benchmarks/results/prior_qwen
