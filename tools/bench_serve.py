"""Load benchmark of ``asr-serve``: many Vosk-protocol clients streaming real recordings at real-time pace.

    python tools/bench_serve.py --clients 100                 # bundled model, float32, compiled, 2 workers, 30 s per client
    python tools/bench_serve.py --clients 10 --seconds 10     # a quick run
    python tools/bench_serve.py --clients 30 --no-compile --threads 2   # other server settings

The server runs as its own processes (``python -m asr.cli.serve`` on a free port of 127.0.0.1,
``--workers`` worker processes of ``--threads`` intra-op threads each, no LM unless ``--lm``), so
its CPU time (the front's and the workers', read from /proc) is its own. The clients run in this
process: each streams a "program" of real recordings
(``tests/data/audio``, the held-out ones included, in a random order with 0.3-1.5 s pauses, at
least ``--seconds`` long; ``--programs`` distinct ones, client i plays program i mod that) in
``--block`` second messages, each sent when its last sample would have been recorded, whether or
not the earlier replies have come (as a microphone client does: a client that waited for each reply
would fall behind real time whenever a reply takes longer than a block, and load the server less);
clients start spread over the first second, half at 16 kHz and half at 8 kHz. A server that does not
keep up shows it as latencies that grow to seconds.

Printed (markdown): partial-result latency, from sending a message to receiving its reply (the
audio's own duration is not in it: the message is sent once its audio is complete), p50/p95/max;
the latency of the final after eof; the server's CPU use while the clients streamed (100 % = one
core), the clients' own (this process: they share the machine) and, per worker, its streams,
real-time factor and tick compute time (``/metrics``); failed clients
(errors, close codes other than 1000) and finals whose text differs from ``model.transcribe``
of the same samples with the same weights, counting apart those that differ only in where words
split: after an endpoint (1.2 s of silence) a word-continuation piece starts a new word in the
stream, while the offline pass, which has no endpoints, glues it to the word before the pause.
With ``--int8`` the server's finals differ from the int8 offline pass in a token here and there (its
rounding of each activation to int8 amplifies float rounding that differs between a batched step and
one pass); the default float32 server differs only in word splits. The 1-minute load average is
printed with them: the numbers depend on what else the machine runs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AUDIO = ROOT / "tests" / "data" / "audio"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=float, default=30.0, help="audio per client (default 30)")
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--int8", action="store_true",
                   help="server with --int8 (default: float32, whose finals equal the offline pass; int8 finals "
                        "differ from the offline int8 pass in a token here and there: the int8 rounding of each "
                        "activation amplifies float rounding that differs between a batched step and one pass)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="server without --compile (default: with it; its compiled wkv update of batches is what "
                        "makes batches of streams cheap; inductor's disk cache makes later starts quick)")
    p.add_argument("--lm", action="store_true", help="decode finals with the model's LM (default: greedy)")
    p.add_argument("--tick", type=float, default=0.1, help="server tick in seconds (default 0.1)")
    p.add_argument("--threads", type=int, default=1, help="server intra-op threads (default 1, the server's)")
    p.add_argument("--workers", type=int, default=2,
                   help="server worker processes (asr-serve --workers; default 2, one per core of the 2-core box)")
    p.add_argument("--block", type=float, default=0.1, help="seconds of audio per client message (default 0.1)")
    p.add_argument("--programs", type=int, default=10, help="distinct client programs (default 10)")
    p.add_argument("--seed", type=int, default=0)
    return p


def make_programs(n: int, seconds: float, seed: int) -> list[np.ndarray]:
    """``n`` 16 kHz float programs of real recordings with pauses, each at least ``seconds`` long."""
    from asr.audio import load_audio

    clips = [load_audio(p).numpy() for p in sorted(AUDIO.rglob("*")) if p.suffix in (".flac", ".ogg", ".wav")]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts, total = [], 0
        while total < seconds * 16000:
            clip = clips[rng.randrange(len(clips))]
            pause = np.zeros(int(rng.uniform(0.3, 1.5) * 16000), dtype=np.float32)
            parts += [clip, pause]
            total += clip.size + pause.size
        out.append(np.concatenate(parts))
    return out


def to_pcm(wave: np.ndarray, rate: int) -> np.ndarray:
    import torch

    from asr.audio import resample

    w = torch.from_numpy(wave)
    if rate != 16000:
        w = resample(w, 16000, rate)
    return (w.clamp(-1, 1) * 32767).round().to(torch.int16).numpy()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "asr.cli.serve", "--port", "0", "--threads", str(args.threads),
           "--workers", str(args.workers),
           "--tick", str(args.tick), "--max-streams", str(args.clients + 10), "--log-level", "warning"]
    cmd += ["--int8"] if args.int8 else []
    cmd += ["--compile"] if args.compile else []
    cmd += [] if args.lm else ["--no-lm"]
    cmd += ["--model", args.model] if args.model else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in proc.stderr:  # type: ignore[union-attr]
        m = re.search(r"listening on (http://\S+) ", line)
        if m:
            return proc, m.group(1)
        sys.stderr.write(line)
    raise SystemExit(f"bench_serve: the server did not start (exit {proc.wait()})")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its children alive now (the workers)."""
    total = 0.0
    for p in [pid] + _children(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


async def one_client(session, url: str, pcm: np.ndarray, rate: int, delay: float, block: float) -> dict:
    from asr.serve.client import vosk_stream

    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    try:
        run = await vosk_stream(session, url, pcm, rate, block_seconds=block, realtime=True)
    except Exception as err:  # a failure is a result here: counted, not fatal
        return {"error": f"{type(err).__name__}: {err}"}
    return {"run": run, "seconds": time.perf_counter() - t0}


async def load(url: str, jobs: list[tuple[np.ndarray, int]], block: float, pid: int,
               workers: int) -> tuple[list[dict], tuple[float, float], float]:
    """Every client's run (the workers' /metrics appended), (server CPU s, clients' CPU s), wall s."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        cpu0, own0, t0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
        out = await asyncio.gather(*(one_client(session, url.replace("http", "ws", 1) + "/", pcm, rate,
                                                i / len(jobs), block) for i, (pcm, rate) in enumerate(jobs)))
        cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - t0
        clients_cpu = time.process_time() - own0
        metrics = await worker_metrics(session, url, workers)
    return out + [metrics], (cpu, clients_cpu), wall  # type: ignore[list-item]


async def worker_metrics(session, url: str, workers: int) -> list[dict[str, float]]:  # noqa: ANN001
    """/metrics of every worker (idle connections go to the workers in turn; asked until each answered)."""
    got: dict[float, dict[str, float]] = {}
    for _ in range(8 * workers):
        async with session.get(url + "/metrics", headers={"Connection": "close"}) as r:
            m = {k: float(v) for k, v in (line.split() for line in (await r.text()).splitlines()
                                          if not line.startswith("#"))}
        got[m.get("asr_serve_worker", 0.0)] = m
        if len(got) == workers:
            break
    return [got[k] for k in sorted(got)]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import asr

    torch.set_num_threads(1)
    programs = make_programs(args.programs, args.seconds, args.seed)
    jobs = [(to_pcm(programs[i % len(programs)], 16000 if i % 2 == 0 else 8000), 16000 if i % 2 == 0 else 8000)
            for i in range(args.clients)]
    print(f"bench_serve: {args.clients} clients, {len(programs)} programs of >= {args.seconds:g} s; "
          "offline references...", file=sys.stderr, flush=True)
    # the reference: the exact float32 engine, or the int8 one (not the default onnx-int8 engine, whose
    # rounding differs from the server's batched float32 or int8 steps)
    model = asr.load_model(args.model, lm="auto" if args.lm else None, backend="int8" if args.int8 else "float")
    refs: dict[tuple[int, int], str] = {}
    for i, (pcm, rate) in enumerate(jobs):
        key = (i % len(programs), rate)
        if key not in refs:
            refs[key] = model.transcribe(pcm, sample_rate=rate).text
    del model
    proc, url = start_server(args)
    load1 = os.getloadavg()[0]
    try:
        results, cpu, wall = asyncio.run(load(url, jobs, args.block, proc.pid, args.workers))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    metrics = results.pop()
    report(args, jobs, results, refs, cpu, wall, metrics, load1)
    return 0


def report(args, jobs, results, refs, cpu, wall, metrics, load1) -> None:  # noqa: ANN001
    lat, final_lat, failed, diffs, spacing = [], [], [], [], 0
    for i, res in enumerate(results):
        run = res.get("run")
        if run is None or run.close_code != 1000 or run.final is None:
            failed.append(res.get("error") or f"close code {getattr(run, 'close_code', None)}")
            continue
        lat += run.latencies
        final_lat.append(1000 * run.final_latency)
        ref = refs[i % args.programs, jobs[i][1]]
        if run.text != ref:
            diffs.append(word_diff(ref, run.text))
            spacing += "".join(run.text.split()) == "".join(ref.split())
    audio = statistics.mean(p.size / r for p, r in jobs)
    ms = [1000 * v for v in lat]
    each = lambda key, scale, fmt: " / ".join(format(scale * m.get(key, float("nan")), fmt) for m in metrics)  # noqa: E731
    print(f"\n# bench_serve: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average at start "
          f"{load1:.2f}; model {args.model or 'bundled'} ({'int8' if args.int8 else 'float32'}, "
          f"{'LM' if args.lm else 'greedy'}{', compiled' if args.compile else ''}), tick {args.tick:g} s, "
          f"{args.workers} worker(s) of {args.threads} thread(s), {args.block:g} s messages\n")
    print("| clients | audio per client | partial latency p50 / p95 / max | final latency p50 | server CPU "
          "| clients' CPU | streams per worker | server RTF per worker | tick compute p50 / p95 per worker | failed "
          "| finals != offline (of which only word boundaries) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.clients} | {audio:.1f} s | {pct(ms, .5):.0f} / {pct(ms, .95):.0f} / {max(ms, default=float('nan')):.0f} ms "
          f"| {pct(final_lat, .5):.0f} ms | {100 * cpu[0] / wall:.0f} % of one core ({wall:.0f} s) "
          f"| {100 * cpu[1] / wall:.0f} % "
          f"| {each('asr_serve_streams_total', 1, '.0f')} | {each('asr_serve_real_time_factor', 1, '.3f')} "
          f"| {each('asr_serve_tick_seconds_p50', 1000, '.0f')} ms / {each('asr_serve_tick_seconds_p95', 1000, '.0f')} ms "
          f"| {len(failed)} | {len(diffs)} ({spacing}) |")
    for reason in sorted(set(failed))[:5]:  # the distinct reasons, not one line per client
        print(f"\nfailure: {reason} (x{failed.count(reason)})")
    for diff in sorted(set(diffs))[:3]:
        print(f"\nfinal != offline: {diff}")


def word_diff(ref: str, got: str) -> str:
    """The first differing words of two transcripts: 'offline [a b] -> stream [a-b]' with context."""
    import difflib

    r, g = ref.split(), got.split()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=r, b=g, autojunk=False).get_opcodes():
        if op != "equal":
            ctx = " ".join(r[max(0, i1 - 3) : i1])
            return f"... {ctx} [{' '.join(r[i1:i2])}] -> [{' '.join(g[j1:j2])}] (of {len(r)} words)"
    return "(same words, other spacing)"


if __name__ == "__main__":
    sys.exit(main())
