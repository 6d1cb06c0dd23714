"""A frozen backbone prefix and a disk cache of its activations (`cache.*` config keys).

`run` is what the trainer asks (frozen prefix, cached batches, the tail model, evaluation
features); `build` fills a cached set with seeded augmented views; `store` keys, writes and
memory-maps the sets. Import from the modules (`from msl_kit.train.prefix_cache.run import
FrozenPrefix`).
"""
