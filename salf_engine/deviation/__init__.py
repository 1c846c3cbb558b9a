"""The paper's math and its backends: semantic bases and lenses (``semantics``), what every backend
shares (``contract``), deviations / gains / eof-layers and the backend table (``compute``), the C++ / CUDA op
(``cpp_op``; the Triton kernel is ``salf_engine.kernels``), and the deviation of a generated answer
(``responses``). The old module ``salf_engine.deviation``'s names stay importable from here."""

from salf_engine._moved import lazy_exports

__getattr__, __dir__ = lazy_exports("salf_engine.deviation.compute")
