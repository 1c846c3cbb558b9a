"""C++/CUDA sources of the optional torch ops (package data, built on demand)."""
