"""Loading spamkern._C: a missing extension warns once and the torch path still runs;
the layer traces whole under torch.compile."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from sparse_helpers import rel_err
from torch import nn

from spamkern.sparse import BlockSparseLinear

ROOT = Path(__file__).resolve().parents[2]

_WITHOUT_EXTENSION = textwrap.dedent(
    """
    import importlib.abc, sys, warnings

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "spamkern._C":
                raise ImportError("simulated: extension not built")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from spamkern.sparse import BlockSparseWeight, bsr_linear
        from spamkern import dispatch
        w = BlockSparseWeight.from_dense(torch.randn(40, 48), 16)
        x = torch.randn(5, 48)
        for _ in range(3):
            y = bsr_linear(x, w)
    ours = [str(c.message) for c in caught if "spamkern._C" in str(c.message)]
    assert len(ours) == 1, ours
    assert "setup.py build_ext --inplace" in ours[0], ours[0]
    assert "cpp" not in dispatch.available_backends("bsr_linear")
    assert "simulated" in dispatch.load_errors()["spamkern._C"]
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w.to_dense()))
    print("OK")
    """
)


def test_missing_extension_warns_once_and_falls_back():
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_EXTENSION],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_layer_compiles_as_one_graph():
    gen = torch.Generator().manual_seed(12)
    lin = nn.Linear(128, 96)
    bmask = torch.rand(3, 4, generator=gen) < 0.5
    layer = BlockSparseLinear.from_dense(lin, 32, bmask, mode="sparse")
    x = torch.randn(8, 128, generator=gen)
    with torch.no_grad():
        y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        elem = bmask.repeat_interleave(32, 0).repeat_interleave(32, 1)
        w = (lin.weight * elem).double()
        ref = torch.nn.functional.linear(x.double(), w, lin.bias.double())
    assert rel_err(y, ref) < 1e-5
