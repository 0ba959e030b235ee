"""Speed, not course material.

Each module here does what a readable function elsewhere in the package defines,
faster, and a test proves the two equal (bit for bit where the reference is exact,
within a stated tolerance where only the order of floating-point operations
differs). Read the chapters' modules to learn QLoRA; read these to see what was
worth optimising on a 2-core CPU. What each choice gained, with the shape, the
threads and the date it was measured, is in ``bench/speed_choices.md`` (part of
``bench/RESULTS.md``); ``make bench`` measures the whole path against bitsandbytes.

- :mod:`qlora_lab.fast.nf4`: ``quantize_4bit`` and ``dequantize_4bit`` of
  :mod:`qlora_lab.quant.nf4`, the same bits from the pieces below; the training path
  (``qlora.LinearNF4``, ``qlora.quantize_model``) runs it eagerly, and so does
  chapter 02's fake quantization of whole models (``qlora_lab.quant.fake_quant``).
  It quantizes ``QUANTIZE_CHUNK`` (about a million) values at a time, so that
  its temporaries are a few MiB that ``malloc`` recycles instead of hundreds of
  MiB of fresh memory per call. The readable definition under
  ``torch.compile(fullgraph=True)`` was slower than this path, so the hand-written
  path stays on the training path; under ``torch.compile``
  ``qlora.DequantizeLinear`` traces the readable one.
- :mod:`qlora_lab.fast.nearest`: the nearest code by a 65,536-cell table
  (upper 16 bits of the float32) and one comparison, instead of
  ``torch.bucketize``'s binary search per value on one core. Reference:
  ``blockwise.nearest_code``.
- :mod:`qlora_lab.fast.decode`: one gather in a 256-entry byte-pair table
  decodes both nibbles of a byte, outputs in 2 MiB pages (numpy's
  ``MADV_HUGEPAGE``), large tensors split between Python threads that run
  with one OpenMP thread meanwhile (two OpenMP teams on two cores fight for
  them). Reference: ``nf4.dequantize_4bit``. The threads only pay on an idle
  machine: busy machines should run with ``torch.set_num_threads(1)``.
- ``fast.nf4.absmax_4bit`` / ``scale_4bit``: absmax by two reductions and
  scaling into one preallocated float32 output, instead of the readable padded
  copies of ``blockwise``.
- :mod:`qlora_lab.fast.loss`: the training loss with the output layer applied only
  where a label is (the reference: ``model(**batch).loss``). SmolLM2's output layer
  is a fifth of the model's multiplications (28.3M of 134.5M weights), and the
  course trains on the assistant's tokens only, so most of that fifth is skipped.
- :mod:`qlora_lab.fast.lora`: LoRA's scaled update added in one pass over the
  output (``torch.add(result, update, alpha=scaling)``) instead of peft's two
  (``result + update * scaling``), used by :class:`qlora_lab.lora.LoRALinear`
  only where the two round the same (a power-of-two ``alpha / r``).
"""
