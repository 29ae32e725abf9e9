// Compile-only check of the torch-free CUDA kernels (see CMakeLists.txt).
