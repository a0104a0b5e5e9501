"""Runnable examples built on llama3_kernels (``python -m llama3_kernels.examples.<name>``).

- ``train_llama``: a small LLaMA-style language model on ``TritonLlama3Block`` (or the
  pure-PyTorch ``TorchLlama3Block`` with the same weights), trained on synthetic tokens on
  one process or under ``torchrun`` with DistributedDataParallel or FSDP2.
- ``export_c``: writes a Hugging Face ``LlamaForCausalLM`` in the file format that the C program
  ``examples/generate.c`` (greedy decoding with a KV cache on the C ABI) reads.
"""
