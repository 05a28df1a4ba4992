"""The float code paths of the toy world's CPU runs, pinned so that a seed builds the same world, byte for byte, and
make demo prints the same table on every x86-64 CPU with AVX2 (AVX2 or AVX-512, Intel or AMD): what each pins and
what it costs is in docs/toy_world.md#determinism. Each is read once, when torch loads or at a library's first call,
so they must be in the environment before `import torch`: 00_make_toy.py sets them at its top when it runs as a
script (imported as a module, into a process where torch may already run, it cannot), and the Makefile exports them
for make demo and make study (`python cpu_pins.py` prints them as NAME=VALUE). Standard library only."""
import os

PINS = {
    # torch's own kernels (elementwise, reductions, softmax, attention, the RNG's normal): their AVX2 build, also on
    # AVX-512 CPUs, where torch would pick the AVX-512 one
    "ATEN_CPU_CAPABILITY": "avx2",
    # MKL's GEMM (every linear layer): the code branch MKL documents as reproducible on Intel and compatible (AMD)
    # CPUs alike; its AVX2 branch is honoured on Intel only (on AMD MKL runs its AUTO branch)
    "MKL_CBWR": "COMPATIBLE",
    # MKL's thread count as the process sets it, not lowered per call: outside STRICT mode (AVX2+ branches only) its
    # results depend on the count
    "MKL_DYNAMIC": "FALSE",
    # oneDNN's convolution (the vision tower's patch embedding) and GELU (the projector's): its AVX2 code
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def pin(environ=os.environ):
    environ.update(PINS)


if __name__ == "__main__":
    print(" ".join(f"{k}={v}" for k, v in PINS.items()))
