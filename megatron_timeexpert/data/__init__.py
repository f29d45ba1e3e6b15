"""Training data for VTG: annotation readers, the sample type, the data set that decodes frames,
and the sharded, resumable, prefetching loader."""
