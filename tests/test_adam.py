"""Adam against the textbook update, written out independently here."""
import numpy as np
import pytest

import ff_hybrid_mnist as ff
import ff_devices


def textbook_adam(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p * (1 - lr * wd)  # decoupled weight decay (AdamW)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def run_module_adam(p, grads, lr, wd=0.0):
    p = p.copy()
    opt = ff.Adam(p, weight_decay=wd)
    for g in grads:
        opt.step(p, g.copy(), lr)
    return p


def test_adam_one_and_three_steps():
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((6, 5))
    grads = [rng.standard_normal((6, 5)) * 10 ** rng.uniform(-9, 1, (6, 5)) for _ in range(3)]
    for n in (1, 3):
        for wd in (0.0, 0.01):
            want = textbook_adam(p0, grads[:n], 0.03, wd=wd)
            got = run_module_adam(p0, grads[:n], 0.03, wd=wd)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    # a first step moves every parameter by about lr against the sign of its gradient
    step = p0 - run_module_adam(p0, grads[:1], 0.03)
    big = np.abs(grads[0]) > 1e-4
    np.testing.assert_allclose(step[big], 0.03 * np.sign(grads[0][big]), rtol=1e-3)


def test_adam_updates_in_place():
    # a view shares p's memory, so it sees the step only if Adam writes into p itself
    p = np.ones((3, 3), np.float32)
    view = p[1:]
    opt = ff.Adam(p)
    opt.step(p, np.ones((3, 3), np.float32), 0.1)
    np.testing.assert_allclose(view, 0.9, rtol=1e-6)
    np.testing.assert_allclose(p, 0.9, rtol=1e-6)


def test_twenty_steps_match_textbook():
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(40)
    grads = [rng.standard_normal(40) for _ in range(20)]
    np.testing.assert_allclose(run_module_adam(p0, grads, 0.01), textbook_adam(p0, grads, 0.01),
                               rtol=1e-12)


def test_decayed_moments_are_flushed_before_they_turn_subnormal():
    p = np.ones(4, np.float32)
    opt = ff.Adam(p)
    opt.step(p, np.full(4, 1e-20, np.float32), 0.01)
    zero = np.zeros(4, np.float32)
    tiny = np.finfo(np.float32).tiny
    for _ in range(900):  # 0.9**900 * 1e-20 would be far below the smallest normal float32
        opt.step(p, zero, 0.01)
        assert not ((opt.m_acc != 0) & (np.abs(opt.m_acc) < tiny)).any()
    assert (opt.m_acc == 0).all()


def test_chunked_threaded_steps_equal_one_pass(monkeypatch):
    """Chunks and threads change only the order of the work, never a bit of the result."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((37, 11)).astype(np.float32)
    grads = [rng.standard_normal((37, 11)).astype(np.float32) for _ in range(20)]

    def run(chunk, threads):
        monkeypatch.setattr(ff_devices, "ADAM_CHUNK", chunk)
        monkeypatch.setattr(ff_devices, "ADAM_THREADS", threads)
        monkeypatch.setattr(ff_devices, "_ADAM_POOL", [])
        p = p0.copy()
        opt = ff.Adam(p, weight_decay=0.01)
        for g in grads:
            opt.step(p, g.copy(), 0.01)
        return p, opt

    whole, whole_opt = run(10 ** 6, 1)
    for chunk, threads in ((7, 1), (7, 2), (50, 3)):
        p, opt = run(chunk, threads)
        assert np.array_equal(p, whole) and np.array_equal(opt.v_acc, whole_opt.v_acc)
    want = textbook_adam(p0.astype(np.float64), grads, 0.01, wd=0.01)
    np.testing.assert_allclose(whole, want, rtol=1e-4, atol=1e-6)


def test_non_contiguous_parameter_is_refused():
    p = np.ones((4, 4), np.float32)
    opt = ff.Adam(p[:, :2])
    with pytest.raises(ValueError, match="contiguous"):
        opt.step(p[:, :2], np.ones((4, 2), np.float32), 0.1)
