"""The neural memory's math as plain PyTorch functions, without Hugging Face imports: the memory network
(`memory_network.py`), the chunked scan and the decoding step (`neural_memory.py`), and the per-token reference
they are tested against (`naive.py`)."""
