"""Data: dataset readers, the validation split held out from training data, rank-sharded batches."""
from biprop_hpc.lazy import lazy_names

# Imported on first use: the command line imports data.check without torch.
__getattr__ = lazy_names(__name__, {"Batch": "batches", "EvalBatches": "batches", "TrainBatches": "batches",
                                    "DATASETS": "datasets", "DataSplits": "datasets", "load_splits": "datasets",
                                    "DatasetMissing": "readers"})

__all__ = ["Batch", "DATASETS", "DataSplits", "DatasetMissing", "EvalBatches", "TrainBatches", "load_splits"]
