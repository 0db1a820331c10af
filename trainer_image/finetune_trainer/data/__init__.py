"""The trainer's data: dataset files read into records once, then each format's checks and tokens.

- :mod:`.records` reads files (JSONL, JSON, CSV, Parquet; local or on object storage) into records
  that remember their file and line, checks every record with its format's module (all problems
  reported as ``file:line: reason`` before any training starts) and holds out the eval split.
- One module per data format holds that format's record check and, for the causal-LM formats, its
  tokenization: :mod:`.prompt_completion`, :mod:`.chat`, :mod:`.text`, :mod:`.classification`,
  :mod:`.qa`, :mod:`.preference`.
- :mod:`.examples` turns records into token rows (:class:`~.examples.Example`) by format, and serves
  them as a dataset; :mod:`.packing` fills rows with several samples; :mod:`.collate` batches them.
"""
