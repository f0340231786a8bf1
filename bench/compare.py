"""Prints the ratio table of a `vae bench --json` file against a torch_bench.py JSON file:
time(PyTorch) / time(vaecuda), so > 1 means vaecuda is faster.
Usage: python bench/compare.py OURS.json TORCH.json"""
import json, sys

ours, theirs = (json.load(open(p)) for p in sys.argv[1:3])
print(f"ours:    {ours['device']}\nPyTorch: {theirs['device']}")
print(f"{'kernel':<44} {'shape':<26} {'ours µs':>10} {'torch µs':>10} {'speedup':>8}")
tk = {(k['kernel'], k['shape']): k['seconds'] * 1e6 for k in theirs['kernels']}
for k in ours['kernels']:
    t = tk.get((k['kernel'], k['shape']))
    if t is not None:
        print(f"{k['kernel']:<44} {k['shape']:<26} {k['median_us']:>10.1f} {t:>10.1f} {t / k['median_us']:>7.2f}x")
print(f"{'arch':<8} {'ours ms/step':>13} {'torch mode':>12} {'torch ms/step':>14} {'speedup':>8}")
for r in ours['training']:
    for t in (t for t in theirs['training'] if t['arch'] == r['arch']):
        print(f"{r['arch']:<8} {r['step_ms']:>13.2f} {t['mode']:>12} {t['step_ms']:>14.2f} {t['step_ms'] / r['step_ms']:>7.2f}x")
