#!/usr/bin/env python3
"""PyTorch twins of the five tutorials behind `vae train --recipe`, and the fixtures that
`tests/recipes.rs` checks each recipe against.

For every recipe this builds the tutorial's own model (its modules, its names, its forward
pass, written out again here from the tutorial's text), sets every weight from a formula the
Rust test evaluates too, runs the tutorial's loss on a batch and noise made by formulas as
well, takes one step of the tutorial's optimizer, and writes what came out to
tests/fixtures/recipes/<recipe>.json: the state_dict's names and shapes (a checkpoint must
load strictly both ways), the objective and its two terms as the tutorial reduces them,
statistics of the decoder's output, and per parameter the gradient and the updated values
at a few positions. The fixtures are committed, so CI needs no PyTorch; run this again only
when a recipe changes:

    python3 bench/pytorch/recipe_twins.py            # writes tests/fixtures/recipes/*.json

The one deliberate departure: the MNIST notebook's KL, (sigma^2 + mu^2 - log sigma - 1/2).sum(),
is not the Gaussian KL; the twin uses the correct one, as the recipe does.
"""
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

# The twins compute in f64 from the f32 values vaecuda sees (weights, batch and noise are
# rounded to f32 first): the fixtures are the exact answer to what an f32 engine should get.
# (PyTorch's own f32 CPU backward of the CelebA network is 1.2% off in its first layer's
# gradient, through five batch norms; ours is within 0.01%.)
torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(__file__), '..', '..', 'tests', 'fixtures', 'recipes')
# The batch each twin runs: small enough for a quick test, and large enough that the mean
# reductions divide by something other than 1.
N = 16
# Positions sampled in every tensor: spread over it, fixed.
SAMPLES = 6


# ---- the formulas the Rust test repeats (tests/recipes.rs) ----

def wave(n, a, b, dtype=torch.float64):
    """sin(a*i + b) for i in 0..n, in f64."""
    return torch.sin(torch.arange(n, dtype=dtype) * a + b)


def set_weights(model):
    """Every floating parameter, in sorted-name order k: scale * sin(0.37 i + 0.11 k + 0.3), with
    scale 1/sqrt(numel/shape[0]) for tensors of 2+ dimensions and 0.1 for vectors; a batch norm's
    weight (a `.weight` beside a `.running_mean`) is 1 + that. Buffers keep PyTorch's initial values (running mean 0, variance 1)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, name in enumerate(sorted(params)):
            p = params[name]
            n = p.numel()
            scale = 1.0 / math.sqrt(n / p.shape[0]) if p.dim() >= 2 else 0.1
            v = scale * wave(n, 0.37, 0.11 * k + 0.3)
            if is_bn_weight(name, model.state_dict()):
                v = 1.0 + v
            p.copy_(v.to(torch.float32).to(torch.float64).view(p.shape))


def is_bn_weight(name, state):
    """A batch norm's scale: a `.weight` beside a `.running_mean`."""
    return name.endswith('.weight') and name[:-len('weight')] + 'running_mean' in state


def batch(shape):
    """Pixels in [0.05, 0.95]: 0.5 + 0.45 sin(0.0123 i + 0.2)."""
    n = math.prod(shape)
    return (0.5 + 0.45 * wave(n, 0.0123, 0.2)).to(torch.float32).to(torch.float64).view(shape)


def noise(n, z):
    """The reparameterization noise: 1.5 sin(0.917 j + 0.4)."""
    return (1.5 * wave(n * z, 0.917, 0.4)).to(torch.float32).to(torch.float64).view(n, z)


def kl_sum_per_image(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), 1)


# ---- the tutorials' models ----

class MlpVae(nn.Module):
    """pytorch/examples' VAE, also the iThome and Lightning tutorials' (fc1, fc21, fc22, fc3, fc4)."""

    def __init__(self, d=784, h=400, z=20):
        super().__init__()
        self.fc1, self.fc21, self.fc22 = nn.Linear(d, h), nn.Linear(h, z), nn.Linear(h, z)
        self.fc3, self.fc4 = nn.Linear(z, h), nn.Linear(h, d)

    def forward(self, x, eps):
        h = torch.relu(self.fc1(x.view(x.shape[0], -1)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + eps * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(torch.relu(self.fc3(z)))).view(x.shape), mu, logvar


class ConvEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(128 * 7 * 7, 256)
        self.fc21, self.fc22 = nn.Linear(256, 20), nn.Linear(256, 20)

    def forward(self, x):
        for c in (self.conv1, self.conv2, self.conv3):
            x = F.relu(c(x))
        h = F.relu(self.fc1(x.flatten(1)))
        return self.fc21(h), self.fc22(h)


class ConvDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 256), nn.Linear(256, 128 * 7 * 7)
        self.conv1 = nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1)
        self.conv2 = nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1)
        self.conv3 = nn.ConvTranspose2d(32, 1, 3, stride=1, padding=1)

    def forward(self, z):
        x = F.relu(self.fc2(F.relu(self.fc1(z)))).view(-1, 128, 7, 7)
        return torch.sigmoid(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x))))))


class ConvVae(nn.Module):
    """The conv VAE tutorial (encoder.conv1..3, encoder.fc1/fc21/fc22, decoder.fc1/fc2/conv1..3)."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = ConvEncoder(), ConvDecoder()

    def forward(self, x, eps):
        mu, logvar = self.encoder(x)
        return self.decoder(mu + eps * torch.exp(0.5 * logvar)), mu, logvar


class MnistTutorialEncoder(nn.Module):
    def __init__(self, z):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.batch2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=0)
        self.linear1 = nn.Linear(3 * 3 * 32, 128)
        self.linear2, self.linear3 = nn.Linear(128, z), nn.Linear(128, z)

    def forward(self, x, eps):
        x = F.relu(self.conv1(x))
        x = F.relu(self.batch2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.linear1(torch.flatten(x, start_dim=1)))
        mu, sigma = self.linear2(x), torch.exp(self.linear3(x))
        z = mu + sigma * eps
        # The Gaussian KL (the notebook's own expression is not one; see the module doc).
        kl = (sigma ** 2 / 2 + mu ** 2 / 2 - torch.log(sigma) - 0.5).sum()
        return z, kl


class MnistTutorialDecoder(nn.Module):
    def __init__(self, z):
        super().__init__()
        self.decoder_lin = nn.Sequential(nn.Linear(z, 128), nn.ReLU(True), nn.Linear(128, 3 * 3 * 32), nn.ReLU(True))
        self.unflatten = nn.Unflatten(dim=1, unflattened_size=(32, 3, 3))
        self.decoder_conv = nn.Sequential(
            nn.ConvTranspose2d(32, 16, 3, stride=2, output_padding=0), nn.BatchNorm2d(16), nn.ReLU(True),
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(8), nn.ReLU(True),
            nn.ConvTranspose2d(8, 1, 3, stride=2, padding=1, output_padding=1))

    def forward(self, z):
        return torch.sigmoid(self.decoder_conv(self.unflatten(self.decoder_lin(z))))


class MnistTutorialVae(nn.Module):
    """VAE_mnist.ipynb's VariationalAutoencoder (latent 4)."""

    def __init__(self, z=4):
        super().__init__()
        self.encoder, self.decoder = MnistTutorialEncoder(z), MnistTutorialDecoder(z)


class CelebaTutorialVae(nn.Module):
    """DL-Demos' VAE for 64x64 faces (hiddens 16..256, latent 128, a ReLU after the last conv)."""

    def __init__(self, hiddens=(16, 32, 64, 128, 256), latent_dim=128):
        super().__init__()
        prev, side, blocks = 3, 64, []
        for c in hiddens:
            blocks.append(nn.Sequential(nn.Conv2d(prev, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()))
            prev, side = c, side // 2
        self.encoder = nn.Sequential(*blocks)
        flat = prev * side * side
        self.mean_linear, self.var_linear = nn.Linear(flat, latent_dim), nn.Linear(flat, latent_dim)
        self.decoder_projection = nn.Linear(latent_dim, flat)
        self.decoder_input_chw = (prev, side, side)
        blocks = []
        for i in range(len(hiddens) - 1, 0, -1):
            blocks.append(nn.Sequential(
                nn.ConvTranspose2d(hiddens[i], hiddens[i - 1], 3, stride=2, padding=1, output_padding=1),
                nn.BatchNorm2d(hiddens[i - 1]), nn.ReLU()))
        blocks.append(nn.Sequential(
            nn.ConvTranspose2d(hiddens[0], hiddens[0], 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(hiddens[0]), nn.ReLU(), nn.Conv2d(hiddens[0], 3, 3, stride=1, padding=1), nn.ReLU()))
        self.decoder = nn.Sequential(*blocks)

    def forward(self, x, eps):
        encoded = torch.flatten(self.encoder(x), 1)
        mean, logvar = self.mean_linear(encoded), self.var_linear(encoded)
        z = eps * torch.exp(logvar / 2) + mean
        y = self.decoder_projection(z).reshape(-1, *self.decoder_input_chw)
        return self.decoder(y), mean, logvar


# ---- each recipe: model, data shape, loss as the tutorial writes it, optimizer ----

def bce_sum_objective(model, x, eps):
    y, mu, logvar = model(x, eps)
    recon = F.binary_cross_entropy(y, x, reduction='sum')
    kl = kl_sum_per_image(mu, logvar).sum()
    return recon + kl, recon, kl, y


def mnist_tutorial_objective(model, x, eps):
    z, kl = model.encoder(x, eps)
    y = model.decoder(z)
    recon = ((x - y) ** 2).sum()
    return recon + kl, recon, kl, y


def celeba_objective(model, x, eps):
    y, mean, logvar = model(x, eps)
    recon = F.mse_loss(y, x)
    kl = torch.mean(kl_sum_per_image(mean, logvar), 0)
    return recon + kl * 0.00025, recon, kl, y


RECIPES = {
    'mlp': dict(model=lambda: MlpVae(784, 400, 20), shape=(N, 1, 28, 28), z=20, objective=bce_sum_objective,
                adam=dict(lr=1e-3), batch_size=128, epochs=10),
    'conv': dict(model=ConvVae, shape=(N, 1, 28, 28), z=20, objective=bce_sum_objective, adam=dict(lr=1e-3),
                 batch_size=128, epochs=10),
    'lightning-mlp': dict(model=lambda: MlpVae(784, 256, 2), shape=(N, 1, 28, 28), z=2, objective=bce_sum_objective,
                          adam=dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-08, weight_decay=1e-5), batch_size=64,
                          epochs=10),
    'mnist-conv-bn': dict(model=MnistTutorialVae, shape=(N, 1, 28, 28), z=4, objective=mnist_tutorial_objective,
                          adam=dict(lr=1e-3, weight_decay=1e-5), batch_size=256, epochs=50),
    'celeba': dict(model=CelebaTutorialVae, shape=(N, 3, 64, 64), z=128, objective=celeba_objective,
                   adam=dict(lr=0.005), batch_size=16, epochs=10),
}


def positions(numel):
    """SAMPLES positions spread over a tensor (the Rust test picks the same)."""
    return sorted({(i * 2654435761 + 12345) % numel for i in range(SAMPLES)})


def twin(name, spec):
    torch.manual_seed(0)
    model = spec['model']()
    model.train()
    set_weights(model)
    state_names = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    x, eps = batch(spec['shape']), noise(spec['shape'][0], spec['z'])
    opt = torch.optim.Adam(model.parameters(), **spec['adam'])
    opt.zero_grad()
    loss, recon, kl, y = spec['objective'](model, x, eps)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    opt.step()
    params = {}
    for k, p in model.named_parameters():
        g = grads[k].flatten().double()
        pos = positions(p.numel())
        params[k] = dict(
            grad_norm=g.norm().item(), grad_max=g.abs().max().item(), positions=pos,
            grad=[g[i].item() for i in pos], updated=[p.detach().flatten()[i].item() for i in pos])
    buffers = {k: dict(sum=b.double().sum().item()) for k, b in model.named_buffers() if b.is_floating_point()}
    yd = y.detach().double()
    group = opt.param_groups[0]
    # What one Adam step cannot tell apart (its first move is lr·sign(g) whatever the betas),
    # the settings must say: the optimizer's hyperparameters as PyTorch filled them in, and
    # the tutorial's batch size and epochs.
    hyper = dict(lr=group['lr'], betas=list(group['betas']), eps=group['eps'], weight_decay=group['weight_decay'],
                 batch_size=spec['batch_size'], epochs=spec['epochs'])
    return dict(
        recipe=name, torch=torch.__version__, batch=list(spec['shape']), latent=spec['z'], hyper=hyper,
        state_dict=state_names, objective=loss.item(), recon_term=recon.item(), kl_term=kl.item(),
        output_sum=yd.sum().item(), output_sq_sum=(yd ** 2).sum().item(),
        params=params, buffers_after=buffers)


def compact_json(fixture):
    """One key a line, and one line per parameter and buffer: small files, readable diffs."""
    lines = []
    for k, v in fixture.items():
        if isinstance(v, dict) and k in ('params', 'buffers_after'):
            inner = ',\n'.join(f'  {json.dumps(name)}: {json.dumps(p)}' for name, p in v.items())
            lines.append(f' {json.dumps(k)}: {{\n{inner}\n }}')
        else:
            lines.append(f' {json.dumps(k)}: {json.dumps(v)}')
    return '{\n' + ',\n'.join(lines) + '\n}\n'


def main():
    os.makedirs(OUT, exist_ok=True)
    only = sys.argv[1:] or list(RECIPES)
    for name in only:
        fixture = twin(name, RECIPES[name])
        path = os.path.join(OUT, f'{name}.json')
        with open(path, 'w') as f:
            f.write(compact_json(fixture))
        print(f'{path}: objective {fixture["objective"]:.6f} ({len(fixture["state_dict"])} state_dict entries)')


if __name__ == '__main__':
    main()
