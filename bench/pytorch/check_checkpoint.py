#!/usr/bin/env python3
"""Checkpoints move both ways between vaecuda and PyTorch.

1. vaecuda -> PyTorch: a checkpoint written by `vae train` loads into the PyTorch model of the
   same architecture with `load_state_dict(strict=True)`, and PyTorch's encoder gives the same
   latent means as `vae latent` wrote in its CSV (f32 on both sides: agreement to ~1e-4).
2. PyTorch -> vaecuda: the same weights saved by `safetensors.torch.save_file` (no vaecuda
   metadata) load into `vae latent --arch ...`, whose CSV must match PyTorch's means too.

Needs torch and safetensors. Usage:
  python3 bench/pytorch/check_checkpoint.py --vae target/release/vae --run runs/mlp --arch mlp
"""
import argparse, csv, gzip, os, subprocess, sys, tempfile

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(__file__))
from torch_bench import MLP, Conv, ConvBn  # noqa: E402

MODELS = {'mlp': MLP, 'conv': Conv, 'conv-bn': ConvBn}


def mnist_test_images(data_dir, n):
    with gzip.open(os.path.join(data_dir, 't10k-images-idx3-ubyte.gz')) as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return torch.from_numpy(raw[:n * 784].astype(np.float32) / 255.0).view(n, 1, 28, 28)


def latent_csv(vae, checkpoint, extra, n, out):
    subprocess.run([vae, 'latent', '--device', 'cpu', '--checkpoint', checkpoint, '--limit-test', str(n),
                    '--out', out] + extra, check=True, stdout=subprocess.DEVNULL)
    with open(out[:-4] + '.csv') as f:
        rows = list(csv.DictReader(f))
    z = [k for k in rows[0] if k.startswith('z')]
    return torch.tensor([[float(r[k]) for k in z] for r in rows])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--vae', default='target/release/vae')
    p.add_argument('--run', required=True, help='run directory or checkpoint written by vae train')
    p.add_argument('--arch', required=True, choices=MODELS)
    p.add_argument('--data', default='data/mnist')
    p.add_argument('-n', type=int, default=500)
    a = p.parse_args()
    ckpt = os.path.join(a.run, 'best.safetensors') if os.path.isdir(a.run) else a.run

    state = load_file(ckpt)
    model = MODELS[a.arch]().eval()
    model.load_state_dict(state, strict=True)
    print(f'{ckpt}: {len(state)} tensors load into PyTorch {type(model).__name__} (strict)')
    with torch.no_grad():
        mu_torch, _ = model.encode(mnist_test_images(a.data, a.n))

    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        mu_ours = latent_csv(a.vae, ckpt, [], a.n, os.path.join(tmp, 'ours.png'))
        d1 = (mu_ours - mu_torch).abs().max().item()
        print(f'vaecuda -> PyTorch: max |mu_vaecuda - mu_torch| over {a.n} test images = {d1:.2e}')
        exported = os.path.join(tmp, 'from_torch.safetensors')
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, exported)
        mu_back = latent_csv(a.vae, exported, ['--arch', a.arch], a.n, os.path.join(tmp, 'back.png'))
        d2 = (mu_back - mu_torch).abs().max().item()
        print(f'PyTorch -> vaecuda (no metadata, --arch {a.arch}): max |mu| difference = {d2:.2e}')
        worst = max(d1, d2)
    # The CSV keeps 6 decimals; f32 encoders summed in different orders differ by ~1e-5.
    tol = 1e-4
    print('ok' if worst < tol else f'FAILED: difference {worst:.2e} above {tol:.0e}')
    sys.exit(0 if worst < tol else 1)


if __name__ == '__main__':
    main()
