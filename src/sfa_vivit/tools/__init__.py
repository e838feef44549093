"""Tools over the library: `evaluate` (a checkpoint on prepared data), `membench` (step time and peak memory
per frame count), `costmodel` (FLOPs of a step and a run), `summary` (`sfa info`, `sfa smoke`) and
`synth_vit` (the synthetic recipe's image ViT, what ImageNet is to the paper's runs)."""
