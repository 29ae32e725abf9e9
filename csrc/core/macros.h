// Project-wide macros of the torch-free core (csrc/core): the same headers compile with
// g++ (CPU ops, gtests) and nvcc (CUDA kernels).
#pragma once

#ifndef BARBER_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define BARBER_HOST_DEVICE __host__ __device__
#else
#define BARBER_HOST_DEVICE
#endif
#endif

// Full unrolling of a loop with a compile-time trip count.
#ifndef BARBER_UNROLL
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)  // nvcc device pass
#define BARBER_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__) || defined(__HIPCC__)  // nvcc host pass: its front end knows no GCC pragmas
#define BARBER_UNROLL
#elif defined(__GNUC__) && !defined(__clang__)
#define BARBER_UNROLL _Pragma("GCC unroll 16")
#elif defined(__clang__)
#define BARBER_UNROLL _Pragma("unroll")
#else
#define BARBER_UNROLL
#endif
#endif
