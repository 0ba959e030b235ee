"""Plumbing the course's chapters rely on but do not teach: checkpoints of
random weights and measuring a load's memory in a fresh process
(:mod:`qlora_lab.support.checkpoints`)."""
