"""Decode speed of vLLM with and without the plugin, side by side in one run.

    python -m benchmarks.throughput                  # default base, batch 1, 8, 32, 64

Configurations (``config`` in the JSON):
  none         vLLM without the processor (the installed entry point is not loaded in that engine)
  inert        vLLM with the processor and both plugins loaded; no request asks for a plugin
  plugin       every row decodes with plugin A
  two_plugins  half the rows with plugin A, half with plugin B
  hf_generate  Hugging Face ``generate`` with a LogitsProcessor applying plugin A (KV cache on):
               what a user would otherwise run
  recompute    the paper's decoding: base and plugin over the whole sequence every step, no cache
References (``reference_rows``): ``hf_generate_no_plugin``, and ``none_bf16``: vLLM without the
processor in bfloat16, its default dtype for float32 checkpoints (every vLLM row above runs in
float32, which this CPU computes natively).

Two vLLM engines (one without the processor, one with it) live in their own processes for the
whole run and wait on a pipe while the others work; Hugging Face runs in this process. Each
repeat goes through every configuration at every batch size, so drift on the machine hits all
of them alike. A step is timed inside the engine loop (``LLMEngine.step``) and counted only when
every row of the batch is decoding: ``ms_per_token`` is the median decode step (time per output
token of one sequence), ``tokens_per_s = batch / median step``, medians over all repeats.
Prompts are random token ids, distinct per row and the same for every configuration.

The plugins are freshly initialised ones of the default configuration unless ``--plugin`` names
a checkpoint: speed does not depend on the weights. ``compute_ceiling`` holds the machine's fp32
GEMM peak against the FLOP rate each decoder reaches (FLOPs per token x tokens/s): the largest
speed-up over HF generate that any decoder could show here. Writes
``benchmarks/results/throughput.json`` and a plot next to it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ENGINE_CONFIGS = ("none", "inert", "plugin", "two_plugins")
_TAG = "@@throughput "


# ----- the engine side (a worker process) ----------------------------------------------------
def _engine_worker(kind: str, base: str, eager: bool, max_num_seqs: int) -> None:
    """Serve timing commands from stdin: one JSON line in, one tagged JSON line out."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: nothing busy-waits
    from vllm import LLM

    # float32: this CPU has no native bfloat16 (what vllm_plugin.serving.fast_dtype picks here);
    # the "none_bf16" engine measures vLLM's own default for comparison.
    kwargs = dict(model=base, enforce_eager=eager, seed=0, max_num_seqs=max_num_seqs,
                  dtype="bfloat16" if kind == "none_bf16" else "float32")
    if kind in ("none", "none_bf16"):
        import vllm.v1.sample.logits_processor as lp

        lp._load_logitsprocs_plugins = lambda: []  # as if the package's entry point were not installed
        llm = LLM(**kwargs)
    else:
        from vllm_plugin.processor import PluginLogitsProcessor

        llm = LLM(logits_processors=[PluginLogitsProcessor], **kwargs)
    engine = llm.llm_engine
    print(_TAG + json.dumps({"ready": kind}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("profile"):
            print(_TAG + json.dumps(_profile_decode(engine, cmd)), flush=True)
            continue
        plugins = cmd["plugins"]  # per row: None, "a" or "b"
        _add_requests(engine, cmd["prompts"], plugins, cmd["new_tokens"])
        started: set[str] = set()
        steps = []
        while engine.has_unfinished_requests():
            decoding = len(started) == len(plugins)
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            if decoding and outs:
                steps.append(dt)
            started.update(o.request_id for o in outs if o.outputs and o.outputs[0].token_ids)
        print(_TAG + json.dumps({"steps": steps}), flush=True)


_request_ids = itertools.count()


def _add_requests(engine, prompts, plugins, new_tokens: int) -> None:
    """One greedy request per prompt, ``new_tokens`` long whatever it samples; ``plugins[i]``: None or a name."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    for prompt, name in zip(prompts, plugins):
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0,
                                extra_args={"plugin": name} if name else None)
        engine.add_request(f"r{next(_request_ids)}", TokensPrompt(prompt_token_ids=prompt), params)


def _profile_decode(engine, cmd) -> dict:
    """torch.profiler over a few decode steps, the processor's work marked ``vllm_plugin``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from vllm_plugin.processor import PluginBank

    apply = PluginBank.apply

    def marked(self, *a, **k):
        with record_function("vllm_plugin"):
            return apply(self, *a, **k)

    PluginBank.apply = marked
    _add_requests(engine, cmd["prompts"], ["a"] * len(cmd["prompts"]), cmd["new_tokens"])
    while True:  # prefill first, outside the profile
        outs = engine.step()
        if sum(1 for o in outs if o.outputs and o.outputs[0].token_ids) == len(cmd["prompts"]):
            break
    steps = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        while engine.has_unfinished_requests():
            with record_function("decode_step"):
                engine.step()
            steps += 1
    PluginBank.apply = apply
    events = {e.key: e for e in prof.key_averages()}
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    return {"steps": steps, "step_ms": events["decode_step"].cpu_time_total / 1000 / steps,
            "processor_ms": events["vllm_plugin"].cpu_time_total / 1000 / steps, "table": table}


class EngineProcess:
    def __init__(self, kind: str, base: str, plugins: dict[str, str], eager: bool, max_num_seqs: int):
        from vllm_plugin.processor import ENV_VAR

        env = dict(os.environ)
        env.pop(ENV_VAR, None)
        if kind == "plugins":
            env[ENV_VAR] = json.dumps(plugins)
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.throughput", "--worker", kind, "--base", base,
             "--max-num-seqs", str(max_num_seqs)] + (["--eager"] if eager else []),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=Path(__file__).resolve().parent.parent)
        self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        raise RuntimeError(f"the {self.kind!r} engine process exited with {self.proc.wait()}; see its log above")

    def decode_steps(self, prompts, plugins, new_tokens: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "plugins": plugins, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()["steps"]

    def profile(self, prompts, new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"profile": True, "prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


# ----- the peers: Hugging Face generate and full recompute ----------------------------------
class HFPluginLogitsProcessor:
    """A ``transformers`` LogitsProcessor adding ``weight * log_softmax(plugin)`` to the scores.

    The plugin state advances over the prompt on the first call and by one token per call after,
    the same recurrent stepping as the vLLM processor.
    """

    def __init__(self, plugin, weight: float = 1.0):
        self.plugin, self.weight = plugin, weight
        self.state, self.seen = None, 0

    def __call__(self, input_ids, scores):
        import torch

        batch, length = input_ids.shape
        slots = torch.arange(batch)
        if self.state is None or length <= self.seen:  # a new generate call
            self.state = self.plugin.new_state(batch)
            self.plugin.advance(self.state, slots, input_ids, [length] * batch, [0] * batch)
        else:
            self.plugin.advance(self.state, slots, input_ids[:, -1:], None, [self.seen] * batch)
        self.seen = length
        lp = torch.log_softmax(self.plugin.logits(self.state, slots).float(), -1)
        return scores + self.weight * lp.to(scores.dtype)


class _StepClock:
    """Last in HF's processor list: called once per step, so call-to-call gaps are decode steps."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def hf_decode_steps(model, plugin, prompts, new_tokens: int) -> list[float]:
    import torch
    from transformers import LogitsProcessorList

    clock = _StepClock()
    processors = ([HFPluginLogitsProcessor(plugin)] if plugin is not None else []) + [clock]
    with torch.inference_mode():
        model.generate(torch.tensor(prompts), attention_mask=torch.ones(len(prompts), len(prompts[0]), dtype=torch.long),
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList(processors), pad_token_id=0)
    return clock.steps()


def recompute_steps(model, plugin, prompts, steps: int) -> list[float]:
    """The paper's loop: every step runs base and plugin over the whole sequence."""
    import torch

    ids = torch.tensor(prompts)
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            t0 = time.perf_counter()
            base = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            lp = torch.log_softmax(plugin.head(plugin(ids)[:, -1]).float(), -1)
            nxt = (base + lp).argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            times.append(time.perf_counter() - t0)
    return times


# ----- FLOPs ---------------------------------------------------------------------------------
def base_flops_per_token(config, context: int) -> int:
    """2 x multiply-adds of one decode step of a Llama-style base: matmuls, head, attention."""
    c = config.get_text_config()
    d, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", heads)
    head_dim = getattr(c, "head_dim", None) or d // heads
    attn_proj = d * heads * head_dim * 2 + d * kv * head_dim * 2  # q, o and k, v
    mlp = 3 * d * c.intermediate_size
    attention = 2 * heads * head_dim * context  # q.k and p.v over the context
    return 2 * (layers * (attn_proj + mlp + attention) + d * vocab)


def matmul_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    """Best fp32 GEMM rate of this machine's torch (all threads): the ceiling on any decoder here."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


# ----- the driver ----------------------------------------------------------------------------
def fresh_plugins(base: str, workdir: Path) -> dict[str, str]:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from vllm_plugin.base_model import tokenizer_fingerprint
    from vllm_plugin.checkpoint import save_plugin
    from vllm_plugin.model import PluginConfig, build_plugin

    tok = AutoTokenizer.from_pretrained(base)
    vocab = AutoConfig.from_pretrained(base).get_text_config().vocab_size
    paths = {}
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        plugin = build_plugin(PluginConfig(vocab_size=vocab, tokenizer_fingerprint=tokenizer_fingerprint(tok)))
        paths[name] = str(workdir / name)
        save_plugin(plugin.eval(), paths[name])
    return paths


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    configs = list(dict.fromkeys(r["config"] for r in result["rows"]))
    for config in configs:
        rows = [r for r in result["rows"] if r["config"] == config]
        ax.plot([r["batch_size"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=config)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode output tokens/s (median)")
    ax.set_title(f"{result['base_model']} + {result['plugin']} plugin, {result['machine']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LABELS = {
    "none": "`none`: vLLM, processor not installed",
    "inert": "`inert`: processor and plugins loaded, unused",
    "plugin": "`plugin`: every row with plugin A",
    "two_plugins": "`two_plugins`: half A, half B",
    "hf_generate": "`hf_generate`: transformers `generate` + a LogitsProcessor with plugin A",
    "hf_generate_no_plugin": "transformers `generate`, no plugin (reference)",
    "none_bf16": "`none` in bfloat16, vLLM's default dtype (reference)",
    "recompute": "`recompute`: the paper's loop, base and plugin over the whole sequence each step",
}


def write_table(result: dict, path: Path) -> None:
    """The README's table: output tokens/s per config and batch size, ms per token in brackets."""
    rows = result["rows"] + result.get("reference_rows", [])
    batches = sorted({r["batch_size"] for r in rows})
    lines = ["| config | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    for config in dict.fromkeys(r["config"] for r in rows):
        cells = {r["batch_size"]: r for r in rows if r["config"] == config}
        fmt = lambda r: f"{r['tokens_per_s']:.1f}" if config == "recompute" \
            else f"{r['tokens_per_s']:.1f} ({r['ms_per_token']:.0f} ms)"
        lines.append(f"| {LABELS.get(config, config)} | "
                     + " | ".join(fmt(cells[b]) if b in cells else "" for b in batches) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_views(result: dict, out: Path) -> None:
    """The table (``out`` as .md) and the plot (.png) of a result."""
    write_table(result, out.with_suffix(".md"))
    write_plot(result, out.with_suffix(".png"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--plugin", help="checkpoint for plugin A (default: fresh plugins of the default config)")
    parser.add_argument("--plugin-b", help="checkpoint for plugin B (default: a second fresh plugin)")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=144)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per vLLM request")
    parser.add_argument("--hf-new-tokens", type=int, default=12, help="tokens per Hugging Face generate call")
    parser.add_argument("--recompute-steps", type=int, default=2)
    parser.add_argument("--eager", action="store_true", default=True,
                        help="vLLM without torch.compile (default; the comparison the issue states)")
    parser.add_argument("--compile", dest="eager", action="store_false", help="vLLM with torch.compile")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--profile-batch", type=int, default=32, help="profile decode steps at this batch (0: skip)")
    parser.add_argument("--profile-steps", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    parser.add_argument("--bf16-batch-sizes", default="32",
                        help="also time vLLM without the processor in bfloat16 (its default dtype) at these "
                             "batch sizes ('' to skip)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the table and plot from the JSON at --out, without timing anything")
    parser.add_argument("--worker", choices=["none", "none_bf16", "plugins"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.bf16_batch_sizes = [int(b) for b in args.bf16_batch_sizes.split(",") if b.strip()]
    if not args.worker and max(args.batch_sizes) > args.max_num_seqs:
        parser.error(f"--max-num-seqs {args.max_num_seqs} is below the largest batch {max(args.batch_sizes)}")
    return args


class Rig:
    """Everything timed: both vLLM engines (and the bfloat16 one), HF's model, plugin A, prompts."""

    def __init__(self, args, base: str):
        import numpy as np
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from vllm_plugin.checkpoint import load_plugin

        self.args = args
        plugins = fresh_plugins(base, Path(tempfile.mkdtemp(prefix="vllm_plugin_throughput_")))
        if args.plugin:
            plugins["a"] = str(Path(args.plugin).resolve())
        if args.plugin_b:
            plugins["b"] = str(Path(args.plugin_b).resolve())
        self.plugin = load_plugin(plugins["a"]).eval()
        self.config = AutoConfig.from_pretrained(base)
        vocab = self.config.get_text_config().vocab_size
        rng = np.random.default_rng(0)
        self.prompts = rng.integers(10, vocab, size=(max(args.batch_sizes), args.prompt_len)).tolist()
        marker = self.plugin.config.copy_after
        if marker:  # a --copy-task-only plugin: an example's segment and the task's, as in its prompts
            if args.prompt_len < 4 * len(marker):
                raise SystemExit(f"--prompt-len {args.prompt_len}: plugin A's {len(marker)}-token copy marker "
                                 f"goes in twice, a quarter of the prompt apart; use at least {4 * len(marker)}")
            for prompt in self.prompts:
                for at in (args.prompt_len // 4, args.prompt_len // 2):
                    prompt[at:at + len(marker)] = marker
        kinds = ("none", "plugins") + (("none_bf16",) if args.bf16_batch_sizes else ())
        self.engines = {k: EngineProcess(k, base, plugins, args.eager, args.max_num_seqs) for k in kinds}
        self.hf_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def decode_steps(self, config: str, b: int, warm_up: bool = False) -> list[float]:
        """Decode-step times (s) of ``config`` at batch ``b`` (``warm_up``: two tokens, untimed use)."""
        args, rows = self.args, self.prompts[:b]
        new_tokens = 2 if warm_up else args.new_tokens
        if config == "none_bf16":
            return self.engines["none_bf16"].decode_steps(rows, [None] * b, new_tokens)
        if config in ENGINE_CONFIGS:
            names = {"none": [None] * b, "inert": [None] * b, "plugin": ["a"] * b,
                     "two_plugins": ["a" if i % 2 == 0 else "b" for i in range(b)]}[config]
            engine = self.engines["none" if config == "none" else "plugins"]
            return engine.decode_steps(rows, names, new_tokens)
        if config == "hf_generate":
            return hf_decode_steps(self.hf_model, self.plugin, rows, 2 if warm_up else args.hf_new_tokens)
        if config == "hf_generate_no_plugin":
            return hf_decode_steps(self.hf_model, None, rows, args.hf_new_tokens)
        return recompute_steps(self.hf_model, self.plugin, rows, args.recompute_steps)

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()


def time_all(rig: Rig, args) -> dict[tuple[str, int], list[float]]:
    """Every configuration at every batch size, once per repeat (so drift hits all alike)."""
    from tqdm.auto import tqdm

    # Warm-up: first calls allocate and (for vLLM) fill the prefix cache with the prompts.
    for b in args.batch_sizes:
        rig.decode_steps("none", b, warm_up=True)
        rig.decode_steps("plugin", b, warm_up=True)
    for b in args.bf16_batch_sizes:
        rig.decode_steps("none_bf16", b, warm_up=True)
    rig.decode_steps("hf_generate", 1, warm_up=True)
    steps: dict[tuple[str, int], list[float]] = {}
    plan = [(b, c) for _ in range(args.repeats) for b in args.batch_sizes
            for c in ENGINE_CONFIGS + ("hf_generate", "hf_generate_no_plugin", "recompute")
            + (("none_bf16",) if b in args.bf16_batch_sizes else ())]
    for b, c in tqdm(plan, desc="timing"):
        steps.setdefault((c, b), []).extend(rig.decode_steps(c, b))
    return steps


def summarise(steps: dict[tuple[str, int], list[float]], args, base_config, plugin, machine: str) -> dict:
    """The results JSON from the timed steps: rows, ratios side by side, FLOPs and ceilings."""
    from vllm_plugin.processor import describe

    def row(c, b):
        ms = statistics.median(steps[(c, b)]) * 1000
        return {"batch_size": b, "config": c, "tokens_per_s": b / ms * 1000, "ms_per_token": ms,
                "decode_steps_timed": len(steps[(c, b)])}

    sizes = args.batch_sizes
    main_configs = ENGINE_CONFIGS + ("hf_generate", "recompute")
    rows = [row(c, b) for b in sizes for c in main_configs]
    bf16_rows = [row("none_bf16", b) for b in sizes if b in args.bf16_batch_sizes]
    by = {(r["config"], r["batch_size"]): r["tokens_per_s"] for r in rows}
    context = args.prompt_len + args.new_tokens // 2
    base_flops = base_flops_per_token(base_config, context)
    plugin_flops = plugin.flops_per_token()
    flop_share = plugin_flops / base_flops
    # How far any decoder could outrun HF generate here: the machine's GEMM peak over the FLOP rate
    # HF generate (with the plugin) already reaches. A target above this ceiling cannot be met.
    peak = matmul_peak_gflops()
    gflops = {c: {str(b): by[(c, b)] * (base_flops + plugin_flops) / 1e9 for b in sizes}
              for c in ("hf_generate", "plugin")}
    # Extra time per token with the plugin, against the FLOP floor (the plugin's share of the base's FLOPs).
    overhead = {str(b): by[("none", b)] / by[("plugin", b)] - 1 for b in sizes}
    return {
        "base_model": args.base, "plugin": f"{plugin.config.architecture} d={plugin.config.d_model}",
        # What plugin A is (shortlist, copy scores and gate change its cost), as the server logs it.
        "plugin_a": describe("a", plugin, args.plugin or "a fresh plugin of the default configuration"),
        "flop_share": flop_share,
        "flops_per_token": {"base": base_flops, "plugin": plugin_flops, "base_context": context},
        "machine": machine,
        "vllm": {"eager": args.eager, "max_num_seqs": args.max_num_seqs},
        "settings": {"repeats": args.repeats, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "hf_new_tokens": args.hf_new_tokens, "recompute_steps": args.recompute_steps},
        "rows": rows,
        "reference_rows": [row("hf_generate_no_plugin", b) for b in sizes] + bf16_rows,
        "ratios_to_none": {str(b): {c: by[(c, b)] / by[("none", b)] for c in main_configs if c != "none"}
                           for b in sizes},
        "ours_over_hf_generate": {str(b): by[("plugin", b)] / by[("hf_generate", b)] for b in sizes},
        "ours_over_recompute": {str(b): by[("plugin", b)] / by[("recompute", b)] for b in sizes},
        "none_bf16_over_none": {str(r["batch_size"]): r["tokens_per_s"] / by[("none", r["batch_size"])]
                                for r in bf16_rows},
        "compute_ceiling": {
            "matmul_peak_gflops": peak,
            "hf_generate_gflops": gflops["hf_generate"],
            "plugin_gflops": gflops["plugin"],
            "max_ours_over_hf_generate": {b: peak / g for b, g in gflops["hf_generate"].items()},
        },
        "time_overhead": overhead,
        "overhead_over_flop_share": {b: v / flop_share for b, v in overhead.items()},
    }


def write_report(result: dict, profiled: dict | None, args, out: Path) -> None:
    """``out`` (JSON), its plot, and the profile table next to it."""
    if profiled:
        table = out.with_name(out.stem + "_profile.txt")
        result["profile"] = {"batch_size": args.profile_batch, "decode_steps": profiled["steps"],
                             "step_ms": profiled["step_ms"], "processor_ms": profiled["processor_ms"],
                             "processor_share": profiled["processor_ms"] / profiled["step_ms"],
                             "table": table.name}
        table.write_text(f"torch.profiler, {profiled['steps']} decode steps at batch {args.profile_batch}, plugin "
                         f"on every row; 'vllm_plugin' is the processor's apply()\n\n{profiled['table']}\n")
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_views(result, out)
    print(json.dumps({k: result[k] for k in ("flop_share", "ratios_to_none", "ours_over_hf_generate",
                                             "compute_ceiling")}, indent=1))
    print(f"wrote {out}, its table (.md) and plot (.png)")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report_only:  # reads only the JSON: no base to materialise
        write_views(json.loads(out.read_text()), out)
        print(out.with_suffix(".md").read_text())
        return
    from vllm_plugin.base_model import resolve_base

    base = str(resolve_base(args.base))
    if args.worker:
        _engine_worker(args.worker, base, args.eager, args.max_num_seqs)
        return
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise SystemExit(f"results folder {out.parent} is not writable")
    import platform

    import torch

    rig = Rig(args, base)
    try:
        steps = time_all(rig, args)
        profiled = rig.engines["plugins"].profile(rig.prompts[:args.profile_batch], args.profile_steps + 1) \
            if args.profile_batch else None
    finally:
        rig.close()
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    write_report(summarise(steps, args, rig.config, rig.plugin, machine), profiled, args, out)


if __name__ == "__main__":
    main()
