"""Data. The read side (training and evaluation): `manifest` (a prepared dataset's manifest.json and its
shards), `reader` (clips sampled from the shards) and `augment` (the recipes' augmentations). The write
side, `prep`: the official annotation files and videos (or the synthetic dataset) into shards."""
