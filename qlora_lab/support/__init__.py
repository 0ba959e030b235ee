"""Plumbing the course's chapters rely on but do not teach.

- :mod:`qlora_lab.support.atomic`: writing a directory all at once (adapters,
  training checkpoints, random-weight checkpoints, the SmolLM2 cache).
- :mod:`qlora_lab.support.loading`: ``quiet_loading``, loading a model without
  progress bars and info logs.
- :mod:`qlora_lab.support.checkpoints`: checkpoints of random weights and
  measuring a load's memory in a fresh process.
- :mod:`qlora_lab.support.bitsandbytes_cpu`: ``keep_compute_dtype_path``, one
  computation path for bitsandbytes' 4-bit layers on a CPU with AVX-512 BF16.
"""
