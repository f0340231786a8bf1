#!/usr/bin/env python3
"""Training steps of vaecuda and PyTorch side by side, interleaved.

On a shared VM one run of each is not a comparison: either side's step time moved by up to
50% between runs minutes apart. This alternates the two, round after round, training steps
only (`vae bench --steps-only`, `torch_bench.py --steps-only`), and reports each round and
the median over rounds, so both see the same conditions.

    python3 bench/side_by_side.py --vae target/release/vae --rounds 5 --device cpu

With --baseline OLD_VAE, an older build runs in every round too (before, after and PyTorch
under the same conditions), and the table gains its column and the speedup over it.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_json(cmd, path):
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f'{" ".join(cmd[:2])} failed: {done.stderr.strip()}')
    with open(path) as f:
        return {r['arch']: r['step_ms'] for r in json.load(f)['training'] if r.get('mode', 'eager') == 'eager'}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--vae', default='target/release/vae', help='the vae binary')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--steps', type=int, default=15, help='timed steps per architecture per round')
    ap.add_argument('--threads', type=int, default=os.cpu_count())
    ap.add_argument('--baseline', help='an older vae binary to time in every round as well')
    ap.add_argument('--json', help='also write every round and the medians here')
    a = ap.parse_args()
    ours, theirs, before = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        oj, tj, bj = os.path.join(tmp, 'ours.json'), os.path.join(tmp, 'torch.json'), os.path.join(tmp, 'base.json')

        def vae(binary, path):
            return run_json([binary, 'bench', '--device', a.device, '--steps-only', '--train-steps', str(a.steps),
                             '--json', path], path)

        for r in range(a.rounds):
            if a.baseline:
                b = vae(a.baseline, bj)
                for arch in b:
                    before.setdefault(arch, []).append(b[arch])
            o = vae(a.vae, oj)
            t = run_json([sys.executable, os.path.join(HERE, 'pytorch', 'torch_bench.py'), '--device', a.device,
                          '--threads', str(a.threads), '--no-compile', '--steps-only', '--steps', str(a.steps),
                          '--json', tj], tj)
            for arch in o:
                ours.setdefault(arch, []).append(o[arch])
                theirs.setdefault(arch, []).append(t.get(arch, float('nan')))
            line = '  '.join(f'{k} {o[k]:.2f} vs {t.get(k, float("nan")):.2f} ms' for k in o)
            if a.baseline:
                line += '  (baseline ' + ', '.join(f'{k} {b[k]:.2f}' for k in b) + ' ms)'
            print(f'round {r + 1}: {line}', flush=True)
    print(f"{'arch':<8} {'ours ms/step (median)':>22} {'PyTorch ms/step (median)':>25} {'speedup':>8}  rounds won")
    summary = {}
    for arch in ours:
        mo, mt = statistics.median(ours[arch]), statistics.median(theirs[arch])
        won = sum(o < t for o, t in zip(ours[arch], theirs[arch]))
        print(f'{arch:<8} {mo:>22.2f} {mt:>25.2f} {mt / mo:>7.2f}x  {won}/{len(ours[arch])}')
        summary[arch] = dict(ours_ms=ours[arch], pytorch_ms=theirs[arch], ours_median=mo, pytorch_median=mt)
        if arch in before:
            mb = statistics.median(before[arch])
            summary[arch].update(baseline_ms=before[arch], baseline_median=mb)
    if before:
        print(f"{'arch':<8} {'baseline ms/step (median)':>26} {'ours':>8} {'baseline ÷ ours':>16}")
        for arch in before:
            mb, mo = summary[arch]['baseline_median'], summary[arch]['ours_median']
            print(f'{arch:<8} {mb:>26.2f} {mo:>8.2f} {mb / mo:>15.2f}x')
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(device=a.device, rounds=a.rounds, steps=a.steps, threads=a.threads, baseline=a.baseline,
                       archs=summary), f,
                      indent=1)


if __name__ == '__main__':
    main()
