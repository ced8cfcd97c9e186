"""Image metrics: Inception/DINOv2 features and FID/KID."""
