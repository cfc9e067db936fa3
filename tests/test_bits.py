import torch
from hypothesis import given
from hypothesis import strategies as st

from radgrad.bits import pack_bits, unpack_bits


def test_every_byte_value_round_trips():
    bits = torch.tensor([[(value >> i) & 1 for i in range(8)] for value in range(256)], dtype=torch.bool)
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.tolist() == list(range(256))
    assert torch.equal(unpack_bits(packed, bits.shape), bits)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=3), st.integers(0, 2**32 - 1))
def test_any_shape_round_trips_in_ceil_n_over_8_bytes(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) > 0.5
    packed = pack_bits(mask)
    assert packed.numel() == (mask.numel() + 7) // 8 and packed.is_contiguous()
    assert torch.equal(unpack_bits(packed, mask.shape), mask)
