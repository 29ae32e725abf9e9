"""barber: a low-memory, streaming one-shot pruner for large language models.

Implements LLM-Barber (block-aware rebuild of sparsity masks with a weight x gradient
metric) on top of magnitude, Wanda and SparseGPT initial masks, reading Hugging Face
checkpoints one transformer block at a time.
"""

__version__ = "0.1.0"
