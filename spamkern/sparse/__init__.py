"""Sparse inference of pruned networks: block-sparse (BSR) and 2:4 Linear layers.

``BlockSparseLinear.from_dense(linear, block, mask)`` packs a pruned Linear;
``convert_to_block_sparse(model, masks, block)`` converts a whole model (``sk.compress``
uses it for block masks); ``bsr_linear`` is the op itself over every backend
(torch reference, C++ CPU, CUDA tensor cores, Triton). Layers run sparse only where
measurements on this card say it beats dense, and report their choice in ``last_choice``.
"""

from spamkern.sparse.convert import convert_to_block_sparse
from spamkern.sparse.decision import Choice
from spamkern.sparse.format import BlockSparseWeight, block_mask_from
from spamkern.sparse.layer import BlockSparseLinear
from spamkern.sparse.ops import bsr_linear
from spamkern.sparse.semi_structured import SemiStructuredLinear, is_2to4

__all__ = [
    "BlockSparseLinear",
    "BlockSparseWeight",
    "Choice",
    "SemiStructuredLinear",
    "block_mask_from",
    "bsr_linear",
    "convert_to_block_sparse",
    "is_2to4",
]
