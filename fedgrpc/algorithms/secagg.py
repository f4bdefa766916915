"""Secure aggregation (SecAgg+): the arithmetic and cryptography of one round, with no gRPC inside.

Bonawitz et al. (CCS 2017) with the sparse neighbour graph of Bell et al. (CCS 2020). Each learner of a round
masks its quantized update with one pairwise mask per neighbour (agreed by X25519, so that the two masks of a
pair cancel in the sum) and a self mask of its own, and Shamir-shares the seeds of both among its neighbours.
The leader sums the masked updates; once it knows who sent one, each surviving learner reveals, for each
neighbour, either its share of that neighbour's self-mask seed (it sent an update) or of its mask key (it
dropped), never both. From `threshold` shares the leader removes the self masks of the senders and the pairwise
masks of the dropped, and is left with the sum of the updates and nothing about any one of them.

Key agreement, key derivation, the share encryption and the mask generator are the `cryptography` package's
(X25519, HKDF-SHA256, ChaCha20-Poly1305, AES-256-CTR); Shamir's scheme is polynomial arithmetic over a prime
field, written here. Masked values are integers modulo 2**32 (numpy uint32, whose sums wrap), so that a
masked update is as large as a float32 one.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASKED_TENSOR = "masked"  # the one tensor of a masked update on the wire (GradientData), int32
MODULUS_BITS = 32  # masked values live in Z/2**32: uint32 on the wire, as large as the float32 update they hide
SIGNED_LIMIT = 2 ** (MODULUS_BITS - 1)  # a round's sum decodes as a signed 32-bit integer, so it must stay below this
KEY_BYTES = 32  # X25519 keys and the self-mask seed
SHAMIR_PRIME = 2**521 - 1  # a Mersenne prime above every 32-byte secret
SHARE_VALUE_BYTES = 66  # one share's value in the field, big-endian (521 bits)
SHARE_PLAINTEXT_BYTES = 2 * SHARE_VALUE_BYTES  # a neighbour's share of the self-mask seed, then of the mask key
SHARE_TAG_BYTES = 16  # ChaCha20-Poly1305's tag
ENCRYPTED_SHARE_BYTES = SHARE_PLAINTEXT_BYTES + SHARE_TAG_BYTES
ZERO_NONCE = bytes(12)  # every share key encrypts one message: it is derived for that round, sender and receiver
COUNTER_BLOCK = bytes(16)  # every mask key expands one mask: it is derived for that round (and pair)


class SecAggError(ValueError):
    """A secure-aggregation message that must not be used: malformed, or not fitting the round."""


class RevealRefused(SecAggError):
    """An unmasking request an honest learner refuses: it would reveal too much."""


# ---- parameters of a round --------------------------------------------------------------------------------------


def default_neighbours(cohort: int) -> int:
    """SecAgg+'s neighbour count: O(log n) (2 * ceil(1.5 * log2 n)), or everyone else in a small cohort."""
    if cohort <= 1:
        return 0
    return min(cohort - 1, 2 * math.ceil(1.5 * math.log2(cohort)))


def default_threshold(neighbours: int) -> int:
    """Shares that rebuild a secret: a strict majority of the neighbours holding them, so that any two sets of this size
    share a learner, and an honest one reveals one kind of share per peer, never both."""
    return neighbours // 2 + 1


def round_parameters(cohort: int, neighbours: int = 0, threshold: int = 0) -> tuple[int, int]:
    """(neighbours, threshold) for a cohort of `cohort`: the given ones capped to what the cohort allows, or the defaults."""
    k = min(neighbours or default_neighbours(cohort), cohort - 1)
    t = min(threshold or default_threshold(k), k)
    return k, max(t, 1)


def fixed_point_scale(bound: float, cohort: int) -> float:
    """Fixed-point scale at which any sum of `cohort` values within [-bound, bound], each rounded, fits in a signed 32-bit integer."""
    if not bound > 0 or cohort < 1:
        raise SecAggError(f"the fixed-point range needs a positive bound and cohort, got {bound} and {cohort}")
    return (SIGNED_LIMIT - cohort) / (cohort * bound)


def entry_bound(bound: float) -> float:
    """The range [-r, r] every entry of an encoded update lies in: the round's bound, or 1 for the weight factor."""
    return max(bound, 1.0)


def neighbour_graph(members: Sequence[int], neighbours: int, seed: int) -> dict[int, list[int]]:
    """A random k-regular graph over `members` (SecAgg+'s random Harary graph): a seeded shuffle on a ring, each learner
    joined to the k/2 nearest on each side (k rounded up to even), or to everyone when k reaches the cohort."""
    members = sorted(members)
    n = len(members)
    if neighbours >= n - 1:
        return {member: [other for other in members if other != member] for member in members}
    half = (neighbours + 1) // 2
    order = [members[index] for index in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()]
    graph: dict[int, list[int]] = {}
    for position, member in enumerate(order):
        around = {order[(position + step) % n] for step in range(-half, half + 1) if step}
        graph[member] = sorted(around)
    return graph


# ---- Shamir's secret sharing over GF(SHAMIR_PRIME) --------------------------------------------------------------


def share_secret(secret: bytes, points: Sequence[int], threshold: int) -> dict[int, int]:
    """Shamir shares of a secret of at most 65 bytes at field points `points` (nonzero, distinct): any `threshold` rebuild it."""
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(SHAMIR_PRIME) for _ in range(threshold - 1)]
    shares = {}
    for point in points:
        value = 0
        for coefficient in reversed(coefficients):  # Horner's rule
            value = (value * point + coefficient) % SHAMIR_PRIME
        shares[point] = value
    return shares


def combine_shares(shares: Mapping[int, int], length: int = KEY_BYTES) -> bytes:
    """The secret of `length` bytes behind Shamir shares {point: value} (Lagrange interpolation at 0)."""
    secret = 0
    for point, value in shares.items():
        numerator = denominator = 1
        for other in shares:
            if other != point:
                numerator = numerator * -other % SHAMIR_PRIME
                denominator = denominator * (point - other) % SHAMIR_PRIME
        secret = (secret + value * numerator * pow(denominator, -1, SHAMIR_PRIME)) % SHAMIR_PRIME
    if secret >= 1 << (8 * length):
        raise SecAggError("the shares do not rebuild a secret of the expected size: at least one is wrong")
    return secret.to_bytes(length, "big")


def share_point(learner_id: int) -> int:
    """The field point at which learner `learner_id` holds its shares (nonzero)."""
    return learner_id + 1


# ---- keys and masks -----------------------------------------------------------------------------------------------


def _derive(secret: bytes, label: str, *context: int) -> bytes:
    """A 32-byte key for one purpose (label) and one context (round, learners), from an X25519 agreement or a seed."""
    info = "|".join([label, *map(str, context)]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of a private key's public half."""
    return key.public_key().public_bytes_raw()


def load_public(raw: bytes, what: str) -> X25519PublicKey:
    """A peer's X25519 public key from its raw 32 bytes; SecAggError when it is not one."""
    if len(raw) != KEY_BYTES:
        raise SecAggError(f"{what} must be {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PublicKey.from_public_bytes(raw)


def pair_mask_key(private: X25519PrivateKey, peer_public: X25519PublicKey, round_number: int, a: int, b: int) -> bytes:
    """The key of the mask learners a and b agree on for a round (the same from either side)."""
    return _derive(private.exchange(peer_public), "secagg-pair-mask", round_number, min(a, b), max(a, b))


class MaskGenerator:
    """Expands mask keys into masks of `length` uint32 values (AES-256 in counter mode over zeros), reusing its buffers:
    a fresh megabyte costs more in page faults than the cipher takes to fill it."""

    def __init__(self, length: int) -> None:
        self.length = length
        self._zeros = bytes(4 * length)
        self._out = bytearray(4 * length + 16)  # update_into wants a block of slack

    def expand(self, key: bytes) -> np.ndarray:
        """The mask of a 32-byte key; a view valid until the next call."""
        encryptor = Cipher(algorithms.AES(key), modes.CTR(COUNTER_BLOCK)).encryptor()
        encryptor.update_into(self._zeros, self._out)
        return np.frombuffer(self._out, dtype=np.uint32, count=self.length)

    def add(self, total: np.ndarray, key: bytes, sign: int = 1) -> None:
        """Add (sign 1) or subtract (sign -1) the mask of `key` to `total` in place, modulo 2**32."""
        (np.add if sign > 0 else np.subtract)(total, self.expand(key), out=total)

    def add_pair(self, total: np.ndarray, key: bytes, own_id: int, peer_id: int, sign: int = 1) -> None:
        """Add (sign 1) or remove (sign -1) the pairwise mask learner `own_id` applied for `peer_id`: the lower id adds it,
        the higher subtracts it, so that the pair's two masks cancel in the sum."""
        self.add(total, key, sign if own_id < peer_id else -sign)


def _share_aad(round_number: int, sender: int, receiver: int) -> bytes:
    return f"secagg-share|{round_number}|{sender}|{receiver}".encode()


# ---- fixed point ------------------------------------------------------------------------------------------------


def quantize(values: np.ndarray, scale: float) -> np.ndarray:
    """float64 values as fixed-point integers modulo 2**32 (rounded to the nearest step of 1/scale); scales `values` in place."""
    np.multiply(values, scale, out=values)
    np.rint(values, out=values)
    return values.astype(np.int64).astype(np.uint32)


def dequantize(total: np.ndarray, scale: float) -> np.ndarray:
    """A sum of quantized values back to float64 (read as a signed 32-bit integer)."""
    return total.view(np.int32).astype(np.float64) / scale


# ---- an update as one vector --------------------------------------------------------------------------------------


def vector_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors a masked update carries, in state-dict order: every floating-point one (integer counters stay out)."""
    return [name for name, tensor in state.items() if tensor.dtype.is_floating_point]


def vector_length(state: Mapping[str, torch.Tensor]) -> int:
    """Entries of a masked update: the floating-point tensors' and the weight factor."""
    return sum(state[name].numel() for name in vector_names(state)) + 1


def encode_update(
    update: Mapping[str, torch.Tensor],
    round_state: Mapping[str, torch.Tensor],
    parameter_names: Sequence[str],
    bound: float,
    weight: float,
) -> np.ndarray:
    """An update as the float64 vector a learner masks: its parameters clipped to L2 norm `bound`, its buffers as changes
    from the round's model clamped to [-bound, bound], all times `weight` (in (0, 1]), then `weight` itself."""
    if not 0 < weight <= 1:
        raise SecAggError(f"an update's weight factor must be in (0, 1], got {weight}")
    parameters = set(parameter_names)
    names = vector_names(round_state)
    vector = np.empty(sum(round_state[name].numel() for name in names) + 1)
    squares = 0.0
    offset = 0
    for name in names:  # written into one float64 vector: no intermediate copies
        part = vector[offset : offset + round_state[name].numel()]
        part[:] = update[name].detach().reshape(-1).numpy()
        if name in parameters:
            squares += float(np.dot(part, part))
        else:
            np.subtract(part, round_state[name].reshape(-1).numpy(), out=part)
            np.clip(part, -bound, bound, out=part)
        offset += part.size
    norm = math.sqrt(squares)
    if not math.isfinite(norm):
        raise SecAggError(f"the update's parameter norm is {norm}")
    if norm > bound:
        offset = 0
        for name in names:
            size = round_state[name].numel()
            if name in parameters:
                vector[offset : offset + size] *= bound / norm
            offset += size
    vector[:-1] *= weight
    vector[-1] = weight
    return vector


def decode_mean(total: np.ndarray, round_state: Mapping[str, torch.Tensor], parameter_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The weighted mean update from the unmasked sum of encoded updates (float64): parameters as averaged, buffers as the
    round's model plus the averaged change, integer counters as the round's model had them."""
    weight = float(total[-1])
    if not weight > 0:
        raise SecAggError(f"the round's weights sum to {weight}")
    parameters = set(parameter_names)
    mean = torch.from_numpy(total[:-1] / weight)
    result = {}
    offset = 0
    for name, tensor in round_state.items():
        if not tensor.dtype.is_floating_point:
            result[name] = tensor.clone()
            continue
        part = mean[offset : offset + tensor.numel()].reshape(tensor.shape)
        offset += tensor.numel()
        result[name] = (part if name in parameters else tensor.to(torch.float64) + part).to(tensor.dtype)
    return result


# ---- the learner's side of a round --------------------------------------------------------------------------------


@dataclass
class Neighbour:
    """A neighbour's public keys for the round: one to agree masks, one to encrypt shares."""

    mask_key: X25519PublicKey
    share_key: X25519PublicKey


@dataclass
class LearnerRound:
    """One learner's part in one round's secure aggregation: its keys, seeds, neighbours and the shares it holds.

    Every method checks that it is called in the protocol's order and with messages that fit it, and raises
    SecAggError otherwise; `reveal` answers once per round.
    """

    round_number: int
    learner_id: int
    cohort: int
    threshold: int
    bound: float  # each entry of a weighted update lies within [-bound, bound]
    mask_private: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    share_private: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    self_seed: bytes = field(default_factory=lambda: secrets.token_bytes(KEY_BYTES))
    neighbours: dict[int, Neighbour] = field(default_factory=dict)  # from the ShareKeys stage: learner id -> keys
    included: list[int] | None = None  # neighbours whose shares the leader holds (the Collect stage), masked against
    held: dict[int, tuple[int, int]] = field(default_factory=dict)  # neighbour -> its (self-seed share, mask-key share) for us
    revealed: bool = False
    share_secrets: dict[int, bytes] = field(default_factory=dict)  # neighbour -> the X25519 agreement of the share keys

    def _agreed(self, peer: int, share_key: X25519PublicKey) -> bytes:
        """The share keys' agreement with a neighbour, computed once for both directions."""
        if peer not in self.share_secrets:
            self.share_secrets[peer] = self.share_private.exchange(share_key)
        return self.share_secrets[peer]

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= self.cohort or self.cohort < 2:
            raise SecAggError(f"threshold {self.threshold} does not fit a cohort of {self.cohort}")
        fixed_point_scale(self.bound, self.cohort)  # raises for a bound or cohort that cannot be

    def public_keys(self) -> tuple[bytes, bytes]:
        """(mask key, share key) to advertise."""
        return public_bytes(self.mask_private), public_bytes(self.share_private)

    def share_keys(self, neighbour_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Shares of the self-mask seed and the mask key for each neighbour, each encrypted for that neighbour alone."""
        if self.neighbours:
            raise SecAggError(f"round {self.round_number}: keys were already shared")
        if self.learner_id in neighbour_keys:
            raise SecAggError("a learner is not its own neighbour")
        if not self.threshold <= len(neighbour_keys) < self.cohort:
            raise SecAggError(f"{len(neighbour_keys)} neighbours: need {self.threshold} to {self.cohort - 1} in a cohort of {self.cohort}")
        neighbours = {
            peer: Neighbour(load_public(mask, f"learner {peer}'s mask key"), load_public(share, f"learner {peer}'s share key"))
            for peer, (mask, share) in neighbour_keys.items()
        }
        points = [share_point(peer) for peer in neighbours]
        seed_shares = share_secret(self.self_seed, points, self.threshold)
        key_shares = share_secret(self.mask_private.private_bytes_raw(), points, self.threshold)
        encrypted = {}
        for peer, keys in neighbours.items():
            point = share_point(peer)
            plaintext = seed_shares[point].to_bytes(SHARE_VALUE_BYTES, "big") + key_shares[point].to_bytes(SHARE_VALUE_BYTES, "big")
            key = _derive(self._agreed(peer, keys.share_key), "secagg-share", self.round_number, self.learner_id, peer)
            encrypted[peer] = ChaCha20Poly1305(key).encrypt(ZERO_NONCE, plaintext, _share_aad(self.round_number, self.learner_id, peer))
        self.neighbours = neighbours
        return encrypted

    def collect(self, included: Sequence[int], shares: Mapping[int, bytes]) -> None:
        """Take the neighbours the leader holds shares from, with the shares they sent this learner (decrypted and checked)."""
        if not self.neighbours:
            raise SecAggError(f"round {self.round_number}: keys were not shared yet")
        if self.included is not None:
            raise SecAggError(f"round {self.round_number}: the cohort was already fixed")
        unknown = set(included) - set(self.neighbours)
        if unknown:
            raise SecAggError(f"learners {sorted(unknown)} are not this learner's neighbours")
        if set(shares) != set(included):
            raise SecAggError("shares must come from exactly the neighbours the leader holds shares from")
        held = {}
        for peer, ciphertext in shares.items():
            if len(ciphertext) != ENCRYPTED_SHARE_BYTES:
                raise SecAggError(f"learner {peer}'s share is {len(ciphertext)} bytes, not {ENCRYPTED_SHARE_BYTES}")
            key = _derive(
                self.share_private.exchange(self.neighbours[peer].share_key), "secagg-share", self.round_number, peer, self.learner_id
            )
            try:
                plaintext = ChaCha20Poly1305(key).decrypt(ZERO_NONCE, ciphertext, _share_aad(self.round_number, peer, self.learner_id))
            except InvalidTag:
                raise SecAggError(f"learner {peer}'s share does not open for round {self.round_number}: replayed or altered") from None
            held[peer] = (
                int.from_bytes(plaintext[:SHARE_VALUE_BYTES], "big"),
                int.from_bytes(plaintext[SHARE_VALUE_BYTES:], "big"),
            )
        if len(held) + 1 < self.threshold:  # the neighbourhood, this learner included, is too small to hide its sum
            raise SecAggError(f"only {len(held)} neighbours shared keys; {self.threshold - 1} are needed")
        self.included = sorted(included)
        self.held = held

    def mask(self, vector: np.ndarray, masks: MaskGenerator | None = None) -> np.ndarray:
        """A float64 weighted update (entries within the bound) as the uint32 vector the leader may see: quantized and
        masked. Consumes `vector`; `masks` (of its length) may be one kept from an earlier round."""
        if self.included is None:
            raise SecAggError(f"round {self.round_number}: the cohort is not fixed yet")
        limit = entry_bound(self.bound)
        if not (float(vector.min(initial=0.0)) >= -limit and float(vector.max(initial=0.0)) <= limit):  # NaN fails both
            raise SecAggError(f"an update entry lies outside [-{limit:g}, {limit:g}] or is not finite")
        masked = quantize(vector, fixed_point_scale(limit, self.cohort))
        if masks is None or masks.length != masked.size:
            masks = MaskGenerator(masked.size)
        masks.add(masked, self.self_seed)
        for peer in self.included:
            key = pair_mask_key(self.mask_private, self.neighbours[peer].mask_key, self.round_number, self.learner_id, peer)
            masks.add_pair(masked, key, self.learner_id, peer)
        return masked

    def reveal(self, survivors: Sequence[int], dropped: Sequence[int]) -> list[tuple[int, bool, bytes]]:
        """(neighbour, is_self_seed, share) for each neighbour named: self-seed shares of survivors, mask-key shares of the dropped.

        An honest learner answers once per round, and never for a neighbour named both ways: the two shares
        together would unmask that neighbour's update.
        """
        if self.included is None:
            raise SecAggError(f"round {self.round_number}: this learner never took part in the collection")
        if self.revealed:
            raise RevealRefused(f"round {self.round_number}: shares were already revealed once; a second request is refused")
        both = set(survivors) & set(dropped)
        if both:
            raise RevealRefused(f"learners {sorted(both)} are named as both sent and dropped: revealing both shares would unmask them")
        if self.learner_id not in survivors:
            raise SecAggError("this learner is alive and sent its update, but is not named among those who did")
        strangers = (set(survivors) | set(dropped)) - set(self.included) - {self.learner_id}
        if strangers:
            raise SecAggError(f"learners {sorted(strangers)} are not neighbours whose shares this learner holds")
        surviving = len(set(survivors) & set(self.included)) + 1
        if surviving < self.threshold:
            raise RevealRefused(f"only {surviving} of this learner's neighbourhood sent updates; {self.threshold} are needed")
        self.revealed = True
        answer = [(peer, True, self.held[peer][0].to_bytes(SHARE_VALUE_BYTES, "big")) for peer in survivors if peer in self.held]
        answer += [(peer, False, self.held[peer][1].to_bytes(SHARE_VALUE_BYTES, "big")) for peer in dropped if peer in self.held]
        return answer


# ---- the leader's side of a round ---------------------------------------------------------------------------------


@dataclass
class LeaderRound:
    """The leader's record of one round's secure aggregation: the graph, the keys and shares it relays, and the unmasking.

    It never holds a learner's unmasked update: masked updates go into one modular sum, and only the sum is unmasked.
    """

    round_number: int
    graph: dict[int, list[int]]  # learner id -> neighbours
    threshold: int
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # advertised (mask key, share key)
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver -> encrypted share
    included: set[int] = field(default_factory=set)  # told which neighbours to mask against: may send a masked update
    revealed: dict[int, dict[int, int]] = field(default_factory=dict)  # owner -> {holder's point: share}, self seeds
    revealed_keys: dict[int, dict[int, int]] = field(default_factory=dict)  # owner -> {holder's point: share}, mask keys

    @property
    def cohort(self) -> int:
        """Learners the round's graph was drawn over."""
        return len(self.graph)

    def add_keys(self, learner_id: int, mask_key: bytes, share_key: bytes) -> None:
        """Take a learner's advertised public keys (AdvertiseKeys); SecAggError when they are not two X25519 keys."""
        load_public(mask_key, "the mask key")
        load_public(share_key, "the share key")
        if mask_key == share_key:
            raise SecAggError("the mask key and the share key must differ")
        self.keys[learner_id] = (mask_key, share_key)

    def neighbour_keys(self, learner_id: int) -> dict[int, tuple[bytes, bytes]]:
        """The advertised keys of a learner's neighbours (ShareKeys)."""
        return {peer: self.keys[peer] for peer in self.graph[learner_id] if peer in self.keys}

    def add_shares(self, learner_id: int, encrypted: Mapping[int, bytes]) -> None:
        """Take a learner's encrypted shares: exactly one per neighbour that advertised keys, each of the exact size."""
        if learner_id in self.shares:
            raise SecAggError(f"learner {learner_id} already sent its shares for round {self.round_number}")
        expected = set(self.neighbour_keys(learner_id))
        if set(encrypted) != expected:
            raise SecAggError(f"shares must go to exactly the neighbours {sorted(expected)}, got {sorted(encrypted)}")
        for peer, ciphertext in encrypted.items():
            if len(ciphertext) != ENCRYPTED_SHARE_BYTES:
                raise SecAggError(f"the share for learner {peer} is {len(ciphertext)} bytes, not {ENCRYPTED_SHARE_BYTES}")
        self.shares[learner_id] = dict(encrypted)

    def collection_for(self, learner_id: int) -> tuple[list[int], dict[int, bytes]]:
        """A learner's neighbours that sent shares, and their shares for it (the Collect stage)."""
        peers = [peer for peer in self.graph[learner_id] if learner_id in self.shares.get(peer, {})]
        return peers, {peer: self.shares[peer][learner_id] for peer in peers}

    def unmask_request(self, learner_id: int, senders: set[int]) -> tuple[list[int], list[int]]:
        """(survivors, dropped) among a learner's neighbours that it holds shares of, itself among the survivors."""
        peers, _ = self.collection_for(learner_id)
        survivors = sorted({learner_id} | {peer for peer in peers if peer in senders})
        dropped = sorted(peer for peer in peers if peer not in senders)
        return survivors, dropped

    def add_revealed(
        self, holder: int, shares: Sequence[tuple[int, bool, bytes]], survivors: Sequence[int], dropped: Sequence[int]
    ) -> None:
        """Take the shares a survivor revealed, checked against what it was asked for."""
        point = share_point(holder)
        asked = {(peer, True) for peer in survivors if peer != holder} | {(peer, False) for peer in dropped}
        seen = set()
        for owner, is_seed, value in shares:
            if (owner, is_seed) not in asked or (owner, is_seed) in seen:
                raise SecAggError(f"learner {holder} revealed a share it was not asked for (learner {owner})")
            if len(value) != SHARE_VALUE_BYTES:
                raise SecAggError(f"a revealed share is {len(value)} bytes, not {SHARE_VALUE_BYTES}")
            seen.add((owner, is_seed))
        for owner, is_seed, value in shares:
            (self.revealed if is_seed else self.revealed_keys).setdefault(owner, {})[point] = int.from_bytes(value, "big")

    def unmask(self, total: np.ndarray, senders: set[int]) -> np.ndarray:
        """The sum of the senders' quantized updates, from the modular sum of their masked ones (in place); SecAggError when
        fewer than `threshold` shares of a secret came back."""
        if len(senders) < self.threshold:
            raise SecAggError(f"{len(senders)} learners sent masked updates; the threshold is {self.threshold}")
        masks = MaskGenerator(total.size)
        for owner in sorted(senders):
            seed = combine_shares(self._enough(self.revealed.get(owner, {}), owner, "self-mask seed"))
            masks.add(total, seed, sign=-1)
        dropped = set(self.shares) - senders  # every sender masked against each neighbour whose shares it was given
        for owner in sorted(dropped):
            private = X25519PrivateKey.from_private_bytes(
                combine_shares(self._enough(self.revealed_keys.get(owner, {}), owner, "mask key"))
            )
            for peer in self.shares[owner]:
                if peer in senders:
                    peer_key = load_public(self.keys[peer][0], f"learner {peer}'s mask key")
                    masks.add_pair(total, pair_mask_key(private, peer_key, self.round_number, owner, peer), peer, owner, sign=-1)
        return total

    def _enough(self, shares: dict[int, int], owner: int, what: str) -> dict[int, int]:
        """`threshold` of the shares of a secret, or SecAggError."""
        if len(shares) < self.threshold:
            raise SecAggError(f"{len(shares)} shares of learner {owner}'s {what} came back; {self.threshold} are needed")
        return dict(list(shares.items())[: self.threshold])
