"""Diffusion: noise schedules, the epsilon-prediction loss and EMA, training contexts, DDIM.

The model is any function `eps_fn(x_t, t, context) -> eps` (x_t (B, H, W, C) float32, t (B,) int32
in [0, T), context (B, L, d) float32), so this package does not depend on the U-Net.
`schedule` defines the forward process, `loss` the training objective, `conditioning` the "Adapt"
training context and the null context, and `sampler` the compiled DDIM + classifier-free-guidance
loop that generation runs.
"""
