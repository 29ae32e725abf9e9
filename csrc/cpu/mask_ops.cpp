// Placeholder: CPU implementations are registered here (TORCH_LIBRARY_IMPL(barber, CPU, m)).
#include <torch/library.h>
