"""Packaging for rwkv-asr: streaming speech recognition with an RWKV-7 encoder and a CTC head."""
from pathlib import Path

from setuptools import find_packages, setup

about: dict = {}
exec((Path(__file__).parent / "asr" / "version.py").read_text(), about)

setup(
    name="rwkv-asr",
    version=about["__version__"],
    description="Streaming speech recognition with an RWKV-7 encoder: trains in parallel, runs as an RNN",
    long_description=(Path(__file__).parent / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["asr", "asr.*"]),
    package_data={"asr": ["pretrained/*", "conf/**/*.yaml", "serve/static/*"]},
    include_package_data=True,
    install_requires=[
        # torch 2.14.1 and torchaudio 2.11.0 are known to work together on CPU;
        # torchaudio's wheel does not pin torch, so we pin nothing tighter than needed.
        "torch>=2.4",
        "torchaudio>=2.4",
        "numpy",
        "soundfile>=0.12",
        "sentencepiece>=0.1.99",
        "hydra-core>=1.3",
        "jiwer>=3.0",
        "tensorboard",
        "tqdm",
        # the bundled model decodes with its bundled LM through torchaudio's lexicon decoder; 0.0.7
        # has no wheel for Python 3.13+, where the bundled model decodes greedily instead
        'flashlight-text>=0.0.7; python_version < "3.13"',
    ],
    extras_require={
        # the tests cover language-model decoding too, so dev pulls in its decoder
        # ... and pocketsphinx, which tests/test_bench_accuracy.py runs beside our model
        "dev": ["pytest>=7", "pytest-timeout", "flashlight-text>=0.0.7", "pocketsphinx>=5.0"],
        "bench": ["pocketsphinx>=5.0", "flashlight-text>=0.0.7"],  # tools/bench_accuracy.py
        "lm": ["flashlight-text>=0.0.7"],  # asr-eval/asr-transcribe --lm (torchaudio's ctc_decoder)
        "gpu": ["fla-core", "packaging"],
        "mic": ["sounddevice>=0.4"],
        "serve": ["aiohttp>=3.9"],  # asr-serve (WebSocket + HTTP server)
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],  # asr-export --format onnx, asr.export.runtime
    },
    entry_points={
        "console_scripts": [
            "asr=asr.cli.main:main",
            "asr-train=asr.cli.train:main",
            "asr-eval=asr.cli.evaluate:main",
            "asr-transcribe=asr.cli.transcribe:main",
            "asr-live=asr.cli.live:main",
            "asr-serve=asr.cli.serve:main",
            "asr-export=asr.cli.export:main",
        ],
    },
)
