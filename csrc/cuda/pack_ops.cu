// Placeholder: CUDA implementations are registered here (TORCH_LIBRARY_IMPL(barber, CUDA, m)).
#include <torch/library.h>
