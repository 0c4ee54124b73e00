import pytest


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter-sized default tiles for the Triton kernels that pick their own (the
    kernel modules are imported here, after the test module has set TRITON_INTERPRET)."""
    from structrewrite.codegen.triton import sparse_lowrank as sl
    from structrewrite.codegen.triton import sparse_lowrank_block as blk
    monkeypatch.setattr(sl, "SPMM_DEFAULT", (16, 16, 0, 0, 4))
    monkeypatch.setattr(sl, "SDDMM_DEFAULT", ("mm", 16, 16, 16, 4, 2))
    monkeypatch.setattr(blk, "SPMM_DEFAULT", (16, 4, 2))
    monkeypatch.setattr(blk, "SDDMM_DEFAULT", (16, 0, 4, 2))
