import math

import pytest
import torch
import torch.nn.functional as F

from core.positions import sincos_pos_embed_2d
from generators.layers import (
    Attention,
    LabelEmbedder,
    RMSNorm,
    SwiGLUFFN,
    VisionRoPE2D,
    make_ffn,
    modulate,
    timestep_embedding,
)


def rope_by_hand(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Rotate each adjacent pair of channels of each token, one complex number at a time.

    Pair j < head_dim/4 turns by row * theta_j, pair j >= head_dim/4 by col * theta_(j - head_dim/4),
    with theta_k = 10000^(-4k/head_dim); token n sits at (row, col) = divmod(n, grid).
    """
    T, D = x.shape
    quarter = D // 4
    out = torch.empty_like(x, dtype=torch.float64)
    for n in range(T):
        row, col = divmod(n, grid)
        for j in range(D // 2):
            k, pos = (j, row) if j < quarter else (j - quarter, col)
            angle = pos * 10000 ** (-4 * k / D)
            z = complex(x[n, 2 * j], x[n, 2 * j + 1]) * complex(math.cos(angle), math.sin(angle))
            out[n, 2 * j], out[n, 2 * j + 1] = z.real, z.imag
    return out


def test_rope_matches_independent_rotation():
    grid, head_dim = 4, 12
    rope = VisionRoPE2D(head_dim, grid)
    x = torch.randn(grid * grid, head_dim, dtype=torch.float64)
    got = rope(x.float()).double()
    assert torch.allclose(got, rope_by_hand(x, grid), atol=1e-5)


def test_rope_buffers_are_persistent_and_shaped():
    rope = VisionRoPE2D(72, 16)
    sd = rope.state_dict()
    assert set(sd) == {"freqs_cos", "freqs_sin"}
    assert sd["freqs_cos"].shape == sd["freqs_sin"].shape == (256, 72)


def test_rope_scores_depend_only_on_relative_position():
    grid, head_dim = 6, 8
    rope = VisionRoPE2D(head_dim, grid)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)

    def score(pq, pk):
        tq = torch.zeros(grid * grid, head_dim, dtype=torch.float64)
        tk = torch.zeros_like(tq)
        tq[pq[0] * grid + pq[1]] = q
        tk[pk[0] * grid + pk[1]] = k
        return (rope(tq)[pq[0] * grid + pq[1]] * rope(tk)[pk[0] * grid + pk[1]]).sum()

    assert torch.allclose(score((1, 2), (3, 1)), score((2, 4), (4, 3)))
    assert not torch.allclose(score((1, 2), (3, 1)), score((1, 2), (1, 3)))


def test_rope_rejects_head_dim_not_multiple_of_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        VisionRoPE2D(6, 4)


def test_rope_keeps_bf16():
    rope = VisionRoPE2D(8, 2)
    assert rope(torch.randn(2, 4, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 16))
    x = torch.randn(3, 5, 16) * 7
    want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    assert torch.allclose(norm(x).double(), want, atol=1e-5)
    assert norm.eps == 1e-6 and norm.weight.requires_grad
    xb = x.bfloat16()
    assert (norm.to(torch.bfloat16)(xb)).dtype == torch.bfloat16


def test_timestep_embedding_is_cos_then_sin_of_raw_t():
    t = torch.tensor([0.0, 0.37])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([10000 ** (-k / 4) for k in range(4)])
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert torch.allclose(emb[1], torch.cat([torch.cos(0.37 * freqs), torch.sin(0.37 * freqs)]))
    assert timestep_embedding(t, 9).shape == (2, 9)


def test_sincos_pos_embed_layout():
    dim, grid = 8, 3
    pe = sincos_pos_embed_2d(dim, grid)
    omega = torch.tensor([1.0, 0.01], dtype=torch.float64)  # 10000^(-k/2), k < dim/4
    row, col = 2, 1
    c, r = col * omega, row * omega
    want = torch.cat([c.sin(), c.cos(), r.sin(), r.cos()])
    assert pe.shape == (9, 8)
    assert torch.allclose(pe[row * grid + col], want)


def test_swiglu_is_silu_gate_times_value():
    ffn = SwiGLUFFN(6, 4)
    x = torch.randn(2, 6)
    w, b = ffn.w12.weight, ffn.w12.bias
    gate, value = x @ w[:4].T + b[:4], x @ w[4:].T + b[4:]
    want = (F.silu(gate) * value) @ ffn.w3.weight.T + ffn.w3.bias
    assert torch.allclose(ffn(x), want, atol=1e-6)


def test_ffn_sizes():
    swiglu = make_ffn(1152, 4.0, use_swiglu=True)
    assert swiglu.w12.weight.shape == (6144, 1152) and swiglu.w3.weight.shape == (1152, 3072)
    mlp = make_ffn(64, 4.0, use_swiglu=False)
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        "fc1.weight": (256, 64), "fc1.bias": (256,), "fc2.weight": (64, 256), "fc2.bias": (64,)
    }
    x = torch.randn(3, 64)
    want = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    assert torch.allclose(mlp(x), want, atol=1e-6)


def test_attention_with_rope_matches_manual_softmax():
    attn = Attention(16, 2, qk_norm=True, use_rmsnorm=True)
    rope = VisionRoPE2D(8, 2)
    x = torch.randn(3, 4, 16)
    q, k, v = attn.qkv(x).reshape(3, 4, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k = rope(attn.q_norm(q)), rope(attn.k_norm(k))
    o = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v
    want = attn.proj(o.transpose(1, 2).reshape(3, 4, 16))
    assert torch.allclose(attn(x, rope=rope), want, atol=1e-5)
    assert set(Attention(16, 2, qk_norm=True).state_dict()) >= {"q_norm.weight", "q_norm.bias", "k_norm.weight"}


def test_modulate_with_and_without_shift():
    x, shift, scale = torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4)
    assert torch.allclose(modulate(x, shift, scale), x * (1 + scale[:, None]) + shift[:, None])
    assert torch.allclose(modulate(x, None, scale), x * (1 + scale[:, None]))


def test_label_embedder_null_row_and_dropout():
    emb = LabelEmbedder(10, 4, dropout_prob=1.0)
    assert emb.embedding_table.weight.shape == (11, 4)
    labels = torch.tensor([3, 7])
    null = emb.embedding_table.weight[10]
    emb.eval()
    assert torch.equal(emb(labels), emb.embedding_table(labels))
    emb.train()
    assert torch.equal(emb(labels), null.expand(2, 4))
    emb.eval()
    out = emb(labels, force_drop_ids=torch.tensor([0, 1]))
    assert torch.equal(out[0], emb.embedding_table.weight[3]) and torch.equal(out[1], null)
    assert LabelEmbedder(10, 4, dropout_prob=0.0).embedding_table.weight.shape == (10, 4)
