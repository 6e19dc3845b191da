"""The README's serving example, for real: `vllm serve` SmolLM2 with the trained E2E plugin.

Starts the server on loopback, sends one E2E test input through /v1/completions with and
without the plugin, one chat completion, and one bad request; saves what came back.

    python -m benchmarks.serve_example [--plugin runs/e2e-gru-full/checkpoint]
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from vllm_plugin.training.data import load_examples
from vllm_plugin.training.pipeline import default_data_file
from vllm_plugin.base_model import resolve_base
from vllm_plugin.checkpoint import read_config
from vllm_plugin.serving import serve_command

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plugin", default="runs/e2e-gru-full/checkpoint")
    parser.add_argument("--out", default=str(RESULTS / "serve_example.json"))
    args = parser.parse_args()

    base = resolve_base(None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd, env = serve_command(base, {"e2e": args.plugin}, "--host", "127.0.0.1", "--port", str(port),
                             "--served-model-name", "smollm2", "--max-model-len", "1024", "--max-num-seqs", "8")
    cmd[0] = str(Path(sys.executable).with_name("vllm"))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"vllm serve exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        startup_s = time.time() - t0
        # In the prompt the plugin was trained on (behind its in-context example, if it has one).
        example = next(iter(load_examples("e2e", default_data_file("e2e", "test"),
                                          template=read_config(args.plugin).prompt_template or None)))
        body = {"model": "smollm2", "prompt": example.prompt, "max_tokens": 64, "temperature": 0.0, "stop": ["\n"]}
        results = {"startup_s": round(startup_s, 1), "prompt": example.prompt, "reference": example.target}
        for name, extra in [("base_alone", {}), ("with_plugin", {"vllm_xargs": {"plugin": "e2e"}})]:
            r = httpx.post(url + "/v1/completions", json={**body, **extra}, timeout=300)
            results[name] = {"request": {**body, **extra}, "status": r.status_code,
                             "text": r.json()["choices"][0]["text"]}
        chat = {"model": "smollm2", "max_tokens": 64, "temperature": 0.0, "vllm_xargs": {"plugin": "e2e"},
                "messages": [{"role": "user", "content": example.prompt}]}
        r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=300)
        results["chat_with_plugin"] = {"status": r.status_code, "text": r.json()["choices"][0]["message"]["content"]}
        bad = httpx.post(url + "/v1/completions", json={**body, "vllm_xargs": {"plugin": "nope"}}, timeout=60)
        results["bad_request"] = {"status": bad.status_code, "error": bad.json()["error"]["message"]}
    finally:
        proc.terminate()
        proc.wait(60)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
