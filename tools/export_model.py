"""Export a training checkpoint as a compact inference model (fp16 weights, tokenizer, CMVN).

    python tools/export_model.py CHECKPOINT_OR_RUN_DIR OUT.pt
    python tools/export_model.py CHECKPOINT_OR_RUN_DIR OUT.pt --int8-weights   # about half the size
    python tools/export_model.py CHECKPOINT_OR_RUN_DIR OUT.pt --int8-weights --lm words.arpa

Only what inference needs is kept: the model config, the weights in float16 (CMVN statistics stay
float32: they are tiny and their precision matters), and the tokenizer. ``load_for_inference``
reads the result like any checkpoint; loading copies the fp16 values into the float32 model.
To export an average of the last checkpoints, run ``tools/average_checkpoints.py`` first.

``--int8-weights`` stores the large matrices as int8 with a scale per row
(``asr.model_file.quantize_weights_int8``); loading restores them to float32, so the model
runs in float32 as before (this is storage, not ``--int8`` inference). The bundled model uses it to
leave room for its language model under 25 MB.

``--lm ARPA`` (plain or ``.xz``) makes the model carry its word language model, packed for a fast
load (``lm``: KenLM's binary format and the lexicon, :mod:`asr.decode.packed_lm`; needs KenLM's
``build_binary``: ``python tools/build_kenlm.py``), as it carries its tokenizer: ``asr.load_model``,
``asr-transcribe`` and ``asr-live`` then decode with it by default (``--no-lm`` / ``lm=None`` to turn it off), and
``asr-eval --model-lm`` scores it. The bundled model is made this way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.decode.packed_lm import pack_language_model  # noqa: E402
from asr.model_file import CheckpointError, load_checkpoint, quantize_weights_int8, resolve_checkpoint  # noqa: E402
from asr.train.checkpoint import atomic_torch_save  # noqa: E402


def compact_state(ckpt: dict, int8_weights: bool = False, lm: Optional[dict] = None) -> dict:
    """The inference subset of ``ckpt``: fp16 weights (CMVN float32), or with ``int8_weights`` the
    large matrices as int8 and the rest fp16; with ``lm`` (``PackedLM.to_checkpoint()``), the word
    LM it carries."""
    model, packed = quantize_weights_int8(ckpt["model"]) if int8_weights else (ckpt["model"], {})
    state = {}
    for name, tensor in model.items():
        keep_fp32 = name.startswith("cmvn.") or not tensor.is_floating_point()
        state[name] = tensor if keep_fp32 else tensor.half()
    out = {"config": ckpt["config"], "model": state, "tokenizer": ckpt["tokenizer"], "step": ckpt.get("step"),
           "format": "rwkv-asr inference v1 (" + ("int8 matrices, fp16 rest" if int8_weights else "fp16 weights") + ")"}
    if packed:
        out["model_int8"] = packed
    if lm is not None:
        out["lm"] = lm
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--int8-weights", action="store_true",
                        help="store the large matrices as int8 with a scale per row (about half the size)")
    parser.add_argument("--lm", type=Path, default=None, metavar="ARPA",
                        help="word LM (plain or .xz ARPA) for the model to carry and decode with by default")
    args = parser.parse_args(argv)
    try:
        ckpt = load_checkpoint(resolve_checkpoint(args.checkpoint))
        lm = None
        if args.lm is not None:
            from asr.tokenizer import Tokenizer

            lm = pack_language_model(args.lm, Tokenizer.from_bytes(ckpt["tokenizer"])).to_checkpoint()
    except (CheckpointError, OSError, RuntimeError, ValueError) as err:
        print(f"export_model: error: {err}", file=sys.stderr)
        return 2
    atomic_torch_save(compact_state(ckpt, int8_weights=args.int8_weights, lm=lm), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
