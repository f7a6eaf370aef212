"""`dprdm train-encoder`: train the default image tower on public data, aligned to the text tower.

The text tower (MiniLM) is frozen. Each public training image is pulled towards its class
caption's embedding and away from the other public classes' (a softmax over the class captions
with a learned temperature: LiT's contrastive loss with the batch's captions deduplicated). Caption
embeddings are mean-centred over the caption vocabulary of the offline datasets (class names
only: the private classes' names are prompts, not private records) before normalising.

Privacy: the tower never sees a private record. Its evaluation on the private domain (zero-shot
accuracy on Fashion-MNIST's test split, retrieval accuracy on its train split) is a measurement by
the curator, done once here and written to the work directory; it does not change the tower, so
the key function stays independent of the private data (rule R1 and the README's assumptions).

Training follows the trainers' shared idiom (training.py): the train state (step, the tower's
and the temperature's parameters, the optimizer state) is checkpointed (checkpoints.py) every
`checkpoint_every` steps, at the end and on preemption; a rerun resumes from the latest one and,
the data stream being a function of (seed, step), ends with the parameters an uninterrupted run
would have. Metrics (metrics_writer.py): loss and batch accuracy (means since the previous record),
learning rate, gradient norm and throughput in metrics.jsonl and TensorBoard events, and loss.svg.
"""

import functools
import json
import pathlib
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dprdm_jax import checkpoints
from dprdm_jax import errors
from dprdm_jax import metrics_writer
from dprdm_jax import training
from dprdm_jax.data import offline
from dprdm_jax.data import pipeline
from dprdm_jax.encoders import image as image_lib
from dprdm_jax.encoders import linear as linear_lib
from dprdm_jax.encoders import text as text_lib


class _Contrastive(nnx.Module):
  """The image tower (params["tower"] in the train state, which `image.load` reads) and the
  learned inverse temperature of the contrastive softmax, as log scale."""

  def __init__(self, config: image_lib.TowerConfig, seed: int):
    self.tower = image_lib.ImageTower(config, nnx.Rngs(seed))
    self.log_scale = nnx.Param(jnp.log(10.0))


def text_space(text: text_lib.TextEncoder) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(centre, class caption embeddings per dataset), all centred on the caption vocabulary."""
  center = text.fit_center(list(offline.caption_vocabulary()))
  classes = {name: text.encode_text(list(offline.class_captions(name)), center=center)
             for name in ("public", "fashion_mnist")}
  return center, classes


def _tower_config(config: ml_collections.ConfigDict, dim: int) -> image_lib.TowerConfig:
  return image_lib.TowerConfig(width=config.encoder.width, depth=config.encoder.depth, dim=dim,
                               in_channels=1, resolution=config.data.resolution)


def retrieval_accuracy(prompt_embeddings: np.ndarray, prompt_labels: np.ndarray,
                       keys: np.ndarray, key_labels: np.ndarray, k: int) -> float:
  """Share of each prompt's k nearest keys (inner product, exact) whose class is the prompt's."""
  scores = prompt_embeddings @ keys.T
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  return float((key_labels[top] == prompt_labels[:, None]).mean())


def train(config: ml_collections.ConfigDict, workdir, stop_after: Optional[int] = None
          ) -> Optional[dict]:
  """Trains (or resumes) the tower in `workdir` and returns the evaluation figures.

  stop_after: return None once the checkpoint of this step is written, as a preemption at that
    point would leave the work directory (a preemption returns None too); a later call resumes
    from there.
  """
  workdir = pathlib.Path(workdir).absolute()
  errors.make_directory(workdir)
  enc = config.encoder
  text = text_lib.TextEncoder.load()
  center, class_embeddings = text_space(text)
  tower_config = _tower_config(config, text.dim)
  config_path = workdir / image_lib.CONFIG_FILE
  if config_path.exists() and image_lib.TowerConfig.from_json(config_path.read_text()) != (
      tower_config):
    raise errors.InputError(f"{workdir} holds a tower of another shape; use a fresh work directory")
  config_path.write_text(tower_config.to_json())

  model = training.NnxModel(lambda seed: _Contrastive(tower_config, seed))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, enc.learning_rate, enc.warmup_steps, enc.steps, end_value=enc.learning_rate * 0.01)
  tx = optax.adamw(schedule, weight_decay=enc.weight_decay)
  targets = jnp.asarray(class_embeddings["public"])

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, batch):
    def loss_fn(params):
      contrastive = model(params)
      logits = jnp.exp(contrastive.log_scale[...]) * contrastive.tower(batch["image"]) @ targets.T
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, (logits.argmax(-1) == batch["label"]).mean()
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    metrics = dict(loss=loss, train_accuracy=accuracy, grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state["step"]))
    return training.apply_gradients(state, grads, tx), metrics

  def init():
    return training.init_state(model.init_params(enc.seed), tx)

  public_train = offline.load("public", "train", config.data.resolution)
  with checkpoints.Checkpoints(workdir, every=enc.checkpoint_every, last=enc.steps,
                               keep=enc.keep_checkpoints, stop_after=stop_after) as saved:
    start, state = training.restore_or_init(saved, jax.eval_shape(init), jax.jit(init))
    batches = pipeline.TrainBatches(public_train, enc.batch_size, enc.seed, start_step=start,
                                    transform=lambda b: dict(image=b["image"], label=b["label"]))
    with metrics_writer.MetricsWriter(workdir, name="dprdm train-encoder", total=enc.steps,
                                      start=start, examples_per_step=enc.batch_size,
                                      mean_of=("loss", "train_accuracy")) as metrics:
      _, step = training.run(train_step, state, batches, start=start, total=enc.steps,
                             log_every=enc.log_every, checkpoints=saved, metrics=metrics,
                             meta=lambda step: dict(step=step, config=config.to_json()))
  if step < enc.steps:
    return None
  # The value embedding of the default (encoders/linear.py): a closed-form fit, seconds. A tower
  # already there is kept, as the trained tower is: a U-Net trained on it (or a release's tower
  # copied in, launch/local.sh) reads that one, and a refit elsewhere may differ in the last bit.
  if not (workdir / linear_lib.FILE).exists():
    linear_lib.fit(public_train.images, class_embeddings["public"][public_train.labels],
                   enc.linear_dim).save(workdir)
  return evaluate(config, workdir, text, center, class_embeddings)


def evaluate(config, workdir, text, center, class_embeddings) -> dict:
  """Zero-shot and retrieval accuracies of the trained towers; written to eval.json.

  Retrieval accuracy of image keys: the prompt, mapped into the image space (the contrastive
  tower's space is the text space itself; the linear tower maps it with its prompt map), against
  the private records' image embeddings.
  """
  workdir = pathlib.Path(workdir)
  encoder = image_lib.load(workdir)
  linear = linear_lib.load(workdir)
  public_test = offline.load("public", "test", config.data.resolution)
  fashion_test = offline.load("fashion_mnist", "test", config.data.resolution)
  fashion_train = offline.load("fashion_mnist", "train", config.data.resolution)
  k = config.encoder.eval_neighbors
  prompts = class_embeddings["fashion_mnist"]
  prompt_labels = np.arange(len(prompts))
  image_keys = encoder.encode_images(fashion_train.images)
  caption_keys = text.encode_text(list(offline.class_captions("fashion_mnist")), center=center)[
      fashion_train.labels]
  figures = {
      "zero_shot_accuracy_public_test": image_lib.zero_shot_accuracy(
          encoder, public_test.images, public_test.labels, class_embeddings["public"]),
      "zero_shot_accuracy_fashion_mnist_test": image_lib.zero_shot_accuracy(
          encoder, fashion_test.images, fashion_test.labels, class_embeddings["fashion_mnist"]),
      f"retrieval_accuracy_image_keys_top{k}": retrieval_accuracy(
          prompts, prompt_labels, image_keys, fashion_train.labels, k),
      f"retrieval_accuracy_caption_keys_top{k}": retrieval_accuracy(
          prompts, prompt_labels, caption_keys, fashion_train.labels, k),
      f"retrieval_accuracy_linear_image_keys_top{k}": retrieval_accuracy(
          linear.encode_prompts(prompts), prompt_labels,
          linear.encode_images(fashion_train.images), fashion_train.labels, k),
      "chance": {"public": 1 / len(class_embeddings["public"]),
                 "fashion_mnist": 1 / len(prompts)},
  }
  (workdir / "eval.json").write_text(json.dumps(figures, indent=1))
  return figures
