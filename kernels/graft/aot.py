"""Ahead-of-time compilation of the graft kernel for a CUDA target, on any machine (no GPU needed): what the
GPU would run, for the PTX checks in the tests and the instruction counts in bench/bench_kernel.py.

Example:
    >>> from graftcore.kernels.aot import compile_graft, sass_per_element
    >>> k = compile_graft(90, "bfloat16", ("bfloat16", "bfloat16", "bfloat16"))   # doctest: +SKIP
    >>> "fma" in k.asm["ptx"], sass_per_element(k)                                  # doctest: +SKIP
    (False, 26.0)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .triton_graft import MAX_DELTAS, triton_graft_kernel

OUT_KIND = {"float32": (0, "*i32"), "float16": (1, "*i16"), "bfloat16": (2, "*i16")}
IN_TYPE = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*i16"}  # bf16 travels as its int16 bits


def compile_graft(
    capability: int,
    out_dtype: str,
    in_dtypes: tuple[str, ...],
    alphas: tuple[float, ...] = (0.5,),
    block: int = 1024,
    warps: int = 4,
):
    """The kernel compiled for sm_`capability` as the launcher would launch it: I, B, T1.. of `in_dtypes`
    (I, B, then one per delta), every pointer 16-byte aligned and the length a multiple of 16 (Triton
    specialises on both at launch), no FMA contraction. Returns Triton's CompiledKernel (`.asm["ptx"]`,
    `.asm["cubin"]`)."""
    names = triton_graft_kernel.arg_names
    i_type, b_type, *t_types = (IN_TYPE[d] for d in in_dtypes)
    n = len(t_types)
    kind, out_type = OUT_KIND[out_dtype]
    pointers = {"out_ptr": out_type, "i_ptr": i_type, "b_ptr": b_type, "counts_ptr": "*i64"}
    pointers.update({f"t{k + 1}_ptr": t_types[k] if k < n else b_type for k in range(MAX_DELTAS)})
    signature = {
        a: pointers.get(a) or ("i64" if a == "n_elements" else "fp32" if a.startswith("alpha") else "constexpr")
        for a in names
    }
    constants = {
        "N_DELTAS": n,
        "OUT_KIND": kind,
        "BLOCK_SIZE": block,
        "I_BF16_BITS": in_dtypes[0] == "bfloat16",
        "B_BF16_BITS": in_dtypes[1] == "bfloat16",
    }
    for k in range(MAX_DELTAS):
        constants[f"ALPHA{k + 1}_IS_ONE"] = k >= n or alphas[min(k, len(alphas) - 1)] == 1.0
        constants[f"T{k + 1}_BF16_BITS"] = k < n and t_types[k] == "*i16"
    aligned = [*pointers, "n_elements"]
    source = ASTSource(
        fn=triton_graft_kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned},
    )
    target = GPUTarget("cuda", capability, 32)
    return triton.compile(source, target=target, options={"num_warps": warps, "enable_fp_fusion": False})


def sass(kernel) -> list[str]:
    """The kernel's SASS instructions (NOP padding left out), disassembled with the cuobjdump Triton ships."""
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    lines = [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(.*?);", text)]
    return [line for line in lines if not line.startswith("NOP")]


def sass_per_element(kernel, block: int = 1024, warps: int = 4) -> float:
    """SASS instructions per element on the common path (a block without NaN/Inf results: everything up to its
    EXIT), per thread, divided by the elements each thread handles."""
    code = sass(kernel)
    common = next((k + 1 for k, line in enumerate(code) if line.endswith("EXIT")), len(code))
    return common / (block / (warps * 32))


def compile_fp8(capability: int, block: tuple[int, int] = (128, 128), warps: int = 4):
    """The FP8 graft kernel (triton_fp8.py) compiled for sm_`capability`: Base FP8, tuned bf16, F32 scales, one
    delta with alpha != 1 (so the multiply is in it), no FMA contraction."""
    from .triton_fp8 import BF16_BITS, FP8, SCALE_F32, fp8_graft_kernel

    names = fp8_graft_kernel.arg_names
    pointers = {
        "q_ptr": "*u8",
        "s_out_ptr": "*fp32",
        "norms_ptr": "*fp32",
        "counts_ptr": "*i64",
        "i_ptr": "*u8",
        "i_s_ptr": "*fp32",
        "b_ptr": "*u8",
        "b_s_ptr": "*fp32",
        "t_ptr": "*i16",
        "t_s_ptr": "*fp32",
    }
    scalars = {"rows": "i64", "cols": "i64", "grid_cols": "i64", "alpha": "fp32"}
    constants = {
        "B_KIND": FP8,
        "T_KIND": BF16_BITS,
        "ALPHA_IS_ONE": False,
        "SCALE_KIND": SCALE_F32,
        "POWER_OF_TWO": False,
        "BH": block[0],
        "BW": block[1],
        "TILE_H": triton.next_power_of_2(block[0]),
        "TILE_W": triton.next_power_of_2(block[1]),
    }
    signature = {a: pointers.get(a) or scalars.get(a) or "constexpr" for a in names}
    source = ASTSource(
        fn=fp8_graft_kernel,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constants.items()},
        attrs={(names.index(a),): [["tt.divisibility", 16]] for a in pointers},
    )
    return triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps, "enable_fp_fusion": False}
    )
