"""Quantization: from a float to 4 bits (chapters 01, 02 and 03).

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.quant.floats`: FP32, FP16 and BF16 bit by bit, and the
   rounding that a float sum carries (chapter 01).
2. :mod:`qlora_lab.quant.int8`: absmax 8-bit quantization, per tensor, per
   row, static and block-wise, the seminar's worked example, bit for bit
   bitsandbytes' (chapter 01).
3. :mod:`qlora_lab.quant.zeropoint`: zero-point 8-bit quantization and a linear
   layer computed on zero-point operands, the seminar's identity (chapter 01).
4. :mod:`qlora_lab.quant.llm_int8`: LLM.int8(), vector-wise int8 with the
   outlier features held out in 16 bits (chapter 01).
5. :mod:`qlora_lab.quant.blockwise`: block-wise absmax quantization, written
   once for every code table (QLoRA Sec. 2, Eq. (1); chapters 01-03).
6. :mod:`qlora_lab.quant.codes`: the data types as code tables: the 4-bit
   NormalFloat from quantiles of N(0, 1), FP4 and Int4, and their k-bit
   relatives (QLoRA Sec. 3, Eq. (4); chapter 02).
7. :mod:`qlora_lab.quant.nf4`: block-wise 4-bit quantization with those
   tables, packed two indices a byte as bitsandbytes does (QLoRA Sec. 3;
   chapter 02).
8. :mod:`qlora_lab.quant.fake_quant`: a whole model's weights through a data
   type, to compare data types on a real model (chapters 02 and 03).
9. :mod:`qlora_lab.quant.double_quant`: quantizing the quantization constants
   (QLoRA Sec. 3; chapter 03).

Import the module you read: ``from qlora_lab.quant import nf4``.
"""
