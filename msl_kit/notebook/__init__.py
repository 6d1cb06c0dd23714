"""What the notebooks call: models, snapshots and embeddings of a run (`explore`), and the
sliders, live curves and snapshot explorers (`widgets`)."""
