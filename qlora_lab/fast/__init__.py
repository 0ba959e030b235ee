"""Speed, not course material.

Each module here does what a readable function elsewhere in the package defines,
faster, and a test proves the two equal (bit for bit where the reference is exact,
within a stated tolerance where only the order of floating-point operations
differs). Read the chapters' modules to learn QLoRA; read these to see what was
worth optimising on a 2-core CPU, and by how much.

- :mod:`qlora_lab.fast.nf4`: ``quantize_4bit`` and ``dequantize_4bit`` of
  :mod:`qlora_lab.quant.nf4`, the same bits from the pieces below; the training path
  (``qlora.LinearNF4``, ``qlora.quantize_model``) runs it eagerly, and so does
  chapter 02's fake quantization of whole models (``qlora_lab.quant.fake_quant``).
  It quantizes ``QUANTIZE_CHUNK`` (about a million) values at a time, so that
  its temporaries are 13 MiB that ``malloc`` recycles instead of 208 MiB of
  fresh memory per 4096 x 4096 call (133 ms became 55 ms, same bits).
  ``make bench`` on the course's idle 2-core machine (2026-11-30, 2 threads,
  4096 x 4096 float32, median of 21 rounds, ``bench/RESULTS.md``): quantize
  54.5 ms against the readable definition's 379.1 ms and bitsandbytes' 293.0
  ms (5.38x bitsandbytes); dequantize 16.2 ms against 127.4 ms readable and
  23.1 ms bitsandbytes (1.40x). The readable definition under
  ``torch.compile(fullgraph=True)`` came to 243.0 ms and 38.3 ms in the same
  run, so the hand-written path stays on the training path; under
  ``torch.compile`` ``qlora.DequantizeLinear`` traces the readable one.
- :mod:`qlora_lab.fast.nearest`: the nearest code by a 65,536-cell table
  (upper 16 bits of the float32) and one comparison, instead of
  ``torch.bucketize``'s binary search per value on one core. Reference:
  ``blockwise.nearest_code``. Measured 4.4x faster on 16.8 M values (636 ms
  against 2,817 ms, one thread, under a load average of about 21).
- :mod:`qlora_lab.fast.decode`: one gather in a 256-entry byte-pair table
  decodes both nibbles of a byte, outputs in 2 MiB pages (numpy's
  ``MADV_HUGEPAGE``), large tensors split between Python threads that run
  with one OpenMP thread meanwhile (two OpenMP teams on two cores had made
  the decode take 14.5 to 18.7 ms from one process to the next, now 11.8 to
  13.6 ms). Reference: ``nf4.dequantize_4bit``. Measured 8.4x faster (131 ms
  against 1,097 ms, one thread, under a load average of about 21); the
  threads only pay on an idle machine: with two threads under that load the
  decode fell to 0.42x bitsandbytes, so busy machines should run with
  ``torch.set_num_threads(1)``.
- ``fast.nf4.absmax_4bit`` / ``scale_4bit``: absmax by two reductions and
  scaling into one preallocated float32 output, instead of the readable padded
  copies of ``blockwise``. Measured 3.3x faster together (240 ms against 802
  ms, one thread, same load).
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
