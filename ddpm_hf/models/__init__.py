"""Models on disk: the UNet, the VAE of latent models, saving and loading pipeline folders,
converting checkpoints of the original code."""
