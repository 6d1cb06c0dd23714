"""Training: the config and its checks, the recipe (the one seam from a config to the parts),
the trainer and its loop (`engine`), evaluation, run folders, checkpoints, distributed helpers.
Import from the modules (`from msl_kit.train import engine`; `engine.train(cfg, out)`)."""
