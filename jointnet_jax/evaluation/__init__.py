"""Evaluation: depth (the paper's affine-invariant protocol), generated images (FID / IS / CLIP score through
torchmetrics) and panorama coherence (intra-LPIPS, Table 2). The ``jointnet-evaluate`` CLI is
``jointnet_jax/evaluate.py``."""
