"""The paper's math and its backends: semantic bases and lenses (``semantics``), what every backend
shares (``contract``), deviations / gains / eof-layers and the backend table (``compute``), the C++ / CUDA op
(``cpp_op``; the Triton kernel is ``salf_engine.kernels``), and the deviation of a generated answer
(``responses``)."""
