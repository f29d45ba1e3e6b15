"""Training data for VTG: annotation readers, the sample type, the data set that decodes frames,
and the sharded, resumable, prefetching loader. See docs/DATA.md."""

from megatron_timeexpert.data.annotations import READERS, ReaderConfig, as_moment_queries, read_annotations
from megatron_timeexpert.data.dataset import FrameSample, VTGDataset
from megatron_timeexpert.data.loader import LoaderConfig, VTGBatch, VTGLoader
from megatron_timeexpert.data.stats import BadInputs, DataError
from megatron_timeexpert.data.types import Event, Task, VTGSample

__all__ = [
    "READERS",
    "BadInputs",
    "DataError",
    "Event",
    "FrameSample",
    "LoaderConfig",
    "ReaderConfig",
    "Task",
    "VTGBatch",
    "VTGDataset",
    "VTGLoader",
    "VTGSample",
    "as_moment_queries",
    "read_annotations",
]
