"""A client's DP randomness: a node secret, and a CSPRNG keyed from it.

Why this module exists. DP-SGD's guarantee rests on two random choices the adversary
cannot predict: which examples a Poisson batch holds and the Gaussian noise added to the
clipped gradient sum. In fedpeft the adversary includes the server (honest but curious).
If any of that randomness derives from something the server sends or knows (a run seed,
the round number, a partition id), the server can regenerate the batch and the noise and
subtract it: epsilon against it is infinite. So:

* :class:`NodeSecret` -- 32 bytes from ``secrets.token_bytes`` that a node (in simulation:
  each virtual client) creates on first use and keeps in a ``0600`` file beside its
  ledger. It is never sent and never logged; nothing on the server imports this module.
* :class:`ChaChaStream` -- a ChaCha20 keystream (``cryptography``, i.e. OpenSSL) turned
  into uniform and Gaussian variates. ChaCha20 is a cryptographically secure PRNG: without
  the key its output cannot be predicted, even from other outputs. The torch generators
  (MT19937 / Philox) that Opacus uses by default are not, and Opacus's own ``secure_mode``
  needs ``torchcsprng``, which has no build for current torch; this is its replacement.
* :class:`RoundRandomness` -- the three streams of one round (noise, Poisson sampling,
  dropout). By default their keys are ``HMAC-SHA256(secret, purpose | replay key)``: a
  function of the node secret and of *everything the round's update depends on*, so a
  resumed or retried round reproduces its release bit for bit on CPU (the ledger charges it
  once), and two different inputs never share noise (which would let the server subtract
  one release from the other). With ``fresh=True`` (``privacy.secure_mode``) the keys are
  new OS entropy every round: nothing is reproducible, and a replayed round re-sends the
  node's stored release instead of recomputing it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch.utils.data import Sampler

__all__ = ["ChaChaStream", "NodeSecret", "PoissonBatchSampler", "RoundRandomness", "SECRET_BYTES"]

SECRET_BYTES = 32
_FILE_MODE = 0o600


class NodeSecret:
    """The node's private key for its DP randomness (never leaves the node)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != SECRET_BYTES:
            raise ValueError(f"a node secret is {SECRET_BYTES} bytes, got {len(key) if isinstance(key, bytes) else key!r}")
        self._key = key

    def __repr__(self) -> str:  # never print the key
        return "NodeSecret(<hidden>)"

    @classmethod
    def generate(cls) -> NodeSecret:
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def load_or_create(cls, path: Path) -> NodeSecret:
        """The secret stored at ``path``; a new one (written with mode 0600) if there is none.

        Created atomically with ``O_EXCL``: two processes of one node racing on first use
        end up with the same secret, never with two.
        """
        path = Path(path)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = secrets.token_bytes(SECRET_BYTES)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
            except FileExistsError:
                pass  # another process won the race: read its secret below
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(key.hex().encode())
                    fh.flush()
                    os.fsync(fh.fileno())
        mode = path.stat().st_mode & 0o077
        if mode:
            raise ValueError(f"{path} is readable or writable by others (mode {oct(path.stat().st_mode & 0o777)}); "
                             f"a node secret must be mode 0600 (chmod 600 it, and ask who else read it)")
        raw = path.read_bytes().strip()
        try:
            key = bytes.fromhex(raw.decode())
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{path} is not a node secret ({SECRET_BYTES * 2} hex characters); "
                             f"restore it from backup or remove it together with the ledger") from None
        return cls(key)

    def derive(self, *parts: str) -> bytes:
        """32 bytes ``HMAC-SHA256(secret, parts joined)``: a key no one without the secret can compute."""
        return hmac.new(self._key, "\x1f".join(parts).encode(), hashlib.sha256).digest()


class ChaChaStream:
    """Uniform and Gaussian variates from a ChaCha20 keystream (a CSPRNG).

    Doubles are built from 52 random bits; Gaussians by Box-Muller in float64. The stream
    is deterministic given its key, so a node can reproduce it and nobody else can.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("ChaCha20 needs a 32-byte key")
        self._enc = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()

    def random_bytes(self, n: int) -> bytes:
        return self._enc.update(b"\0" * n)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` doubles uniform on (0, 1) (never exactly 0: safe under log)."""
        words = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64)
        # 52 random bits k: (k + 1/2) / 2^52 is exact in a double, so 0 < u < 1 strictly
        return ((words >> np.uint64(12)).astype(np.float64) + 0.5) * (1.0 / (1 << 52))

    def normal(self, n: int) -> np.ndarray:
        """``n`` independent standard normal doubles (Box-Muller)."""
        half = (n + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])
        return z[:n]

    def gaussian_like(self, reference: torch.Tensor, std: float, secure: bool = False) -> torch.Tensor:
        """Noise N(0, std^2) shaped, typed and placed like ``reference``.

        ``secure``: Opacus's defence against floating-point attacks on the Gaussian
        (Holohan & Braghin 2021, as in Opacus's ``_generate_noise`` secure mode): the sum of
        four draws divided by two, which has the same distribution.
        """
        n = reference.numel()
        z = (self.normal(n) + self.normal(n) + self.normal(n) + self.normal(n)) / 2.0 if secure else self.normal(n)
        noise = torch.from_numpy(z * std).reshape(reference.shape)
        return noise.to(device=reference.device, dtype=reference.dtype)


class PoissonBatchSampler(Sampler[list[int]]):
    """Poisson sampling (each example independently with probability ``sample_rate``) from
    a :class:`ChaChaStream`: Opacus's ``UniformWithReplacementSampler`` with a CSPRNG.
    One pass is ``int(1 / sample_rate)`` batches, as in Opacus (the trainer cycles passes, so
    every step is an independent draw at ``sample_rate``); batches may be empty."""

    def __init__(self, num_samples: int, sample_rate: float, stream: ChaChaStream) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples, self.sample_rate, self.stream = num_samples, sample_rate, stream
        self.steps = int(1 / sample_rate)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = self.stream.uniform(self.num_samples) < self.sample_rate
            yield np.flatnonzero(mask).tolist()


@dataclass(frozen=True)
class RoundRandomness:
    """The keys of one round's DP randomness (noise, Poisson sampling, dropout)."""

    noise_key: bytes
    sampling_key: bytes
    dropout_seed: int
    fresh: bool  # True: OS entropy, not reproducible (secure mode)

    @classmethod
    def derived(cls, secret: NodeSecret, *inputs: str) -> RoundRandomness:
        """Keys from the node secret and the round's inputs (its replay key)."""
        dropout = int.from_bytes(secret.derive("dropout", *inputs)[:8], "big") >> 1
        return cls(secret.derive("noise", *inputs), secret.derive("sampling", *inputs), dropout, False)

    @classmethod
    def fresh_keys(cls) -> RoundRandomness:
        """Keys from OS entropy (``secrets``): ``privacy.secure_mode``."""
        return cls(secrets.token_bytes(32), secrets.token_bytes(32), secrets.randbits(63), True)

    def noise(self) -> ChaChaStream:
        return ChaChaStream(self.noise_key)

    def sampling(self) -> ChaChaStream:
        return ChaChaStream(self.sampling_key)

    def __repr__(self) -> str:  # never print the keys
        return f"RoundRandomness(fresh={self.fresh})"

