"""Pure algorithms on arrays: Jigsaw++ puzzles, Lloyd k-means, HOG words, probes, whitening. No Ray."""
