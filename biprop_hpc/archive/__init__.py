"""Run archives (HDF5): writing one per run, reading them back, aggregating many."""
from biprop_hpc.archive.run_archive import (METRICS, SCHEMA_VERSION, STATUSES, ArchiveError, RunRecord,
                                            read_archive, write_archive)

__all__ = ["METRICS", "SCHEMA_VERSION", "STATUSES", "ArchiveError", "RunRecord", "read_archive", "write_archive"]
