"""Models and data built for pipeline parallelism: a chunked GPT and a byte-level corpus."""

from pipeschedule.training.models.chardata import BYTE_VOCAB_SIZE, load_corpus, microbatches, window_order
from pipeschedule.training.models.generate import generate
from pipeschedule.training.models.gpt import GPTChunk, GPTConfig, build_gpt_chunks, make_forward_step

__all__ = [
    "BYTE_VOCAB_SIZE",
    "GPTChunk",
    "GPTConfig",
    "build_gpt_chunks",
    "generate",
    "load_corpus",
    "make_forward_step",
    "microbatches",
    "window_order",
]
