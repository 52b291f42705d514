"""Label Studio's brush RLE (the ``value.rle`` of a ``brushlabels`` result), written and read with numpy.

The format (thi.ng rle-pack, as Label Studio's editor and ``label_studio_sdk.converter.brush`` use it) is
a big-endian bit stream, zero-padded to whole bytes and stored as a list of byte values:

- 32 bits: n, the number of words: 4 x width x height, the RGBA pixels in row-major order;
- 5 bits: word size - 1 (Label Studio writes 8-bit words);
- 4 x 4 bits: the four length-field sizes - 1 (Label Studio: 3, 4, 8, 16 bits);
- blocks until n words are out: 1 bit kind, 2 bits size index s, then ``sizes[s]`` bits m, then
  kind 1 (a run): one word, repeated m + 1 times; kind 0 (literals): m + 1 words.

A pixel belongs to the brush region when its alpha (its 4th word) is at least 128.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

WORD_BITS = 8
LENGTH_BITS = (3, 4, 8, 16)
MAX_BLOCK = 2 ** LENGTH_BITS[-1]  # words in the longest block
OPAQUE = 128  # alpha from which a pixel is in the region


def _pack_fields(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Bytes of the fields ``values`` (each ``widths`` bits, most significant bit first), concatenated
    and zero-padded to a whole byte."""
    field = np.repeat(np.arange(len(widths)), widths)
    position = np.arange(len(field)) - np.repeat(np.cumsum(widths) - widths, widths)
    bits = (values[field] >> (widths[field] - 1 - position)) & 1
    return np.packbits(bits.astype(np.uint8))


def encode(words: np.ndarray) -> list[int]:
    """RLE of a flat uint8 array, one run block per run of equal words."""
    words = np.asarray(words).ravel()
    if words.dtype != np.uint8:
        raise ValueError(f"brush RLE encodes uint8 words, got {words.dtype}")
    n = len(words)
    if n >= 2**32:
        raise ValueError(f"{n} words do not fit the 32-bit length of a brush RLE")
    starts = np.r_[0, np.flatnonzero(words[1:] != words[:-1]) + 1] if n else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, n])
    blocks = -(-lengths // MAX_BLOCK)  # runs longer than the longest length field are split
    block_length = np.full(blocks.sum(), MAX_BLOCK, dtype=np.int64)
    block_length[np.cumsum(blocks) - 1] = lengths - (blocks - 1) * MAX_BLOCK
    block_value = np.repeat(words[starts].astype(np.int64), blocks)
    m = block_length - 1
    size_index = np.searchsorted(2 ** np.asarray(LENGTH_BITS), m, side="right")
    header_values = [n, WORD_BITS - 1, *(b - 1 for b in LENGTH_BITS)]
    header_widths = [32, 5, 4, 4, 4, 4]
    block_values = np.stack(
        [4 | size_index, m, block_value], axis=1
    ).ravel()  # 4 | s: kind bit 1, then s
    block_widths = np.stack(
        [np.full_like(m, 3), np.asarray(LENGTH_BITS)[size_index], np.full_like(m, WORD_BITS)],
        axis=1,
    ).ravel()
    values = np.r_[np.asarray(header_values, np.int64), block_values]
    widths = np.r_[np.asarray(header_widths, np.int64), block_widths]
    return _pack_fields(values, widths).tolist()


class _BitReader:
    def __init__(self, data: np.ndarray) -> None:
        self.bits = np.unpackbits(data)
        self.text = (self.bits + ord("0")).tobytes().decode("ascii")
        self.position = 0

    def _advance(self, width: int) -> int:
        start, self.position = self.position, self.position + width
        if self.position > len(self.bits):
            raise ValueError(
                f"brush RLE ends after {len(self.bits)} bits, in the middle of a block (truncated?)"
            )
        return start

    def read(self, width: int) -> int:
        start = self._advance(width)
        return int(self.text[start : self.position], 2)

    def read_bytes(self, count: int) -> np.ndarray:
        start = self._advance(count * 8)
        return np.packbits(self.bits[start : self.position])


def _bytes(rle: Sequence[int]) -> np.ndarray:
    data = np.asarray(rle)
    if (
        data.ndim != 1
        or not np.issubdtype(data.dtype, np.integer)
        or ((data < 0) | (data > 255)).any()
    ):
        raise ValueError("brush RLE must be a list of byte values (integers 0..255)")
    return data.astype(np.uint8)


def declared_words(rle: Sequence[int]) -> int:
    """The word count an RLE's header declares (what decoding it would allocate)."""
    head = _bytes(rle[:4])
    if len(head) < 4:
        raise ValueError("brush RLE shorter than its 32-bit header")
    return int.from_bytes(head.tobytes(), "big")


def decode(rle: Sequence[int]) -> np.ndarray:
    """The flat uint8 words of an RLE (runs and literal blocks, 8-bit words)."""
    reader = _BitReader(_bytes(rle))
    n = reader.read(32)
    word_bits = reader.read(5) + 1
    sizes = [reader.read(4) + 1 for _ in LENGTH_BITS]
    if word_bits != WORD_BITS:
        raise ValueError(
            f"brush RLE with {word_bits}-bit words: only 8-bit RGBA masks are supported"
        )
    out = np.empty(n, dtype=np.uint8)
    filled = 0
    while filled < n:
        is_run = reader.read(1)
        count = reader.read(sizes[reader.read(2)]) + 1
        if filled + count > n:
            raise ValueError(f"brush RLE block of {count} words overruns its declared {n} words")
        out[filled : filled + count] = (
            reader.read(WORD_BITS) if is_run else reader.read_bytes(count)
        )
        filled += count
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """RLE of an (H, W) boolean mask as Label Studio stores a brush: RGBA, white and opaque inside."""
    return encode(np.repeat(np.asarray(mask, dtype=bool).ravel().astype(np.uint8) * 255, 4))


def rle_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """(H, W) boolean mask of a brush RLE; an RLE of another size is a ValueError that says both sizes."""
    declared = declared_words(rle)  # checked before decoding: the header could declare 2^32 words
    if declared != 4 * height * width:
        raise ValueError(
            f"brush mask holds {declared / 4:g} pixels but the image is {width}x{height} "
            f"({height * width} pixels)"
        )
    words = decode(rle)
    return words.reshape(height, width, 4)[..., 3] >= OPAQUE
