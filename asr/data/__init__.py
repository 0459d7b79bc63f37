"""Data pipeline: JSON Lines manifests, on-the-fly features, bucketing sampler, augmentation."""
from asr.data.augment import AugmentConfig
from asr.data.dataset import Batch, ManifestDataset, collate
from asr.data.manifest import ManifestError, read_manifest, read_manifests, write_manifest
from asr.data.sampler import BucketingBatchSampler

__all__ = [
    "AugmentConfig", "Batch", "BucketingBatchSampler", "ManifestDataset", "ManifestError",
    "collate", "read_manifest", "read_manifests", "write_manifest",
]
