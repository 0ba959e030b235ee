"""Speed, not course material.

Each module here does what a readable function elsewhere in the package defines,
faster, and a test proves the two equal (bit for bit where the reference is exact,
within a stated tolerance where only the order of floating-point operations
differs). Read the chapters' modules to learn QLoRA; read these to see what was
worth optimising on a 2-core CPU, and by how much.

- :mod:`qlora_lab.fast.loss`: the training loss with the output layer applied only
  where a label is (the reference: ``model(**batch).loss``). SmolLM2's output layer
  is a fifth of the model's multiplications (28.3M of 134.5M weights), and the
  course trains on the assistant's tokens only, so most of that fifth is skipped.
  Its gain was not measured on a quiet machine; chapter 07's step count was cut at
  the same time, so the README's before/after times mix the two.
- :mod:`qlora_lab.fast.lora`: LoRA's scaled update added in one pass over the
  output (``torch.add(result, update, alpha=scaling)``) instead of peft's two
  (``result + update * scaling``), used by :class:`qlora_lab.lora.LoRALinear`
  only where the two round the same (a power-of-two ``alpha / r``). About 10 %
  of a SmolLM2 QLoRA training step on 2 cores (``bench/train_step.py``, measured
  under other load).
"""
