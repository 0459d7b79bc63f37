"""How far int8 inference (the ``int8`` backend of ``asr.infer.InferenceEncoder``) moves a trained model.

    python tools/eval_int8.py --model exp/model_r2.pt --manifest .data/bundle/test.jsonl --limit 100

Per utterance, one pass through the ``float`` and the ``int8`` backends (the same audio, the same
model); reports the relative logit error (max |int8 - fp32| / max |fp32| per utterance: max and
mean over utterances), the fraction of frames whose greedy (argmax) token agrees, the greedy WER
of both against the references, and, on the first ``--stream`` utterances, int8 streaming frame by
frame (40 ms per call) against one int8 pass (how far cutting the audio moves int8 outputs).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asr.audio import load_audio  # noqa: E402
from asr.decode.greedy import ctc_greedy  # noqa: E402
from asr.features import compute_fbank  # noqa: E402
from asr.infer import InferenceEncoder  # noqa: E402
from asr.model_file import load_for_inference  # noqa: E402
from asr.tokenizer import normalize_text  # noqa: E402
from asr.train.metrics import error_counts  # noqa: E402


def one_pass(model, feats: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits, _ = model.step(feats.unsqueeze(0), model.init_state(1))
    return logits[0]


def frame_by_frame(model, feats: torch.Tensor) -> torch.Tensor:
    state, outs = model.init_state(1), []
    with torch.inference_mode():
        for i in range(0, feats.shape[0], 4):
            logits, state = model.step(feats[None, i : i + 4], state)
            outs.append(logits[0])
    return torch.cat(outs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--manifest", nargs="+", required=True, help="JSON Lines manifests (audio paths relative to the file)")
    ap.add_argument("--limit", type=int, default=100, help="utterances per manifest (0: all)")
    ap.add_argument("--stream", type=int, default=10, help="utterances also streamed frame by frame")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_for_inference(args.model)
    float32, int8 = InferenceEncoder(model, "float"), InferenceEncoder(model, "int8")
    entries = []
    for m in args.manifest:
        lines = [json.loads(line) for line in Path(m).read_text().splitlines() if line.strip()]
        lines = lines[: args.limit] if args.limit > 0 else lines
        entries += [dict(e, audio=str(Path(m).parent / e["audio"])) for e in lines]
    errs, agree, frames = [], 0, 0
    refs, hyp32, hyp8, same_text = [], [], [], 0
    stream_errs, stream_agree, stream_frames = [], 0, 0
    for i, e in enumerate(entries):
        feats = compute_fbank(load_audio(e["audio"]))
        f32 = one_pass(float32, feats)
        i8 = one_pass(int8, feats)
        if f32.shape[0] == 0:
            continue
        errs.append(((i8 - f32).abs().max() / f32.abs().max()).item())
        a32, a8 = f32.argmax(-1), i8.argmax(-1)
        agree += int((a32 == a8).sum())
        frames += a32.numel()
        t32 = tok.decode(ctc_greedy(f32)[0])
        t8 = tok.decode(ctc_greedy(i8)[0])
        same_text += t32 == t8
        refs.append(normalize_text(e["text"]))
        hyp32.append(normalize_text(t32))
        hyp8.append(normalize_text(t8))
        if i < args.stream:
            s8 = frame_by_frame(int8, feats)
            stream_errs.append(((s8 - i8).abs().max() / i8.abs().max()).item())
            stream_agree += int((s8.argmax(-1) == a8).sum())
            stream_frames += a8.numel()
    c32, c8 = error_counts(refs, hyp32), error_counts(refs, hyp8)
    print(f"# {args.model}, {len(refs)} utterances, {frames} encoder frames ({', '.join(args.manifest)})")
    print(f"relative logit error int8 vs fp32 (max |d| / max |fp32| per utterance): "
          f"max {max(errs):.4f}, mean {statistics.mean(errs):.4f}, median {statistics.median(errs):.4f}")
    print(f"greedy frame agreement (argmax): {100 * agree / frames:.2f}% of frames; "
          f"identical transcripts: {same_text}/{len(refs)}")
    print(f"greedy WER: fp32 {100 * c32.wer:.2f}% ({c32.word_errors}/{c32.words}), "
          f"int8 {100 * c8.wer:.2f}% ({c8.word_errors}/{c8.words}), "
          f"difference {100 * (c8.wer - c32.wer):+.2f} points; CER fp32 {100 * c32.cer:.2f}%, int8 {100 * c8.cer:.2f}%")
    if stream_errs:
        print(f"int8 frame by frame vs one int8 pass ({len(stream_errs)} utterances): relative logit "
              f"difference max {max(stream_errs):.2e}, median {statistics.median(stream_errs):.2e}; "
              f"argmax agreement {100 * stream_agree / stream_frames:.2f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
