"""Data: dataset readers, the validation split held out from training data, rank-sharded batches."""
from biprop_hpc.data.batches import Batch, EvalBatches, TrainBatches
from biprop_hpc.data.datasets import DATASETS, DataSplits, load_splits
from biprop_hpc.data.readers import DatasetMissing

__all__ = ["Batch", "DATASETS", "DataSplits", "DatasetMissing", "EvalBatches", "TrainBatches", "load_splits"]
