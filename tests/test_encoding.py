"""encoding: how many items of a training batch EnCodec tokenizes at once (`lora.encode_chunk`), chosen by the
memory plan (`auto`), halved when CUDA runs out of memory."""
import dataclasses
import logging

import pytest
import torch

from audiocraft_lora import encoding, memory_estimate, memory_plan


def test_candidates_halve_from_the_whole_batch_down_to_four_items():
    assert encoding.candidates(16) == [16, 8, 4]
    assert encoding.candidates(10) == [10, 5, 4]
    assert encoding.candidates(9) == [9, 5, 4]  # (halves rounded up: no chunk of fewer items than needed)
    assert encoding.candidates(5) == [5, 4]
    assert encoding.candidates(3) == [3]
    assert encoding.initial_chunk('auto') == encoding.FALLBACK_CHUNK == 4  # (until the plan takes more, on CUDA)
    assert encoding.initial_chunk('AUTO') == 4 and encoding.initial_chunk(8) == 8 and encoding.initial_chunk(0) == 0


def _debug_compression_model():
    from audiocraft_lora import base_models
    from audiocraft.models.builders import get_debug_compression_model
    del base_models  # (imported for AudioCraft's registry side effects, as the solver does)
    return get_debug_compression_model('cpu').eval()


def test_an_encode_out_of_cuda_memory_is_halved_and_gives_the_same_tokens(caplog):
    model = _debug_compression_model()
    audio = torch.randn(5, model.channels, model.sample_rate // 4)
    whole, _ = type(model).encode(model, audio)
    sizes = []

    def encode_at_most_two(x):  # the real encode, with CUDA's out-of-memory error beyond 2 items at once
        sizes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 18.31 GiB')
        return type(model).encode(model, x)
    chunked = encoding.ChunkedEncode(encode_at_most_two, 0)
    with caplog.at_level(logging.WARNING):
        codes, scale = chunked(audio)
    assert torch.equal(codes, whole) and scale is None
    assert sizes == [5, 2, 2, 1] and chunked.chunk == 2  # the whole batch failed, then 2 + 2 + 1
    assert 'encoding 5 items of a training batch at once: 2 at a time' in caplog.text
    assert 'lora.encode_chunk=2' in caplog.text
    codes, _ = chunked(audio)  # stays halved: no failed attempt first
    assert torch.equal(codes, whole) and sizes[4:] == [2, 2, 1]

    sizes.clear()
    codes, _ = encoding.ChunkedEncode(encode_at_most_two, 8)(audio)  # a chunk larger than the batch: the batch
    assert torch.equal(codes, whole) and sizes == [5, 2, 2, 1]

    def never(x):
        raise torch.OutOfMemoryError('CUDA out of memory')
    with pytest.raises(torch.OutOfMemoryError):  # one item that doesn't fit: nothing left to halve
        encoding.ChunkedEncode(never, 1)(audio)


def test_encode_bytes_counts_the_audio_and_the_items_encoded_at_once():
    model = _debug_compression_model()
    samples = model.sample_rate * 2
    audio = 8 * model.channels * samples * 4
    sizes = {chunk: encoding.encode_bytes(model, 8, model.channels, samples, chunk) for chunk in (1, 2, 4, 0)}
    per_item = sizes[1] - audio
    assert per_item > 0
    for chunk, items in ((2, 2), (4, 4), (0, 8)):
        assert sizes[chunk] - audio == pytest.approx(items * per_item, abs=items)  # (rounding of the factor)
    with memory_estimate.PeakTracker() as tracker, torch.no_grad():  # the factor is on what fake tensors count
        one = torch.zeros(1, model.channels, samples)
        start = tracker.current
        type(model).encode(model, one)
    assert per_item == int(encoding.ENCODE_FACTOR * (tracker.peak - start))
    assert encoding.item_bytes(model, model.channels, samples) == tracker.peak - start
    assert encoding.encode_bytes(model, 8, model.channels, samples, 16) == sizes[0]  # more than the batch: the batch
    assert encoding.ENCODE_FACTOR >= 1.43  # the highest measured / estimated ratio (H200, session 20)


@pytest.fixture(scope='module')
def solver(tmp_path_factory):
    from helpers import DEBUG_ARGS, build_solver
    from audiocraft_lora import train
    folder = tmp_path_factory.mktemp('outputs')
    old = train.main.dora.dir
    train.main.dora.dir = folder
    try:
        solver, _ = build_solver(DEBUG_ARGS + ['lora.memory_budget_gib=64', 'dataset.batch_size=8',
                                               'lora.keep_merged_weights=false'])
    finally:
        train.main.dora.dir = old
    return solver


def _plan(solver, budget_gib, chunk='auto', graphs='auto'):
    solver.speed_settings = dataclasses.replace(solver.speed_settings, activation_checkpointing='none',
                                                memory_budget_gib=budget_gib, encode_chunk=chunk, graph_layers=graphs)
    encoding.chunk_encoder(solver.compression_model, encoding.initial_chunk(chunk))
    solver.memory_estimate = memory_plan.plan_training(solver)
    return solver.memory_estimate


def test_auto_encodes_as_many_items_at_once_as_fit_beside_the_step(solver, caplog):
    cm = solver.compression_model
    shape, _ = memory_plan.step_shape(solver)
    assert shape.batch == 8 and shape.samples is not None
    memory_plan.apply_plan(solver.model, memory_plan.PLANS[0])
    # the encode is counted on top of the LM's step alone (the layers' graphs keep its activations meanwhile)
    lm_step = memory_estimate.estimate_step(solver.model, cm, dataclasses.replace(shape, samples=None), None)
    sizes = {chunk: encoding.encode_bytes(cm, 8, shape.channels, shape.samples, chunk) for chunk in (0, 2, 4)}

    def needed(chunk):
        return memory_plan.needed(memory_estimate.Estimate(lm_step.resident, lm_step.step + sizes[chunk]))
    with caplog.at_level(logging.INFO):
        summary = _plan(solver, 64)
    assert summary['encode_chunk'] == 0 and cm.encode.chunk == 0 and solver.speed_settings.encode_chunk == 0
    assert summary['encode_bytes'] == sizes[0] and summary['needed_bytes'] == needed(0)
    assert "EnCodec encodes each training batch 8 of 8 items at a time (fits beside the step in the layers' CUDA " \
           "graphs" in caplog.text
    summary = _plan(solver, needed(4) / 2 ** 30)  # just room for 4 items beside the step, not for 8
    assert summary['encode_chunk'] == 4 and cm.encode.chunk == 4 and summary['needed_bytes'] == needed(4)
    summary = _plan(solver, needed(4) / 2 ** 30 * 0.9999)  # the step fits, 4 items beside it don't: 4, no graphs
    assert summary['encode_chunk'] == 4 and cm.encode.chunk == 4
    assert summary['needed_bytes'] > summary['budget_bytes']  # (plan_graphs finds no room: the layers run eagerly)
    summary = _plan(solver, 64, chunk=2)  # explicit: kept, and counted
    assert summary['encode_chunk'] == 2 and cm.encode.chunk == 2 and solver.speed_settings.encode_chunk == 2
    assert summary['encode_bytes'] == sizes[2] and summary['needed_bytes'] == needed(2)
    # no graphs: the encode comes before the step's activations, the larger of the two counts
    beside = {chunk: memory_plan.needed(memory_estimate.Estimate(lm_step.resident, max(lm_step.step, sizes[chunk])))
              for chunk in (0, 4)}
    summary = _plan(solver, 64, graphs='false')
    assert summary['encode_chunk'] == 0 and cm.encode.chunk == 0 and summary['encode_bytes'] == 0
    assert summary['needed_bytes'] == max(beside[0], memory_plan.needed(
        memory_estimate.estimate_step(solver.model, cm, shape, None)))  # (the whole batch installed: the same)
    summary = _plan(solver, beside[4] / 2 ** 30, graphs='false')
    assert summary['encode_chunk'] == 4 and cm.encode.chunk == 4
    _plan(solver, 64)


def test_batches_from_the_token_cache_plan_no_encode(solver, caplog):
    from omegaconf import open_dict
    with open_dict(solver.cfg):
        solver.cfg.cache.path, solver.cfg.cache.write = 'tokens', False
    try:
        with caplog.at_level(logging.WARNING):
            summary = _plan(solver, 64)
        assert 'encode_bytes' not in summary and solver.compression_model.encode.chunk == encoding.FALLBACK_CHUNK
        assert "Could not estimate EnCodec's encode" not in caplog.text
    finally:
        with open_dict(solver.cfg):
            solver.cfg.cache.path = None


def test_graph_signatures_leave_room_for_the_encode_or_the_eager_fallback_whichever_is_larger():
    GIB = 2 ** 30
    # a 40 GiB budget, a step that needs 30 GiB, graphs of 1 GiB shared + 1 GiB a signature, a 3 GiB eager fallback
    assert memory_plan.graph_signatures_that_fit(40 * GIB, 30 * GIB, GIB, GIB, 3 * GIB) == 6
    # the encode (2 GiB, already in needed_bytes) runs when the fallback step doesn't: the fallback needs 1 GiB more
    assert memory_plan.graph_signatures_that_fit(40 * GIB, 32 * GIB, GIB, GIB, 3 * GIB, encode=2 * GIB) == 6
    # an encode larger than the fallback leaves it nothing more to ask for
    assert memory_plan.graph_signatures_that_fit(40 * GIB, 35 * GIB, GIB, GIB, 3 * GIB, encode=5 * GIB) == 4
    assert memory_plan.graph_signatures_that_fit(40 * GIB, 39 * GIB, GIB, GIB, 3 * GIB) == 0  # none, never negative


def test_the_whole_batch_encode_is_planned_before_keeping_the_merged_weights(solver):
    from audiocraft_lora.speed import set_keep_merged
    cm = solver.compression_model
    shape, _ = memory_plan.step_shape(solver)
    memory_plan.apply_plan(solver.model, memory_plan.PLANS[0])
    set_keep_merged(solver.model, False)
    lm_step = memory_estimate.estimate_step(solver.model, cm, dataclasses.replace(shape, samples=None), None)
    whole = encoding.encode_bytes(cm, 8, shape.channels, shape.samples, 0)
    just_the_encode = memory_plan.needed(memory_estimate.Estimate(lm_step.resident, lm_step.step + whole))
    solver.speed_settings = dataclasses.replace(solver.speed_settings, keep_merged_weights='auto')
    try:
        summary = _plan(solver, just_the_encode / 2 ** 30)  # room for the whole batch's encode, none for the weights
        assert summary['encode_chunk'] == 0 and summary['keep_merged_weights'] is False
        assert summary['needed_bytes'] == just_the_encode
        summary = _plan(solver, 64)  # room for both
        assert summary['encode_chunk'] == 0 and summary['keep_merged_weights'] is True
        set_keep_merged(solver.model, True)
        kept = memory_estimate.estimate_step(solver.model, cm, dataclasses.replace(shape, samples=None), None)
        assert kept.step > lm_step.step  # (they cost memory)
        assert summary['needed_bytes'] == memory_plan.needed(memory_estimate.Estimate(kept.resident, kept.step + whole))
    finally:
        set_keep_merged(solver.model, False)
        solver.speed_settings = dataclasses.replace(solver.speed_settings, keep_merged_weights='false')
