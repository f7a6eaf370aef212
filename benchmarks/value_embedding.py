"""Which value embedding lets a public-trained generator draw an unseen domain? A cheap proxy.

A design measurement behind configs/default.py (README, "The embedded default"), run before
training any U-Net: for each candidate value embedding, fitted on PUBLIC images only,
  1. a linear decoder (least squares, fitted on public images) maps an embedding back to pixels;
  2. for each Fashion-MNIST class, a DP context is formed as the generator would receive it: the
     first k records of the class in a fresh Poisson subsample at rate q (caption keys retrieve
     exactly the class), their mean, plus Gaussian noise with sigma calibrated to epsilon = 10 over
     T = 1,000 queries at delta = 1/60,000 (PLD);
  3. the decoded context is classified by an MLP trained on public train + the even half of
     Fashion-MNIST test (30 classes), and "hit" means the prompted class.
The hit-rate of the decoded context bounds what a generator that reads the context faithfully can
reach; the contrastive tower (the previous default, 384-d, aligned to 20 public class captions) is
the peer. Also printed: the same classifier on single Fashion-MNIST test images decoded from
their own embeddings (no DP). 20 contexts per class and setting; about 3 minutes on 2 cores.

  python benchmarks/value_embedding.py [--tower runs/default/encoder]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dprdm_jax.data import offline
from dprdm_jax.encoders import image as image_lib
from dprdm_jax.privacy import accounting


def pixels(source):
  r = source.read(np.arange(len(source)))
  return r["image"].reshape(len(source), -1).astype(np.float32) / 127.5 - 1, r["label"]


def mlp_classifier(x, y, steps=3000):
  def init(key, sizes):
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
      key, k = jax.random.split(key)
      params.append((jax.random.normal(k, (a, b)) * np.sqrt(2 / a), jnp.zeros(b)))
    return params

  def forward(params, x):
    for w, b in params[:-1]:
      x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b

  params = init(jax.random.key(0), [x.shape[1], 512, 256, 30])
  opt = optax.adamw(1e-3, weight_decay=1e-4)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb, key):
    xb = xb + 0.1 * jax.random.normal(key, xb.shape)
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(forward(p, xb), yb).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(0)
  for i in range(steps):
    idx = rng.integers(0, len(x), 256)
    params, state = step(params, state, x[idx], y[idx], jax.random.key(i))
  return lambda z: np.asarray(jnp.argmax(forward(params, z), -1)), rng


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tower", default="runs/default/encoder",
                      help="work directory of `dprdm train-encoder` (the contrastive peer)")
  args = parser.parse_args()
  t0 = time.time()
  xp, yp = pixels(offline.load("public", "train"))
  xpt, ypt = pixels(offline.load("public", "test"))
  xf, yf = pixels(offline.load("fashion_mnist", "train"))
  xft, yft = pixels(offline.load("fashion_mnist", "test"))
  predict, rng = mlp_classifier(np.concatenate([xp, xft[:5000]]),
                                np.concatenate([yp, yft[:5000] + 20]))
  print(f"classifier accuracy: public test {(predict(xpt) == ypt).mean():.3f}, Fashion-MNIST test "
        f"(second half) {(predict(xft[5000:]) == yft[5000:] + 20).mean():.3f}; "
        f"{time.time() - t0:.0f} s", flush=True)
  mean = xp.mean(0)
  _, _, vt = np.linalg.svd(xp - mean, full_matrices=False)
  delta = 1 / 60000
  candidates = [(f"linear (PCA) d={d}", d, lambda x, w=vt[:d].T: (x - mean) @ w)
                for d in (16, 32, 64, 128)]
  tower = image_lib.load(args.tower)
  to_uint8 = lambda x: np.round((x + 1) * 127.5).astype(np.uint8).reshape(-1, 32, 32, 1)
  candidates.append(("contrastive tower d=384", 384,
                     lambda x: tower.encode_images(to_uint8(x))))
  print("embedding | q | k | sigma | noise norm | DP-context hit-rate | single-image decoded "
        "accuracy")
  for name, d, raw in candidates:
    unit = lambda x: raw(x) / np.linalg.norm(raw(x), axis=1, keepdims=True)
    ep, ef = unit(xp), unit(xf)
    design = np.concatenate([ep, np.ones((len(ep), 1))], 1)
    decoder = np.linalg.lstsq(design, xp, rcond=None)[0]
    decode = lambda e: np.clip(np.concatenate([e, np.ones((len(e), 1))], 1) @ decoder, -1, 1)
    single = (predict(decode(unit(xft[5000:]))) == yft[5000:] + 20).mean()
    for q, k in ((0.01, 16), (0.01, 64), (0.05, 16), (0.05, 64), (0.05, 128), (0.1, 64)):
      sigma = 2 * accounting.calibrate_noise_multiplier(10.0, q, 1000, delta, "pld") / k
      hits = []
      for c in range(10):
        members = np.flatnonzero(yf == c)
        for _ in range(20):
          sampled = members[rng.random(len(members)) < q][:k]
          context = ef[sampled].sum(0) / k + sigma * rng.standard_normal(d)
          hits.append(predict(decode(context[None]))[0] == c + 20)
      print(f"{name} | {q} | {k} | {sigma:.4f} | {sigma * np.sqrt(d):.2f} | {np.mean(hits):.2f} | "
            f"{single:.2f}", flush=True)


if __name__ == "__main__":
  main()
