"""PyTorch side of the side-by-side benchmarks: the same kernels (cuBLAS/cuDNN through
PyTorch, or MKL/oneDNN on the CPU) and the same training step of the same models as
`vae bench`, with the data already on the device. Writes JSON comparable with `vae bench --json`.

Usage: python bench/pytorch/torch_bench.py [--device cuda|cpu] [--json FILE] [--large]
        [--steps N] [--no-compile] [--threads N]
"""
import argparse, json, time
import torch, torch.nn as nn, torch.nn.functional as F


class MLP(nn.Module):
    """pytorch/examples VAE: 784-400-20."""
    def __init__(s, h=400, z=20):
        super().__init__()
        s.fc1, s.fc21, s.fc22 = nn.Linear(784, h), nn.Linear(h, z), nn.Linear(h, z)
        s.fc3, s.fc4 = nn.Linear(z, h), nn.Linear(h, 784)
    def encode(s, x):
        h = F.relu(s.fc1(x.view(-1, 784))); return s.fc21(h), s.fc22(h)
    def decode(s, z):
        return torch.sigmoid(s.fc4(F.relu(s.fc3(z)))).view(-1, 1, 28, 28)


class Conv(nn.Module):
    """The seed conv VAE (same layers and names as vaecuda's `conv`)."""
    def __init__(s, z=20):
        super().__init__()
        e = nn.Module(); d = nn.Module()
        e.conv1, e.conv2, e.conv3 = nn.Conv2d(1, 32, 3, 1, 1), nn.Conv2d(32, 64, 3, 2, 1), nn.Conv2d(64, 128, 3, 2, 1)
        e.fc1, e.fc21, e.fc22 = nn.Linear(6272, 256), nn.Linear(256, z), nn.Linear(256, z)
        d.fc1, d.fc2 = nn.Linear(z, 256), nn.Linear(256, 6272)
        d.conv1 = nn.ConvTranspose2d(128, 64, 3, 2, 1, output_padding=1)
        d.conv2 = nn.ConvTranspose2d(64, 32, 3, 2, 1, output_padding=1)
        d.conv3 = nn.ConvTranspose2d(32, 1, 3, 1, 1)
        s.encoder, s.decoder = e, d
    def encode(s, x):
        e = s.encoder
        x = F.relu(e.conv3(F.relu(e.conv2(F.relu(e.conv1(x))))))
        x = F.relu(e.fc1(x.reshape(-1, 6272))); return e.fc21(x), e.fc22(x)
    def decode(s, z):
        d = s.decoder
        x = F.relu(d.fc2(F.relu(d.fc1(z)))).view(-1, 128, 7, 7)
        return torch.sigmoid(d.conv3(F.relu(d.conv2(F.relu(d.conv1(x))))))


class ConvBn(nn.Module):
    """vaecuda's `conv-bn` (PyTorch-VAE layout) for 28x28 grey, widths 32, 64, 128."""
    def __init__(s, z=20, hs=(32, 64, 128)):
        super().__init__()
        blocks, c = [], 1
        for h in hs:
            blocks.append(nn.Sequential(nn.Conv2d(c, h, 3, 2, 1), nn.BatchNorm2d(h), nn.ReLU())); c = h
        s.encoder = nn.Sequential(*blocks)
        s.fc_mu, s.fc_var = nn.Linear(128 * 16, z), nn.Linear(128 * 16, z)
        s.decoder_input = nn.Linear(z, 128 * 16)
        s.decoder = nn.Sequential(
            nn.Sequential(nn.ConvTranspose2d(128, 64, 3, 2, 1, 0), nn.BatchNorm2d(64), nn.ReLU()),
            nn.Sequential(nn.ConvTranspose2d(64, 32, 3, 2, 1, 1), nn.BatchNorm2d(32), nn.ReLU()))
        s.final_layer = nn.Sequential(nn.ConvTranspose2d(32, 32, 3, 2, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 1, 3, 1, 1))
    def encode(s, x):
        h = s.encoder(x).flatten(1); return s.fc_mu(h), s.fc_var(h)
    def decode(s, z):
        h = s.decoder(s.decoder_input(z).view(-1, 128, 4, 4)); return torch.sigmoid(s.final_layer(h))


def vae_loss(model, x, eps):
    mu, logvar = model.encode(x)
    z = mu + eps * torch.exp(0.5 * logvar)
    bce = F.binary_cross_entropy(model.decode(z), x, reduction='sum')
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def timer(dev):
    def sync():
        if dev == 'cuda': torch.cuda.synchronize()
    def run(fn, reps, warmup=3):
        for _ in range(warmup): fn()
        sync(); samples = []
        for _ in range(max(1, reps // 5)):
            t = time.perf_counter()
            for _ in range(5): fn()
            sync(); samples.append((time.perf_counter() - t) / 5)
        samples.sort(); return samples[len(samples) // 2]
    return run


def kernel_rows(dev, large, reps):
    run, rows = timer(dev), []
    r = lambda *s: torch.rand(*s, device=dev) * 2 - 1
    n = 128
    gemms = [(n, 6272, 256), (n, 256, 6272), (n, 784, 400), (n, 400, 784)] + ([(4096, 4096, 4096)] if large else [])
    for m, k, o in gemms:
        x, w, b = r(m, k), r(o, k), r(o)
        rows.append(dict(kernel='linear_forward', shape=f'{m}x{k} · {o}x{k}ᵀ', flops=2.0 * m * k * o,
                         seconds=run(lambda: F.linear(x, w, b), reps)))
    for ci, h, co, s in [(1, 28, 32, 1), (32, 28, 64, 2), (64, 14, 128, 2), (32, 28, 1, 1)]:
        x, w, b = r(n, ci, h, h), r(co, ci, 3, 3), r(co)
        y = F.conv2d(x, w, b, s, 1); dy = r(*y.shape)
        fl = 2.0 * y.numel() * ci * 9
        sh = f'{n}x{ci}x{h}x{h} → {co} s{s}'
        rows.append(dict(kernel='conv2d_forward', shape=sh, flops=fl, seconds=run(lambda: F.conv2d(x, w, b, s, 1), reps)))
        rows.append(dict(kernel='conv2d_backward_data (= conv_transpose2d)', shape=sh, flops=fl, seconds=run(
            lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, s, 1), reps)))
        rows.append(dict(kernel='conv2d_backward_weight', shape=sh, flops=fl, seconds=run(
            lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, s, 1), reps)))
    sizes = [n * 32 * 28 * 28] + ([64 << 20] if large else [])
    for L in sizes:
        a, b2 = r(L), r(L)
        rows.append(dict(kernel='relu_forward', shape=str(L), flops=0.0, seconds=run(lambda: F.relu(a), reps)))
        rows.append(dict(kernel='axpy', shape=str(L), flops=2.0 * L, seconds=run(lambda: b2.add_(a, alpha=0.5), reps)))
        rows.append(dict(kernel='mse_forward', shape=str(L), flops=0.0,
                         seconds=run(lambda: F.mse_loss(a, b2, reduction='sum'), reps)))
    return rows


def train_rows(dev, steps, compile_too):
    run, rows = timer(dev), []
    torch.manual_seed(0)
    x = torch.rand(128, 1, 28, 28, device=dev)
    for arch, cls in [('mlp', MLP), ('conv', Conv), ('conv-bn', ConvBn)]:
        modes = ['eager'] + (['cuda-graph'] if dev == 'cuda' else []) + (['compile'] if compile_too else [])
        for mode in modes:
            model = cls().to(dev); opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=(mode == 'cuda-graph'))
            lossf = torch.compile(vae_loss) if mode == 'compile' else vae_loss
            eps = torch.randn(128, 20, device=dev)
            def step():
                opt.zero_grad(set_to_none=False); lossf(model, x, eps).backward(); opt.step()
            fn = step
            if mode == 'cuda-graph':
                s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3): step()
                torch.cuda.current_stream().wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g): step()
                fn = g.replay
            try:
                t = run(fn, steps, warmup=3)
            except Exception as e:  # torch.compile may be unavailable (no compiler on the machine)
                print(f'# {arch} {mode}: {type(e).__name__}: {str(e).splitlines()[0][:120]}'); continue
            rows.append(dict(arch=arch, mode=mode, step_ms=t * 1e3, epoch_s=t * 469, images_per_s=128 / t))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--json'); ap.add_argument('--large', action='store_true')
    ap.add_argument('--reps', type=int, default=50); ap.add_argument('--steps', type=int, default=20)
    ap.add_argument('--no-compile', action='store_true'); ap.add_argument('--threads', type=int, default=0)
    ap.add_argument('--steps-only', action='store_true', help='time only the training steps')
    a = ap.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    dev = a.device
    name = torch.cuda.get_device_name() if dev == 'cuda' else f'CPU ({torch.get_num_threads()} threads)'
    out = dict(device=f'PyTorch {torch.__version__} on {name}', kernels=[] if a.steps_only else kernel_rows(dev, a.large, a.reps),
               training=train_rows(dev, a.steps, not a.no_compile))
    for k in out['kernels']:
        gf = k['flops'] / k['seconds'] / 1e9
        print(f"{k['kernel']:<44} {k['shape']:<26} {k['seconds']*1e6:>11.1f} µs {gf:>10.1f} GFLOP/s")
    for t in out['training']:
        print(f"{t['arch']:<8} {t['mode']:<11} step {t['step_ms']:8.2f} ms  epoch {t['epoch_s']:7.2f} s  {t['images_per_s']:9.0f} img/s")
    if a.json:
        json.dump(out, open(a.json, 'w'), indent=1)


if __name__ == '__main__':
    main()
