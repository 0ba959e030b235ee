"""Quantization: from a float to 4 bits (chapters 01, 02 and 03).

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.quant.floats`: FP32, FP16 and BF16 bit by bit, and the
   rounding that a float sum carries (chapter 01).
2. :mod:`qlora_lab.quant.int8`: absmax and zero-point 8-bit quantization, the
   seminar's worked examples, bit for bit bitsandbytes' (chapter 01).
3. :mod:`qlora_lab.quant.llm_int8`: LLM.int8(), vector-wise int8 with the
   outlier features held out in 16 bits (chapter 01).
4. :mod:`qlora_lab.quant.blockwise`: block-wise absmax quantization, written
   once for every code table (QLoRA Sec. 2, Eq. (1); chapters 01-03).
5. :mod:`qlora_lab.quant.nf4`: the 4-bit NormalFloat table, FP4 and Int4, and
   bitsandbytes' packing (QLoRA Sec. 3; chapter 02).
6. :mod:`qlora_lab.quant.fake_quant`: a whole model's weights through a data
   type, to compare data types on a real model (chapters 02 and 03).
7. :mod:`qlora_lab.quant.double_quant`: quantizing the quantization constants
   (QLoRA Sec. 3; chapter 03).

Import the module you read: ``from qlora_lab.quant import nf4``.
"""
