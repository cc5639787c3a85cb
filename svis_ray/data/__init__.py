"""YouTube-VIS data: loading and validation (``ytvis``), sparse subsets and splits
(``sparsify``), the synthetic demo dataset (``demo``) and the Ray Data ingest (``ingest``)."""
