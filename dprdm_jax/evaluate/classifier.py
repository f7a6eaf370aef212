"""The measuring stick: a classifier of the offline domains, and hit-rates of generated images.

No Inception or CLIP weights install offline, so the project trains its own evaluation network:
an MLP on pixels over 60 classes, the 50 public classes (digits 0-9, animals 10-19, clothing
emoji 20-49) and the 10 Fashion-MNIST classes (50-59). It trains on the public training split
and on the EVEN positions of Fashion-MNIST's test split; its test accuracy is measured per
domain on the public test split and the ODD positions of Fashion-MNIST test. The emoji classes
are there so that a garment drawn in the public emoji style counts as public, not as a hit.
Fashion-MNIST train, the private retrieval set, is never used, so the classifier holds nothing of
the records whose privacy is measured.

On generated images (the `dprdm generate` output directories):
- class hit-rate: the share of images the classifier assigns to the prompt's class (prompts are
  the class captions of `data.offline`, e.g. "a photo of a sneaker");
- domain hit-rate: the share assigned to any class of the prompt's domain (Fashion-MNIST for a
  Fashion-MNIST prompt).
Each comes with its binomial standard error sqrt(p (1 - p) / n).

Augmentation (shifts of up to 2 pixels, Gaussian pixel noise of std 0.1 on the [-1, 1] scale)
keeps it from keying on exact pixel statistics that a generator does not reproduce.

Training follows the trainers' shared idiom (training.py: checkpoints, resuming, metrics.jsonl,
TensorBoard events and loss.svg in the work directory).
"""

import dataclasses
import functools
import json
import pathlib
from typing import Iterator, Optional, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dprdm_jax import checkpoints
from dprdm_jax import errors
from dprdm_jax import metrics_writer
from dprdm_jax import sample
from dprdm_jax import training
from dprdm_jax.data import offline

_PUBLIC = len(offline.class_captions("public"))
DOMAINS = {"public": range(0, _PUBLIC),
           "fashion_mnist": range(_PUBLIC, _PUBLIC + len(offline.class_captions("fashion_mnist")))}
CONFIG_FILE = "classifier.json"


def class_captions() -> tuple[str, ...]:
  """The caption of each class, in class order: the public classes, then Fashion-MNIST's."""
  return offline.class_captions("public") + offline.class_captions("fashion_mnist")


def domain_of(label: int) -> str:
  return next(name for name, labels in DOMAINS.items() if label in labels)


class Classifier(nnx.Module):
  """uint8 images (n, R, R, 1) -> logits (n, classes): an MLP on the pixels."""

  def __init__(self, pixels: int, width: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(pixels, width, rngs=rngs)
    self.middle = nnx.Linear(width, width // 2, rngs=rngs)
    self.out = nnx.Linear(width // 2, len(class_captions()), rngs=rngs)

  def features(self, x: jax.Array) -> jax.Array:
    """The penultimate layer (n, width // 2) of pixels x (n, pixels) in [-1, 1]: the feature
    space of the distribution metrics (metrics.py)."""
    return nnx.gelu(self.middle(nnx.gelu(self.hidden(x))))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of pixels x (n, pixels) in [-1, 1]."""
    return self.out(self.features(x))


def _pixels(images: np.ndarray) -> np.ndarray:
  return np.asarray(images).reshape(len(images), -1).astype(np.float32) / 127.5 - 1.0


def splits(resolution: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """(images, labels) of "train" and of "test_public" and "test_fashion_mnist"."""
  pub_train = offline.load("public", "train", resolution)
  pub_test = offline.load("public", "test", resolution)
  fashion = offline.load("fashion_mnist", "test", resolution)
  even = np.arange(len(fashion.labels)) % 2 == 0
  return {
      "train": (np.concatenate([pub_train.images, fashion.images[even]]),
                np.concatenate([pub_train.labels, fashion.labels[even] + _PUBLIC])),
      "test_public": (pub_test.images, pub_test.labels),
      "test_fashion_mnist": (fashion.images[~even], fashion.labels[~even] + _PUBLIC),
  }


def _augment(key, x, resolution):
  shift_key, noise_key = jax.random.split(key)
  shifts = jax.random.randint(shift_key, (2,), -2, 3)
  images = x.reshape(x.shape[0], resolution, resolution)
  images = jnp.roll(images, (shifts[0], shifts[1]), axis=(1, 2))
  return images.reshape(x.shape) + 0.1 * jax.random.normal(noise_key, x.shape)


def _model(shape: dict) -> training.NnxModel:
  """The classifier of `shape` (CONFIG_FILE: pixels, width) as an NnxModel."""
  return training.NnxModel(lambda seed: Classifier(shape["pixels"], shape["width"],
                                                   nnx.Rngs(seed)))


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
             start: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The batch of every step from `start` on: rows drawn with replacement by one numpy generator
  seeded with `seed`. The draws of the steps before `start` are made again and dropped, so a
  resumed run reads the batches an uninterrupted one would."""
  rng = np.random.default_rng(seed)
  for _ in range(start):
    rng.integers(0, len(x), batch_size)
  while True:
    rows = rng.integers(0, len(x), batch_size)
    yield x[rows], y[rows]


def train(config: ml_collections.ConfigDict, workdir, stop_after: Optional[int] = None
          ) -> Optional[dict]:
  """Trains (or resumes) the classifier in `workdir` and returns its per-domain test accuracy.

  A workdir whose latest checkpoint is the last step is not trained further: its accuracy is
  measured again. stop_after: return None once the checkpoint of this step is written, as a
  preemption there would (a preemption returns None too); a later call resumes from there.
  """
  c = config.classifier
  workdir = pathlib.Path(workdir).absolute()
  errors.make_directory(workdir)
  data = splits(config.data.resolution)
  x, y = _pixels(data["train"][0]), data["train"][1]
  shape = dict(pixels=int(x.shape[1]), width=c.width)
  config_path = workdir / CONFIG_FILE
  if config_path.exists() and json.loads(config_path.read_text()) != shape:
    raise errors.InputError(f"{workdir} holds a classifier of another shape; use a fresh work "
                            "directory")
  config_path.write_text(json.dumps(shape))

  model = _model(shape)
  schedule = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, min(100, c.steps // 10),
                                                c.steps)
  tx = optax.adamw(schedule, weight_decay=1e-4)
  resolution = config.data.resolution

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, batch):
    images, labels = batch
    key = jax.random.key(state["step"])  # the augmentation of step i draws from key(i)

    def loss_fn(params):
      logits = model(params)(_augment(key, images, resolution))
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state["step"]))
    return training.apply_gradients(state, grads, tx), metrics

  def init():
    return training.init_state(model.init_params(c.seed), tx)

  with checkpoints.Checkpoints(workdir, every=c.checkpoint_every, last=c.steps,
                               keep=c.keep_checkpoints, stop_after=stop_after) as saved:
    start, state = training.restore_or_init(saved, jax.eval_shape(init), jax.jit(init))
    with metrics_writer.MetricsWriter(workdir, name="dprdm train-classifier", total=c.steps,
                                      start=start, examples_per_step=c.batch_size) as metrics:
      _, step = training.run(train_step, state, _batches(x, y, c.batch_size, c.seed, start),
                             start=start, total=c.steps, log_every=c.log_every,
                             checkpoints=saved, metrics=metrics,
                             meta=lambda step: dict(step=step, config=config.to_json()))
  if step < c.steps:
    return None
  classifier = load(workdir)
  figures = {f"accuracy_{name[5:]}": float((classifier.predict(images) == labels).mean())
             for name, (images, labels) in data.items() if name.startswith("test_")}
  figures["test_sizes"] = {name[5:]: len(labels) for name, (_, labels) in data.items()
                           if name.startswith("test_")}
  (workdir / "eval.json").write_text(json.dumps(figures, indent=1))
  return figures


@dataclasses.dataclass
class Loaded:
  model: Classifier

  def _batched(self, fn, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(_pixels(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])

  def predict(self, images: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Class labels (n,) of uint8 images (n, R, R, 1)."""
    return self._batched(lambda x: jnp.argmax(self.model(x), -1), images, batch_size)

  def features(self, images: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Penultimate-layer features (n, width // 2) float32 of uint8 images (n, R, R, 1)."""
    return self._batched(self.model.features, images, batch_size)


def load(workdir) -> Loaded:
  """The classifier of the latest checkpoint of `train` in `workdir`."""
  workdir = pathlib.Path(workdir).absolute()
  if not (workdir / CONFIG_FILE).exists():
    raise errors.MissingError(f"{workdir} holds no evaluation classifier; run `dprdm "
                              "train-classifier` first")
  model = _model(json.loads((workdir / CONFIG_FILE).read_text()))
  restored = checkpoints.restore_latest(workdir, {"params": model.abstract_params})
  if restored is None:
    raise errors.MissingError(f"{workdir}/checkpoints holds no complete checkpoint; run `dprdm "
                              "train-classifier` first")
  return Loaded(model(restored[1]["params"]))


def read_generated(directory) -> tuple[list[dict], np.ndarray]:
  """The records (records.jsonl) and images (n, R, R, C) uint8 of a `dprdm generate` output
  (C = 1 for grayscale PNGs, 3 for RGB)."""
  directory = pathlib.Path(directory)
  path = directory / "records.jsonl"
  if not path.is_file():
    raise errors.MissingError(f"{directory} holds no records.jsonl of `dprdm generate`")
  records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
  return records, np.stack([sample.read_png(directory / r["image"]) for r in records])


def hit_rates(classifier: Loaded, prompts: Sequence[str], images: np.ndarray) -> dict:
  """Class and domain hit-rates (with standard errors) of images generated for class prompts.

  Raises ValueError if a prompt is not one of the class captions.
  """
  captions = {caption: label for label, caption in enumerate(class_captions())}
  unknown = sorted(set(prompts) - set(captions))
  if unknown:
    raise errors.InputError(f"prompt {unknown[0]!r} is not a class caption; hit-rates need class "
                            "prompts")
  want = np.array([captions[p] for p in prompts])
  got = classifier.predict(images)
  same_domain = np.array([domain_of(int(a)) == domain_of(int(b)) for a, b in zip(want, got)])

  def rate(hits):
    p = float(np.mean(hits))
    return p, float(np.sqrt(p * (1 - p) / len(hits)))

  class_rate, class_se = rate(want == got)
  domain_rate, domain_se = rate(same_domain)
  per_class = {class_captions()[c]: float(np.mean(got[want == c] == c)) for c in np.unique(want)}
  return dict(images=len(prompts), class_hit_rate=class_rate, class_hit_rate_se=class_se,
              domain_hit_rate=domain_rate, domain_hit_rate_se=domain_se, per_class=per_class,
              chance_class=1 / len(captions))
