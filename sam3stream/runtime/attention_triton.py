"""The Triton source of runtime/attention_kernel.py's kernel; imported only where Triton is.

Kept apart so that the rest of the package never imports Triton, and at module level because
Triton's compiler resolves the names a kernel uses (``tl``, the helper below) among the module's
globals, not in an enclosing function's scope. Parameters without a ``tl.constexpr`` annotation
are left unannotated (and mypy told so in pyproject.toml): Triton reads annotations as its own
type hints, not Python's.
"""

import triton
import triton.language as tl


@triton.jit
def exp2_f16x2(x):
    """2**x in half precision, two lanes per MUFU instruction."""
    return tl.inline_asm_elementwise(
        "ex2.approx.f16x2 $0, $1;", "=r,r", [x], dtype=tl.float16, is_pure=True, pack=2
    )


@triton.jit
def attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, qk_scale,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    heads, seq_q,
    SEQ_K: tl.constexpr, HEAD_DIM: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_N: tl.constexpr, FAST_EXP: tl.constexpr, SUM_BY_DOT: tl.constexpr,
):  # fmt: skip
    """One [BLOCK_M, HEAD_DIM] tile of softmax(q k^T * scale) v, streaming over the keys.

    ``qk_scale`` is the softmax scale times log2(e), so that exp2 gives the exponentials. With
    SUM_BY_DOT, WIDTH is 2 * HEAD_DIM and the value tile is [V | 1 | 0...]: the column of ones
    makes the second matmul also give each row's sum of probabilities.
    """
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    wide = tl.arange(0, WIDTH)

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :],
        mask=rows[:, None] < seq_q,
        other=0.0,
    )
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, WIDTH], tl.float32)
    for start_n in range(0, SEQ_K, BLOCK_N):
        keys = start_n + cols
        k_ptrs = k_base + keys[None, :] * stride_kn + dims[:, None]
        v_ptrs = v_base + keys[:, None] * stride_vn + wide[None, :]
        in_v = wide[None, :] < HEAD_DIM
        if EVEN_N:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs, mask=in_v, other=0.0)
        else:
            k = tl.load(k_ptrs, mask=keys[None, :] < SEQ_K, other=0.0)
            v = tl.load(v_ptrs, mask=in_v & (keys[:, None] < SEQ_K), other=0.0)
        if SUM_BY_DOT:
            v = tl.where(wide[None, :] == HEAD_DIM, 1.0, v).to(v_ptr.dtype.element_ty)
        s = tl.dot(q, k)
        if not EVEN_N:
            s = tl.where(keys[None, :] < SEQ_K, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        x = s * qk_scale - m_new[:, None]
        if FAST_EXP:  # noqa: SIM108 (a compile-time branch: only one side is compiled)
            p = exp2_f16x2(x.to(tl.float16))
        else:
            p = tl.math.exp2(x)
        alpha = tl.math.exp2(m_i - m_new)
        if not SUM_BY_DOT:
            l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_ptr.dtype.element_ty), v)
        m_i = m_new
    if SUM_BY_DOT:
        l_i = tl.sum(tl.where(wide[None, :] == HEAD_DIM, acc, 0.0), 1)
    out = acc / l_i[:, None]
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + wide[None, :]
    keep = (rows[:, None] < seq_q) & (wide[None, :] < HEAD_DIM)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=keep)
