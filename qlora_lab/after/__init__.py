"""After finetuning: using an adapter (chapter 08).

Read it in this order; each module is one idea:

1. :mod:`qlora_lab.after.chat`: base model + adapter: chatting, and one base
   serving several adapters by switching them.
2. :mod:`qlora_lab.after.export`: merging the adapter into the weights, and
   exporting to transformers' format and to GGUF for llama.cpp.
3. :mod:`qlora_lab.after.gguf`: the GGUF file itself: llama.cpp's tensor
   names, the rotary permutation, f16 and Q8_0 tensors, the tokenizer's
   metadata; written with llama.cpp's ``gguf`` package and read back.

Import the module you read: ``from qlora_lab.after import chat``.
"""
