"""Caption and image encoders: towers that map data to unit vectors for embedding stores.

`text.TextEncoder` is all-MiniLM-L6-v2 (the sentence-transformers model, run in Flax) and
`clip.ClipEncoder` any Flax CLIP checkpoint. Both expose `dim` and `encode_text`; CLIP also
`encode_images`. Every output row is float32 with unit L2 norm, so inner products are cosines.
"""
