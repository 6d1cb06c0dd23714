"""The public path of the batch samplers (`from msl_kit.sampler import PKSampler`, DESIGN's
contract). They are defined beside the datasets they sample, in `msl_kit.datasets.sampling`."""

from msl_kit.datasets.sampling import CLASS_DRAWS, PKSampler, RandomBatchSampler

__all__ = ["CLASS_DRAWS", "PKSampler", "RandomBatchSampler"]
