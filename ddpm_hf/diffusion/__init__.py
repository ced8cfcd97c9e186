"""The diffusion maths: prediction types, losses, schedulers and the sampling loop, likelihoods, inpainting."""
