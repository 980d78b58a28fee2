"""The node's DP randomness (``fedpeft.privacy.randomness``) pinned down directly.

Each variate is compared with an independent computation from the ChaCha20 keystream
(``cryptography``) and the HMAC keys with ``hmac``: a stream that differs from the stated
construction (another nonce, other bits, another Box-Muller) is a stream the analysis does
not describe. The secret file's mode, atomic creation and refusals are what keep the key
on the node. All of it runs in well under a second (the mutation run's covering tests).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from fedpeft.privacy.randomness import (
    SECRET_BYTES,
    ChaChaStream,
    NodeSecret,
    PoissonBatchSampler,
    RoundRandomness,
)

KEY = bytes(range(32))


def _keystream(key: bytes, n: int) -> bytes:
    """ChaCha20 with an all-zero 16-byte nonce/counter, encrypting zeros: the raw keystream."""
    return Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor().update(b"\0" * n)


def _uniform_reference(raw: bytes) -> np.ndarray:
    words = np.frombuffer(raw, dtype="<u8")
    return np.array([((int(w) >> 12) + 0.5) / 2.0**52 for w in words])


# ---------------------------------------------------------------- NodeSecret


def test_node_secret_is_exactly_32_bytes_and_hides_itself() -> None:
    assert SECRET_BYTES == 32
    for bad in (b"\0" * 31, b"\0" * 33, b"", "0" * 32):
        with pytest.raises(ValueError, match="a node secret is 32 bytes"):
            NodeSecret(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got 31$"):  # a key of the wrong length: its length, never its bytes
        NodeSecret(b"\x07" * 31)
    with pytest.raises(ValueError, match=r"got 'abc'$"):  # not bytes at all: what it is
        NodeSecret("abc")  # type: ignore[arg-type]
    secret = NodeSecret(KEY)
    assert repr(secret) == "NodeSecret(<hidden>)" and KEY.hex() not in repr(secret)
    one, two = NodeSecret.generate(), NodeSecret.generate()
    assert one.derive("x") != two.derive("x")  # fresh OS entropy each time


def test_derive_is_hmac_sha256_of_the_parts_joined_by_unit_separator() -> None:
    secret = NodeSecret(KEY)
    assert secret.derive("noise", "a", "b") == hmac.new(KEY, b"noise\x1fa\x1fb", hashlib.sha256).digest()
    assert secret.derive("ab", "c") != secret.derive("a", "bc")  # the separator keeps inputs apart


def test_load_or_create_writes_a_0600_secret_in_a_0700_dir_and_reads_it_back(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "secret"  # parents that do not exist yet
    first = NodeSecret.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_bytes()) == 2 * SECRET_BYTES
    again = NodeSecret.load_or_create(path)
    assert again.derive("x") == first.derive("x")
    # an existing directory without a secret yet; a stored secret with a trailing newline
    (tmp_path / "c").mkdir()
    assert NodeSecret.load_or_create(tmp_path / "c" / "s").derive("x") != first.derive("x")
    manual = tmp_path / "manual"
    manual.write_text(KEY.hex() + "\n")
    manual.chmod(0o600)
    assert NodeSecret.load_or_create(manual).derive("x") == NodeSecret(KEY).derive("x")


def test_load_or_create_keeps_the_secret_of_a_process_that_won_the_race(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "secret"
    path.write_text(KEY.hex())
    path.chmod(0o600)
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: False if self == path else real_exists(self))
    # the other process created the file between our exists() and our open(): O_EXCL keeps its secret
    assert NodeSecret.load_or_create(path).derive("x") == NodeSecret(KEY).derive("x")
    assert path.read_text() == KEY.hex()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o602, 0o620, 0o601, 0o610])
def test_load_or_create_refuses_a_secret_others_can_read_or_write(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secret"
    path.write_text(KEY.hex())
    path.chmod(mode)
    with pytest.raises(ValueError, match=r"readable or writable by others \(mode 0o6"):
        NodeSecret.load_or_create(path)


@pytest.mark.parametrize("content", [b"not hex at all", b"\xff\xfe", (b"ab" * 31)])
def test_load_or_create_refuses_a_file_that_is_not_a_secret(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match="not a node secret|a node secret is 32 bytes"):
        NodeSecret.load_or_create(path)
    if content != b"ab" * 31:
        with pytest.raises(ValueError, match=r"is not a node secret \(64 hex characters\)"):
            NodeSecret.load_or_create(path)
    assert path.read_bytes() == content  # never overwritten


# ---------------------------------------------------------------- ChaChaStream


def test_stream_is_the_chacha20_keystream_with_a_zero_nonce() -> None:
    with pytest.raises(ValueError, match="32-byte key"):
        ChaChaStream(b"\0" * 31)
    stream = ChaChaStream(KEY)
    first, second = stream.random_bytes(10), stream.random_bytes(7)
    assert len(first) == 10 and len(second) == 7
    assert first + second == _keystream(KEY, 17)  # consecutive calls continue the stream


def test_uniform_is_the_top_52_bits_plus_a_half_over_two_to_the_52() -> None:
    u = ChaChaStream(KEY).uniform(1000)
    assert u.shape == (1000,) and u.dtype == np.float64
    np.testing.assert_array_equal(u, _uniform_reference(_keystream(KEY, 8000)))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.03


@pytest.mark.parametrize("n", [1, 6, 7])
def test_normal_is_box_muller_of_two_uniform_draws(n: int) -> None:
    half = (n + 1) // 2
    u = _uniform_reference(_keystream(KEY, 16 * half))
    u1, u2 = u[:half], u[half:]
    r = np.sqrt(-2.0 * np.log(u1))
    expected = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])[:n]
    z = ChaChaStream(KEY).normal(n)
    assert z.shape == (n,)
    np.testing.assert_allclose(z, expected, rtol=0, atol=1e-12)


def test_normal_draws_are_standard_normal() -> None:
    z = ChaChaStream(KEY).normal(20_000)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.std() - 1) < 0.03


def test_gaussian_like_scales_and_shapes_like_the_reference() -> None:
    ref = torch.zeros(3, 5, dtype=torch.float32)
    noise = ChaChaStream(KEY).gaussian_like(ref, std=2.5)
    assert noise.shape == (3, 5) and noise.dtype == torch.float32 and noise.device == ref.device
    expected = ChaChaStream(KEY).normal(15) * 2.5  # not secure by default: one draw
    np.testing.assert_allclose(noise.numpy().ravel(), expected, rtol=1e-6)
    assert ChaChaStream(KEY).gaussian_like(torch.zeros(2, dtype=torch.float64), std=1.0).dtype == torch.float64


def test_secure_gaussian_is_four_draws_over_two_with_the_same_std() -> None:
    stream, ref = ChaChaStream(KEY), torch.zeros(7, dtype=torch.float64)
    reference = ChaChaStream(KEY)
    draws = [reference.normal(7) for _ in range(4)]
    np.testing.assert_allclose(stream.gaussian_like(ref, std=3.0, secure=True).numpy(), sum(draws) / 2.0 * 3.0,
                               rtol=1e-12)
    big = ChaChaStream(KEY).gaussian_like(torch.zeros(20_000, dtype=torch.float64), std=3.0, secure=True)
    assert abs(float(big.std()) - 3.0) < 0.1


# ---------------------------------------------------------------- PoissonBatchSampler


def test_poisson_sampler_refuses_what_is_not_a_rate_or_a_dataset() -> None:
    stream = ChaChaStream(KEY)
    for bad in (0.0, -0.1, 1.0001):
        with pytest.raises(ValueError, match="sample_rate must be in"):
            PoissonBatchSampler(10, bad, stream)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        PoissonBatchSampler(0, 0.5, stream)
    one = PoissonBatchSampler(1, 1.0, stream)  # the boundaries are allowed
    assert len(one) == 1 and list(one) == [[0]]


@pytest.mark.parametrize("rate", [0.25, 0.3, 0.07])
def test_poisson_sampler_draws_one_uniform_per_example_per_step(rate: float) -> None:
    sampler = PoissonBatchSampler(50, rate, ChaChaStream(KEY))
    assert len(sampler) == int(1 / rate)
    batches = list(sampler)
    reference = ChaChaStream(KEY)
    expected = [np.flatnonzero(reference.uniform(50) < rate).tolist() for _ in range(int(1 / rate))]
    assert batches == expected
    assert sum(map(len, batches)) > 0


def test_poisson_sampler_includes_with_probability_exactly_the_rate() -> None:
    """An example is in the batch iff its uniform is strictly below the rate: with the rate set
    to example 0's own draw, example 0 is out (``<=`` would sample at q + 2^-53)."""
    u0 = float(ChaChaStream(KEY).uniform(1)[0])
    assert list(PoissonBatchSampler(1, u0, ChaChaStream(KEY)))[0] == []
    assert list(PoissonBatchSampler(1, np.nextafter(u0, 1.0), ChaChaStream(KEY)))[0] == [0]


def test_poisson_sampler_includes_each_example_at_the_rate() -> None:
    sampler = PoissonBatchSampler(2000, 0.1, ChaChaStream(KEY))
    sizes = [len(b) for b in sampler]
    assert len(sizes) == 10
    assert abs(np.mean(sizes) - 200) < 3 * math.sqrt(2000 * 0.1 * 0.9 / 10)


# ---------------------------------------------------------------- RoundRandomness


def test_derived_keys_are_hmacs_of_purpose_and_inputs() -> None:
    secret = NodeSecret(KEY)
    r = RoundRandomness.derived(secret, "run", "3")

    def h(purpose: str) -> bytes:
        return hmac.new(KEY, f"{purpose}\x1frun\x1f3".encode(), hashlib.sha256).digest()

    assert r.noise_key == h("noise") and r.sampling_key == h("sampling")
    assert r.dropout_seed == int.from_bytes(h("dropout")[:8], "big") >> 1
    assert 0 <= r.dropout_seed < 2**63 and r.fresh is False
    assert r == RoundRandomness.derived(secret, "run", "3")  # a replayed round: the same keys
    assert RoundRandomness.derived(secret, "run", "4").noise_key != r.noise_key
    assert r.noise().random_bytes(16) == _keystream(h("noise"), 16)
    assert r.sampling().random_bytes(16) == _keystream(h("sampling"), 16)
    assert repr(r) == "RoundRandomness(fresh=False)" and r.noise_key.hex() not in repr(r)


def test_fresh_keys_are_new_os_entropy_each_round() -> None:
    rounds = [RoundRandomness.fresh_keys() for _ in range(64)]
    assert all(r.fresh for r in rounds) and repr(rounds[0]) == "RoundRandomness(fresh=True)"
    assert all(len(r.noise_key) == 32 and len(r.sampling_key) == 32 for r in rounds)
    assert all(0 <= r.dropout_seed < 2**63 for r in rounds)  # 64 draws of 64 bits would cross it
    assert len({r.noise_key for r in rounds} | {r.sampling_key for r in rounds}) == 128
    assert len({r.dropout_seed for r in rounds}) == 64
    assert rounds[0].noise().random_bytes(8) == _keystream(rounds[0].noise_key, 8)
    assert rounds[0].sampling().random_bytes(8) == _keystream(rounds[0].sampling_key, 8)


def test_secret_file_is_created_without_group_or_other_bits_even_under_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        NodeSecret.load_or_create(tmp_path / "d" / "secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d" / "secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700


def test_gaussian_like_is_placed_on_the_reference_device() -> None:
    """The noise is made on the CPU and moved to the reference's device (on a GPU node: the
    gradient's); the meta device stands in for an accelerator here."""
    ref = torch.empty(2, 3, dtype=torch.float16, device="meta")
    noise = ChaChaStream(KEY).gaussian_like(ref, std=1.0)
    assert noise.device.type == "meta" and noise.dtype == torch.float16 and noise.shape == (2, 3)
