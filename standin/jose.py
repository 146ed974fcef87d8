"""The stand-in's signing key and JSON Web Tokens, in pure Python (package-private).

The stand-in runs on the standard library alone (it serves `make demo` before anything but
the project is installed, and bench and tests without extra packages), so its RS256 key
is made here: RSA 2048 with e = 65537, primes found by sieving a window of odd candidates
with the small primes and testing the survivors with Miller-Rabin; PKCS#1 v1.5 signatures
over SHA-256 (RFC 8017 8.2), computed with the CRT. Good enough for a loopback test server,
not for anything else: no blinding, no constant time.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

PUBLIC_EXPONENT = 65537
# Small primes for the sieve: 2,000 of them leave about one odd candidate in nine for
# Miller-Rabin. A guess at the sweet spot between sieving and testing; measured at ~0.1 s.
_SIEVE_LIMIT = 17_400
# Odd candidates examined from one random start before drawing another (the expected gap
# between 1024-bit primes is ~710, so 4,096 candidates almost never run out).
_WINDOW = 4096
# Miller-Rabin rounds for a 1024-bit candidate (FIPS 186-5 table B.1 asks for 4 with an
# error probability of 2^-100 for random candidates; one more for the stand-in's comfort).
_ROUNDS = 5
# DER prefix of a DigestInfo for SHA-256 (RFC 8017 9.2, note 1).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_b64(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@functools.cache
def _small_primes(limit: int = _SIEVE_LIMIT) -> list[int]:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit, n)))
    return [n for n in range(3, limit) if sieve[n]]  # odd ones: candidates are odd


def _probably_prime(n: int, rounds: int = _ROUNDS) -> bool:
    d, s = n - 1, 0
    while not d & 1:
        d >>= 1
        s += 1
    for i in range(rounds):
        a = 2 if i == 0 else 3 + secrets.randbelow(n - 4)  # base 2 first: cheapest reject
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def random_prime(bits: int, *, coprime_to: int = PUBLIC_EXPONENT) -> int:
    """A random prime of exactly `bits` bits (top two set) with p - 1 coprime to `coprime_to`."""
    while True:
        start = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        # composite[i] marks start + 2i as divisible by a small prime.
        composite = bytearray(_WINDOW)
        for p in _small_primes():
            first = (-start * ((p + 1) // 2)) % p  # start + 2*first ≡ 0 (mod p)
            composite[first::p] = b"\x01" * len(range(first, _WINDOW, p))
        for i in range(_WINDOW):
            candidate = start + 2 * i
            if (composite[i] or (candidate - 1) % coprime_to == 0
                    or candidate.bit_length() != bits):
                continue
            if _probably_prime(candidate):
                return candidate


@dataclass(frozen=True)
class RsaKey:
    """An RSA private key with its CRT values, and what a JWK Set publishes of it."""

    n: int
    e: int
    d: int
    p: int
    q: int
    kid: str

    @classmethod
    def generate(cls, bits: int = 2048) -> RsaKey:
        while True:
            p = random_prime(bits // 2)
            q = random_prime(bits // 2)
            if p != q and (p * q).bit_length() == bits:
                break
        n, e = p * q, PUBLIC_EXPONENT
        d = pow(e, -1, (p - 1) * (q - 1))
        # RFC 7638 thumbprint as the key id, as many servers do.
        members = json.dumps({"e": _int_b64(e), "kty": "RSA", "n": _int_b64(n)},
                             separators=(",", ":"), sort_keys=True)
        return cls(n, e, d, p, q, b64url(hashlib.sha256(members.encode()).digest()))

    @property
    def size(self) -> int:
        return (self.n.bit_length() + 7) // 8

    def jwk(self) -> dict[str, str]:
        return {"kid": self.kid, "kty": "RSA", "alg": "RS256", "use": "sig",
                "n": _int_b64(self.n), "e": _int_b64(self.e)}

    def encoded_digest(self, message: bytes) -> int:
        """EMSA-PKCS1-v1_5 of SHA-256(message), as an integer (RFC 8017 9.2)."""
        t = _SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
        em = b"\x00\x01" + b"\xff" * (self.size - len(t) - 3) + b"\x00" + t
        return int.from_bytes(em, "big")

    def sign(self, message: bytes) -> bytes:
        m = self.encoded_digest(message)
        m1 = pow(m, self.d % (self.p - 1), self.p)
        m2 = pow(m, self.d % (self.q - 1), self.q)
        h = pow(self.q, -1, self.p) * (m1 - m2) % self.p
        return (m2 + h * self.q).to_bytes(self.size, "big")

    def verify(self, message: bytes, signature: bytes) -> bool:
        if len(signature) != self.size:
            return False
        s = int.from_bytes(signature, "big")
        return s < self.n and pow(s, self.e, self.n) == self.encoded_digest(message)


def encode_jwt(claims: dict[str, Any], *, rsa: RsaKey | None = None,
               hmac_key: bytes | None = None) -> str:
    """A compact JWS: RS256 with `rsa`, else HS256 with `hmac_key`."""
    header: dict[str, str] = (
        {"alg": "RS256", "typ": "JWT", "kid": rsa.kid} if rsa is not None
        else {"alg": "HS256", "typ": "JWT"}
    )
    signing_input = (b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + b64url(json.dumps(claims, separators=(",", ":")).encode()))
    if rsa is not None:
        signature = rsa.sign(signing_input.encode())
    else:
        assert hmac_key is not None
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def decode_jwt(token: str, *, rsa: RsaKey | None = None,
               hmac_key: bytes | None = None) -> dict[str, Any] | None:
    """The claims of a JWS signed as encode_jwt() signs with the same key, else None."""
    try:
        header_part, payload_part, signature_part = token.split(".")
        header = json.loads(unb64url(header_part))
        signature = unb64url(signature_part)
        signing_input = f"{header_part}.{payload_part}".encode()
        if not isinstance(header, dict):
            return None
        if rsa is not None:
            if header.get("alg") != "RS256" or not rsa.verify(signing_input, signature):
                return None
        else:
            assert hmac_key is not None
            expected = hmac.new(hmac_key, signing_input, hashlib.sha256).digest()
            if header.get("alg") != "HS256" or not hmac.compare_digest(expected, signature):
                return None
        claims = json.loads(unb64url(payload_part))
    except (ValueError, UnicodeError):  # binascii.Error and JSONDecodeError are ValueErrors
        return None
    return claims if isinstance(claims, dict) else None
