"""Hot operations, each one function with a pure-torch reference and a dispatch point.

Fast versions (Triton in ``spamkern.kernels``, C++/CUDA in ``spamkern._C``) register
themselves under the same op name with :func:`spamkern.dispatch.register_impl`.
"""

from spamkern.ops.conv_gram import conv_patch_gram
from spamkern.ops.factors import gram
from spamkern.ops.precision import kron_curvature_diag, kron_precision_and_opd, precision_and_opd
from spamkern.ops.select import kth_smallest, segment_kth_smallest, threshold_for_sparsity

__all__ = [
    "conv_patch_gram",
    "gram",
    "kron_curvature_diag",
    "kron_precision_and_opd",
    "kth_smallest",
    "precision_and_opd",
    "segment_kth_smallest",
    "threshold_for_sparsity",
]
