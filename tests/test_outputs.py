"""AveragedPartContainer and OutputBufferPool: results land in the right place of the output buffers."""
import asyncio

import pytest
import torch
from hivemind.averaging.partition import AllreduceException, TensorPartContainer

from athome.averaging.outputs import AveragedPartContainer, OutputBufferPool, ReceiveBufferPool


def _tensors():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) for shape in ((1000,), (7, 13), (301,))]


def test_results_of_every_kind_land_in_their_slices():
    tensors = _tensors()
    aggregate = [t * 3 + 1 for t in tensors]  # what a round would produce
    flat_aggregate = torch.cat([a.reshape(-1) for a in aggregate])
    outputs = [torch.full_like(t, float("nan")) for t in tensors]
    fractions = (0.2, 0.5, 0.3)
    container = AveragedPartContainer(tensors, fractions, outputs=outputs, part_size_bytes=256)
    reference = TensorPartContainer(tensors, fractions, part_size_bytes=256)
    assert container.num_parts_by_peer == reference.num_parts_by_peer  # the same split as hivemind's

    offset = 0
    for peer_index, count in enumerate(container.num_parts_by_peer):
        for part_index in range(count):
            local = container.local_part(peer_index, part_index)
            target = flat_aggregate[offset : offset + local.numel()]
            offset += local.numel()
            if peer_index == 0:  # a delta from the local part (p2p or a codec)
                container.register_processed_part(peer_index, part_index, target - local, delta=True)
            elif peer_index == 1:  # received in place (raw over the data plane)
                container.output_slice(peer_index, part_index).copy_(target)
                container.register_processed_part(
                    peer_index, part_index, container.output_slice(peer_index, part_index)
                )
            elif part_index == 0:  # an aggregate from elsewhere (the local reducer)
                container.register_processed_part(peer_index, part_index, target.clone())
    container.register_failed_reducer(2)  # the last reducer failed after its first part

    async def collect():
        return [t async for t in container.iterate_output_tensors()]

    results = asyncio.run(collect())
    assert [r.data_ptr() for r in results] == [o.data_ptr() for o in outputs]
    flat = torch.cat([r.reshape(-1) for r in results])
    flat_local = torch.cat([t.reshape(-1) for t in tensors])
    failed_from = sum(p.numel() for p in container.get_raw_input_parts(0)) + sum(
        p.numel() for p in container.get_raw_input_parts(1)
    ) + container.local_part(2, 0).numel()
    assert torch.allclose(flat[:failed_from], flat_aggregate[:failed_from], atol=1e-6)
    assert torch.equal(flat[failed_from:], flat_local[failed_from:])  # a failed reducer's parts: local values
    assert container.failed_size == flat.numel() - failed_from


def test_iteration_stops_when_the_round_is_finalized():
    tensors = _tensors()
    container = AveragedPartContainer(tensors, (0.5, 0.5), outputs=[torch.empty_like(t) for t in tensors])

    async def run():
        iterator = container.iterate_output_tensors().__aiter__()
        waiting = asyncio.ensure_future(iterator.__anext__())
        await asyncio.sleep(0.01)
        assert not waiting.done()
        container.finalize()
        with pytest.raises(AllreduceException):
            await waiting

    asyncio.run(run())


def test_outputs_must_match_the_tensors():
    tensors = _tensors()
    with pytest.raises(ValueError):
        AveragedPartContainer(tensors, (1.0,), outputs=[torch.empty_like(t) for t in tensors[:2]])
    with pytest.raises(ValueError):
        AveragedPartContainer(tensors, (1.0,), outputs=[torch.empty_like(t, dtype=torch.float64) for t in tensors])


def test_pool_hands_each_set_out_every_other_time():
    tensors = _tensors()
    pool = OutputBufferPool(sets=2)
    first, second, third = pool.take(tensors), pool.take(tensors), pool.take(tensors)
    assert first[0].data_ptr() != second[0].data_ptr()
    assert third[0].data_ptr() == first[0].data_ptr()
    assert [(b.shape, b.dtype) for b in first] == [(t.shape, t.dtype) for t in tensors]
    changed = [t.double() for t in tensors]
    assert pool.take(changed)[0].dtype == torch.float64  # new shapes or dtypes get new buffers


def test_shared_pool_puts_sets_in_shared_memory_or_falls_back(monkeypatch):
    """shared=True: each set is views of one memfd region (what same-host peers map); where a sandbox refuses
    memfds, the pool hands out private buffers instead of failing the round."""
    from athome.averaging import outputs, sharedmemory

    tensors = [torch.zeros(3, 5), torch.zeros(7, dtype=torch.float16)]
    pool = OutputBufferPool(sets=2, shared=True)
    first = pool.take(tensors)
    assert [(b.shape, b.dtype) for b in first] == [(t.shape, t.dtype) for t in tensors]
    assert all(sharedmemory.segment_of(b, pool.segments) is not None for b in first)
    first[0].fill_(1.0)  # writable
    pool.take(tensors)
    assert len(pool.segments) == 2

    def refused(nbytes):
        raise OSError("memfd_create: operation not permitted")

    monkeypatch.setattr(outputs, "SharedRegion", refused)
    private = OutputBufferPool(sets=2, shared=True)
    buffers = private.take(tensors)
    assert not private.shared and private.segments == [] and buffers[0].shape == (3, 5)


def test_receive_pool_reuses_given_buffers_within_its_limit():
    pool = ReceiveBufferPool(max_bytes=3 * 4000)
    first = [pool.take(1000, torch.float32) for _ in range(4)]
    assert len({buffer.data_ptr() for buffer in first}) == 4  # nobody holds two of them
    pool.give(first)  # only three fit under the limit
    again = [pool.take(1000, torch.float32) for _ in range(4)]
    reused = {buffer.data_ptr() for buffer in again} & {buffer.data_ptr() for buffer in first}
    assert len(reused) == 3
    assert pool.take(1000, torch.float16).dtype == torch.float16  # another dtype is never a reused buffer
    pool.give(again[:2])
    pool.give([torch.empty(3000)])  # parts changed size: the old size is dropped to make room
    assert pool.take(3000, torch.float32).numel() == 3000 and not pool._free.get((1000, torch.float32))


def test_centered_clip_rows_are_one_pooled_matrix_per_part():
    """A CenteredClip reducer keeps each part's senders in the rows of one matrix: a part received into its row
    stays where it is, one handed over elsewhere (our own, a p2p one) is copied there, the aggregate is what the
    rows give, and the matrices go back to the pool once the reducer is finished."""
    from athome.averaging.reducer import RobustTensorPartReducer, centered_clip

    generator = torch.Generator().manual_seed(3)
    pool = ReceiveBufferPool(max_bytes=1 << 20)
    shapes = (torch.Size([64]), torch.Size([10]))
    parts = [[torch.randn(shape, generator=generator) for shape in shapes] for _ in range(3)]

    async def run():
        reducer = RobustTensorPartReducer(shapes, num_senders=3, row_pool=pool)
        matrices = []
        for part_index in range(len(shapes)):
            received = reducer.receive_row(0, part_index)  # sender 0's part arrives "over the data plane"
            received.copy_(parts[0][part_index])
            matrices.append(received)
            results = await asyncio.gather(
                reducer.accumulate_part(0, part_index, received),
                reducer.accumulate_part(1, part_index, parts[1][part_index]),  # copied into its row
                reducer.accumulate_part(2, part_index, parts[2][part_index].double().float()),
            )
            stacked = torch.stack([senders[part_index] for senders in parts])
            expected, _ = centered_clip(stacked, torch.ones(3), 1.0, 5)
            for result in results:
                assert torch.allclose(result, expected, atol=1e-6)
            assert torch.equal(reducer._rows[part_index][1], parts[1][part_index])  # copied into its row
        assert reducer.finished.is_set() and reducer.receive_row(0, 0) is None
        reducer.release_rows()
        assert RobustTensorPartReducer(shapes, 3, method="mean").receive_row(0, 0) is None  # the mean keeps no rows
        return matrices

    matrices = asyncio.run(run())
    # given back: the same memory is handed out again for the same part sizes
    again = {pool.take(3 * shape.numel(), torch.float32).data_ptr() for shape in shapes}
    assert again == {matrix.data_ptr() for matrix in matrices}
